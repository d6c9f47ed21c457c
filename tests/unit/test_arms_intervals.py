"""Arm-vs-arm bootstrap intervals: the arms report ranks only what the test prompts can tell apart."""

from __future__ import annotations

import random
from pathlib import Path

from distray.arms import ArmsResult, arm_differences, ordering, ordering_ci, render_report

ARMS = ["pruned", "sft", "kd"]


def _rows(nll: float, agree: float, spread: float, seed: int, n: int = 80) -> dict[str, dict[str, float]]:
    rnd = random.Random(seed)
    return {"teacher_nll": {f"r{i}": nll + rnd.uniform(-spread, spread) for i in range(n)},
            "token_agreement": {f"r{i}": min(1.0, max(0.0, agree + rnd.uniform(-0.1, 0.1))) for i in range(n)}}


def _per_row(kd_nll: float, kd_agree: float) -> dict:
    return {"pruned": _rows(7.9, 0.04, 0.5, 1), "sft": _rows(3.4, 0.32, 1.5, 2), "kd": _rows(kd_nll, kd_agree, 1.5, 3)}


def test_kd_within_the_noise_of_sft_is_said_so_not_ranked(tmp_path: Path) -> None:
    per_row = _per_row(3.35, 0.325)  # the run: KD 3.28 vs SFT 3.39, agreement 33 vs 32
    diffs = arm_differences(per_row, ARMS)
    by = {(d["a"], d["b"], d["scorer"]): d for d in diffs}
    assert by[("sft", "pruned", "teacher_nll")]["better"] == "sft"
    assert by[("sft", "pruned", "token_agreement")]["better"] == "sft"
    kd = by[("kd", "sft", "teacher_nll")]
    assert kd["better"] is None and kd["low"] < 0 < kd["high"] and kd["n"] == 80
    assert ordering_ci(diffs, ARMS) == "within noise"

    figs = {a: {"teacher_nll": sum(r["teacher_nll"].values()) / 80} for a, r in per_row.items()}
    res = ArmsResult(run_dir=str(tmp_path), report_path=str(tmp_path / "r.md"), figures=figs,
                     differences=diffs, ordering_ci=ordering_ci(diffs, ARMS), ordering_met=ordering(figs, ARMS))
    md = render_report(_cfg(tmp_path), ARMS, res, None)
    assert "on teacher_nll and token_agreement: **within noise** (95% bootstrap intervals" in md
    line = next(x for x in md.splitlines() if x.startswith("| kd − sft |"))
    assert "within noise" in line
    assert "sft better" in next(x for x in md.splitlines() if x.startswith("| sft − pruned |"))


def test_a_clear_gain_is_met_and_a_clear_loss_is_not() -> None:
    assert ordering_ci(arm_differences(_per_row(2.0, 0.6), ARMS), ARMS) == "met"
    assert ordering_ci(arm_differences(_per_row(5.5, 0.1), ARMS), ARMS) == "NOT met"
    assert ordering_ci(arm_differences(_per_row(2.0, 0.6), ARMS), ["pruned", "sft"]) is None


def test_the_intervals_are_fixed_by_the_seed() -> None:
    per_row = _per_row(3.35, 0.325)
    assert arm_differences(per_row, ARMS, seed=4) == arm_differences(per_row, ARMS, seed=4)


def test_a_looping_arm_is_flagged(tmp_path: Path) -> None:
    figs = {"teacher": {"repetition": 4.0, "max_tokens_hit_pct": 0.0},
            "kd": {"repetition": 35.0, "max_tokens_hit_pct": 100.0},
            "sft": {"repetition": 5.0, "max_tokens_hit_pct": 2.0}}
    res = ArmsResult(run_dir=str(tmp_path), report_path=str(tmp_path / "r.md"), figures=figs)
    md = render_report(_cfg(tmp_path), ["sft", "kd"], res, None)
    assert ("**Degenerate output:** kd (35.0% repeated 4-grams (teacher 4.0%), 100% of answers cut at "
            "max_tokens).") in md
    assert "| repeated 4-grams (%) ↓ |" in md


def _cfg(tmp_path: Path):
    from distray.config import config_from_dict

    return config_from_dict({
        "run": {"name": "arms", "output_dir": str(tmp_path)},
        "data": {"train": "t.jsonl", "test": "test.jsonl"},
        "teacher": {"kind": "vllm", "model": "teacher-folder"},
        "student": {"model": "student-folder"},
    })

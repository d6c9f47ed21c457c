"""The example's pieces that need no Ray: the self-instruct conversion and split, the arms plan,
the ordering verdict, and the shipped example data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distray.arms import PRUNED, check_arms, eval_pairs, ordering
from distray.errors import ConfigError, DataError
from distray.self_instruct import convert, seed_task_rows, split_rows

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "data" / "self-instruct"


def _seed_file(tmp_path: Path, n: int = 10) -> Path:
    lines = [{"id": f"seed_task_{i}", "name": f"t{i}", "instruction": f"Do thing {i}.",
              "instances": [{"input": "some input" if i % 2 else "", "output": f"answer {i}"}],
              "is_classification": False} for i in range(n)]
    p = tmp_path / "seed_tasks.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def test_a_seed_task_becomes_a_chat_row_with_its_reference(tmp_path: Path) -> None:
    rows = seed_task_rows(_seed_file(tmp_path))
    assert rows[0] == {"id": "seed_task_0", "messages": [{"role": "user", "content": "Do thing 0."}],
                       "reference": "answer 0"}
    assert rows[1]["messages"][0]["content"] == "Do thing 1.\n\nsome input"


def test_the_split_is_fixed_by_id_not_by_file_order(tmp_path: Path) -> None:
    rows = seed_task_rows(_seed_file(tmp_path))
    a = split_rows(rows, n_test=3)
    b = split_rows(list(reversed(rows)), n_test=3)
    assert len(a["test"]) == 3 and len(a["train"]) == 7
    assert {r["id"] for r in a["test"]} == {r["id"] for r in b["test"]}
    assert not {r["id"] for r in a["test"]} & {r["id"] for r in a["train"]}


def test_a_missing_seed_file_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="self-instruct"):
        seed_task_rows(tmp_path / "nope.jsonl")


def test_the_shipped_example_data_is_the_converters_output(tmp_path: Path) -> None:
    shipped = {s: (EXAMPLE / f"{s}.jsonl").read_text() for s in ("train", "test")}
    assert shipped["train"].count("\n") == 140 and shipped["test"].count("\n") == 35
    assert (EXAMPLE / "LICENSE").read_text().lstrip().startswith("Apache License")
    # Regenerated from the shipped rows themselves (instruction + input are already joined), the
    # split must come out the same.
    rows = [json.loads(x) for s in ("train", "test") for x in shipped[s].splitlines()]
    again = split_rows(rows)
    assert [r["id"] for r in again["test"]] == [json.loads(x)["id"] for x in shipped["test"].splitlines()]
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"id": r["id"], "instruction": r["messages"][0]["content"],
                                        "instances": [{"input": "", "output": r["reference"]}]}) + "\n"
                            for r in rows))
    out = convert(seed, tmp_path / "out")
    assert Path(out["test"]).read_text() == shipped["test"]


def test_arms_are_checked_and_pruned_is_always_a_baseline() -> None:
    assert check_arms(["pruned", "sft", "sft", "kd"]) == ["pruned", "sft", "kd"]
    with pytest.raises(ConfigError, match="choose from"):
        check_arms(["pruned", "distill"])
    assert eval_pairs(["pruned", "sft", "kd", "reverse_kl"]) == [("sft", PRUNED), ("kd", "reverse_kl")]
    assert eval_pairs(["sft", "pruned", "kd"]) == [("sft", PRUNED), ("kd", None)]
    assert eval_pairs(["pruned"]) == [(None, PRUNED)]


def test_the_ordering_verdict_needs_both_figures_in_order() -> None:
    good = {"pruned": {"teacher_nll": 5.0, "token_agreement": 20.0},
            "sft": {"teacher_nll": 2.0, "token_agreement": 50.0},
            "kd": {"teacher_nll": 1.8, "token_agreement": 55.0}}
    assert ordering(good, ["pruned", "sft", "kd"]) is True
    worse_agreement = {**good, "kd": {"teacher_nll": 1.8, "token_agreement": 49.0}}
    assert ordering(worse_agreement, ["pruned", "sft", "kd"]) is False
    assert ordering(good, ["pruned", "sft"]) is None


def test_the_report_gives_a_verdict_per_logit_arm(tmp_path) -> None:
    from distray.arms import ArmsResult, render_report
    from distray.config import config_from_dict

    cfg = config_from_dict({
        "run": {"name": "arms", "output_dir": str(tmp_path)},
        "data": {"train": "t.jsonl", "test": "test.jsonl"},
        "teacher": {"kind": "vllm", "model": "teacher-folder"},
        "student": {"model": "student-folder"},
        "train": {"precision": "bf16"},
    })
    figs = {"teacher": {"teacher_nll": 0.5, "token_agreement": 98.0},
            "pruned": {"teacher_nll": 7.9, "token_agreement": 4.1},
            "sft": {"teacher_nll": 3.39, "token_agreement": 32.5},
            "kd": {"teacher_nll": 3.28, "token_agreement": 33.4},
            "reverse_kl": {"teacher_nll": 3.42, "token_agreement": 32.7}}
    arms = ["pruned", "sft", "kd", "reverse_kl"]
    res = ArmsResult(run_dir=str(tmp_path), report_path=str(tmp_path / "report.md"), figures=figs,
                     ordering_met=ordering(figs, arms))
    md = render_report(cfg, arms, res, None)
    assert "on teacher_nll and token_agreement: **NOT met**." in md
    assert "Per arm: pruned < sft < kd: met; pruned < sft < reverse_kl: NOT met." in md
    assert ", bf16;" in md

"""End-to-end evaluate on tiny models: predictions, every figure of the table, the report.

    pytest tests/integration/test_evaluate.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

N_TEST = 6


def _cfg(tmp_path: Path, teacher: str, baseline: str, backend: str, **evaluate: object):
    from distray.config import config_from_dict
    from distray.prepare import prepare

    return prepare(config_from_dict(
        {
            "run": {"name": "ev", "output_dir": str(tmp_path)},
            "data": {"builtin": {"name": "reverse", "n_train": 4, "n_validation": 0, "n_test": N_TEST}},
            "teacher": {"kind": "vllm", "model": teacher, "engine_kwargs": {"max_model_len": 256}},
            "student": {"model": baseline},
            "evaluate": {
                "backend": backend,
                "baseline": baseline,
                "max_tokens": 6,
                "latency_samples": 2,
                # regex "\\S": a format check every non-empty answer passes, so retention and
                # gain are defined even for random tiny models (their exact match is 0).
                "scorers": ["exact_match", "regex", "bleu", "teacher_agreement"],
                "regex": r"\S",
                "engine_kwargs": {"max_model_len": 256},
                **evaluate,
            },
        }
    ), demo=False)


def _student_from(model: str, cfg) -> None:
    from distray.paths import RunPaths

    shutil.copytree(model, RunPaths(cfg.run_dir).student)


MODEL_FIELDS = (
    "parameters",
    "weights_mb",
    "peak_rss_mb",
    "latency_ms",
    "latency_p90_ms",
    "throughput_rows_per_s",
    "output_tokens_per_s",
)


def test_evaluate_writes_every_field_of_the_table(
    tmp_path: Path, tiny_model: str, tiny_teacher_model: str, ray_cluster
) -> None:
    from distray.evaluate.runner import run

    cfg = _cfg(tmp_path, tiny_teacher_model, tiny_model, "hf")
    # The "distilled" student is a copy of the teacher: it must agree with it on every row.
    _student_from(tiny_teacher_model, cfg)
    result = run(cfg)

    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["test_rows"] == N_TEST
    assert set(metrics["models"]) == {"teacher", "student", "baseline"}
    for role, m in metrics["models"].items():
        for f in MODEL_FIELDS:
            assert m[f] is not None and m[f] > 0, (role, f, m[f])
        for s in ("exact_match", "regex", "bleu"):
            assert m["scores"][s] is not None, (role, s)
        assert m["answered_rows"] == N_TEST
    teacher, student, baseline = (metrics["models"][r] for r in ("teacher", "student", "baseline"))
    assert student["parameters"] == teacher["parameters"] > baseline["parameters"]
    assert teacher["scores"]["teacher_agreement"] is None
    assert student["scores"]["teacher_agreement"] == 100.0  # same weights, greedy
    assert student["scores"]["teacher_bleu"] is not None
    vt, vb = metrics["student_vs_teacher"], metrics["student_vs_baseline"]
    assert vt["accuracy_retention_pct"]["regex"] == pytest.approx(100.0)
    for k in ("latency_reduction_pct", "memory_reduction_pct", "parameter_reduction_pct", "throughput_gain_x"):
        assert vt[k] is not None, k
    assert vt["memory_reduction_pct"] == pytest.approx(0.0)  # same model, same bytes
    assert vb["accuracy_gain_pts"]["regex"] is not None
    assert metrics["headline"]["scorer"] == "exact_match"
    # latency at equal length: every model wrote max_tokens (6) tokens, timed beside free-running
    for role, m in metrics["models"].items():
        assert m["equal_length_tokens"] == 6, role
        for f in ("ttft_ms", "equal_length_latency_ms", "equal_length_tpot_ms"):
            assert m[f] is not None and m[f] > 0, (role, f)
    assert vt["equal_length_tpot_reduction_pct"] is not None
    # fidelity (on by default; the tiny models share a tokenizer): the copy of the teacher scores
    # what the teacher scores on its own greedy answers, the baseline follows them less
    assert metrics["fidelity"] == {"scorers": ["teacher_nll", "token_agreement", "rouge_l_vs_teacher"],
                                   "skipped": {}}
    ts, ss, bs = teacher["scores"], student["scores"], baseline["scores"]
    assert ts["token_agreement"] == ss["token_agreement"] == 100.0
    assert ss["teacher_nll"] == pytest.approx(ts["teacher_nll"], rel=1e-6)
    assert bs["teacher_nll"] > ts["teacher_nll"] and bs["token_agreement"] < 100.0
    assert ss["rouge_l_vs_teacher"] == 100.0 and ts["rouge_l_vs_teacher"] is None  # not vs itself
    assert vt["fidelity_change"]["token_agreement"] == 0.0
    assert "teacher_nll" not in vt["accuracy_retention_pct"]  # not a task score

    # predictions: one row per test prompt, with the answer and per-row scores
    for path in result.predictions.values():
        table = pq.read_table(path)
        assert table.num_rows == N_TEST
        assert {"id", "prompt", "reference", "response", "score_exact_match",
                "score_teacher_nll", "score_token_agreement"} <= set(table.column_names)
    # report: the table and both plots
    from distray.report import build_report

    assert sorted(Path(p).name for p in result.plots) == ["accuracy.png", "latency.png"]
    md = Path(build_report(cfg.run_dir)).read_text()
    assert "| Metric | Teacher | Student (distilled) | Baseline | Student vs teacher |" in md
    assert "| Time per output token p50 at 6 tokens (ms) |" in md
    assert "| token_agreement with the teacher (%) | 100.0 | 100.0 |" in md
    for png in ("evaluate/accuracy.png", "evaluate/latency.png"):
        assert f"]({png})" in md and (Path(cfg.run_dir) / png).stat().st_size > 1000
    # the flat figures the Python API returns
    assert result.models["student"]["regex"] is not None
    assert result.comparison["accuracy_retention_pct"] is None  # exact match 0/0: undefined


def test_evaluate_without_a_trained_student_says_so(
    tmp_path: Path, tiny_model: str, tiny_teacher_model: str, ray_cluster
) -> None:
    from distray.errors import StageError
    from distray.evaluate.runner import run

    cfg = _cfg(tmp_path, tiny_teacher_model, tiny_model, "hf")
    with pytest.raises(StageError, match="distray train"):
        run(cfg)


@pytest.mark.slow
def test_evaluate_with_vllm_backend(tmp_path: Path, tiny_model: str, ray_cluster) -> None:
    """The vLLM path: student vs baseline only (two engines), scores only."""
    from distray.evaluate.runner import run

    cfg = _cfg(tmp_path, tiny_model, tiny_model, "vllm", models=["student", "baseline"],
               measure_efficiency=False)
    _student_from(tiny_model, cfg)
    result = run(cfg)
    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["models"]["student"]["answered_rows"] == N_TEST
    assert metrics["student_vs_baseline"]["accuracy_gain_pts"]["exact_match"] == 0.0


def test_answers_from_the_measured_batch_equal_the_prediction_run(
    tmp_path: Path, tiny_teacher_model: str, ray_cluster
) -> None:
    """Evaluate takes a local model's answers from its efficiency run (one engine start, not
    two): they must be the answers generate's batch path gives, and a prompt that generate
    refuses is refused the same way."""
    from distray.engines.results import ERROR
    from distray.evaluate import runner
    from distray.formats import FINISH_REASON, ID, MESSAGES, RESPONSE, RESPONSE_TOKEN_IDS

    cfg = _cfg(tmp_path, tiny_teacher_model, tiny_teacher_model, "hf", models=["teacher"])
    test_path = runner.test_data_path(cfg)
    rows = runner._test_rows(test_path, cfg)
    longest = max(rows, key=lambda r: len(r[MESSAGES][-1]["content"]))
    from distray.prompts import load_tokenizer, render_prompt

    n_long = len(render_prompt(load_tokenizer(tiny_teacher_model), longest[MESSAGES], True)[1])
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"max_prompt_tokens": n_long - 1})})
    (model,) = runner.resolve_models(cfg)
    assert runner._answers_while_measuring(model, cfg, rows)
    measured, wall, eff = runner._measure_and_answer(model, cfg, rows)
    predicted, _ = runner._predict(model, cfg, test_path, len(rows))
    assert set(measured) == set(predicted) == {str(r[ID]) for r in rows}
    refused = [i for i, o in predicted.items() if o.get(ERROR)]
    assert refused and all(o[ERROR].startswith("prompt_too_long") for o in (predicted[i] for i in refused))
    for i, p in predicted.items():
        m = measured[i]
        assert (m[RESPONSE], m.get(ERROR) or None) == (p[RESPONSE], p.get(ERROR) or None), i
        if not p.get(ERROR):
            assert list(m[RESPONSE_TOKEN_IDS]) == list(p[RESPONSE_TOKEN_IDS]) and m[FINISH_REASON] == p[FINISH_REASON], i
    assert eff.throughput_rows == len(rows) - len(refused) and eff.latency_ms and wall > 0


def test_evaluate_named_model_folders_on_any_test_file(
    tmp_path: Path, tiny_model: str, tiny_teacher_model: str, ray_cluster
) -> None:
    """`distray evaluate --config C --model kd=PATH --model sft=PATH data.test=FILE`: no trained
    run, two folders scored under their own names against the teacher and the references."""
    from distray.cli import EXIT_OK, main

    test = tmp_path / "held_out.jsonl"
    rows = [{"prompt": f"Reverse the word: {w}", "reference": w[::-1]} for w in ("abc", "hello", "ray", "tiny")]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"run: {{name: named, output_dir: {tmp_path}/runs}}\n"
        f"teacher: {{kind: hf, model: {tiny_teacher_model}}}\nstudent: {{model: {tiny_model}}}\n"
        "evaluate: {backend: hf, max_tokens: 6, latency_samples: 2, scorers: [exact_match]}\n"
    )
    kd = tmp_path / "kd-copy"
    shutil.copytree(tiny_teacher_model, kd)  # a "student" that is the teacher: agrees everywhere
    rc = main(["evaluate", "--config", str(config), "--model", f"kd={kd}", "--model",
               f"sft={tiny_model}", f"data.test={test}"])
    assert rc == EXIT_OK
    run_dir = tmp_path / "runs" / "named"
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["test_data"] == str(test) and metrics["test_rows"] == 4
    assert list(metrics["models"]) == ["teacher", "kd", "sft"]  # the run's student is not needed
    kd_m, sft_m = metrics["models"]["kd"], metrics["models"]["sft"]
    assert kd_m["model"] == str(kd) and sft_m["model"] == tiny_model
    assert kd_m["answered_rows"] == sft_m["answered_rows"] == 4
    assert kd_m["scores"]["token_agreement"] == 100.0 and sft_m["scores"]["token_agreement"] < 100.0
    assert kd_m["scores"]["exact_match"] is not None and sft_m["latency_ms"] > 0
    for m in metrics["models"].values():  # degeneration figures on every model
        assert m["scores"]["repetition"] is not None and m["scores"]["max_tokens_hit_pct"] is not None
    assert metrics["extra_vs_teacher"]["kd"]["fidelity_change"]["token_agreement"] == 0.0
    for name in ("kd", "sft"):
        table = pq.read_table(run_dir / "evaluate" / "predictions" / f"{name}.parquet")
        assert table.num_rows == 4 and "score_repetition" in table.column_names
    md = (run_dir / "report.md").read_text()
    assert "| Metric | Teacher | kd | sft |" in md and "`kd`: " in md

"""report.md renders from a run folder: comparison table, plots, train and bench sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distray.report import build_report, comparison_table, fmt_count

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics() -> dict:
    def model(params: int, mb: float, lat: float, em: float, agree: float | None) -> dict:
        return {
            "model": f"/m/{params}",
            "parameters": params,
            "weights_mb": mb,
            "peak_rss_mb": mb * 3,
            "peak_gpu_mb": None,
            "latency_ms": lat,
            "latency_p90_ms": lat * 1.2,
            "throughput_rows_per_s": 1000 / lat,
            "output_tokens_per_s": 8000 / lat,
            "scores": {"exact_match": em, "teacher_agreement": agree, "teacher_bleu": agree},
        }

    return {
        "test_rows": 200,
        "scorers": ["exact_match", "teacher_agreement"],
        "primary_scorer": "exact_match",
        "models": {
            "teacher": model(3_200_000, 12.2, 40.0, 99.0, None),
            "student": model(410_000, 1.6, 20.0, 97.0, 96.5),
            "baseline": model(410_000, 1.6, 20.0, 0.0, 0.5),
        },
        "student_vs_teacher": {
            "accuracy_retention_pct": {"exact_match": 97.98, "teacher_agreement": None},
            "parameter_reduction_pct": 87.2,
            "memory_reduction_pct": 86.9,
            "peak_rss_reduction_pct": 86.9,
            "latency_reduction_pct": 50.0,
            "throughput_gain_x": 2.0,
        },
        "student_vs_baseline": {"accuracy_gain_pts": {"exact_match": 97.0}},
    }


def test_fmt_count() -> None:
    assert fmt_count(3_200_000) == "3.2M"
    assert fmt_count(410_000) == "410k"
    assert fmt_count(12) == "12"
    assert fmt_count(None) == "–"


def test_comparison_table_has_every_model_and_figure() -> None:
    table = comparison_table(_metrics())
    lines = table.splitlines()
    assert lines[0].startswith("| Metric | Teacher | Student (distilled) | Baseline | Student vs teacher |")
    text = "\n".join(lines)
    for label in ("Parameters", "Memory, weights (MB)", "Latency p50 (ms)", "Throughput (rows/s)",
                  "exact_match (%)", "teacher_agreement (%)"):
        assert label in text
    assert "3.2M" in text and "410k" in text
    assert "98.0% retained" in text
    assert "-50.0%" in text  # latency reduction shows as a drop
    # no GPU column figures → the row is left out rather than printed empty
    assert "Peak GPU" not in text


def test_report_renders_with_plots_and_optional_sections(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps(_metrics()))
    (run / "train").mkdir()
    (run / "train" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) for s in range(1, 20))
    )
    (run / "bench").mkdir()
    (run / "bench" / "summary.md").write_text("# Bench\n| c | tok/s |\n|---|---|\n| 1 | 50 |\n")
    (run / "bench" / "results.json").write_text("{}")
    (run / "bench" / "ttft.png").write_bytes(PNG_MAGIC + b"fake")
    (run / "generate").mkdir()
    (run / "generate" / "stats.json").write_text(json.dumps({"rows_in": 10, "rows_out": 9, "rejects": 1}))

    path = build_report(str(run))
    assert path == str(run / "report.md")
    md = Path(path).read_text()
    assert "Teacher vs student vs baseline" in md
    assert "keeps **98.0%** of the teacher's exact_match" in md
    assert "+97.0 points" in md
    for png in ("evaluate/accuracy.png", "evaluate/latency.png", "train/loss.png", "bench/ttft.png"):
        assert f"]({png})" in md
        assert (run / png).read_bytes().startswith(PNG_MAGIC)
    assert "## Training" in md and "## Serving load benchmark" in md and "## Teacher data" in md
    assert "## Bench" in md  # the summary's heading, demoted under the section
    assert "| rows_out | 9 |" in md


def test_report_of_an_empty_run_says_what_to_do(tmp_path: Path) -> None:
    md = Path(build_report(str(tmp_path / "empty"))).read_text()
    assert "Nothing to report yet" in md


def test_report_keeps_a_trainer_drawn_loss_plot(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loss.png").write_bytes(PNG_MAGIC + b"trainer")
    md = Path(build_report(str(tmp_path))).read_text()
    assert "](train/loss.png)" in md
    assert (tmp_path / "train" / "loss.png").read_bytes() == PNG_MAGIC + b"trainer"


@pytest.mark.parametrize("missing", ["latency_ms", "scores"])
def test_report_tolerates_missing_figures(tmp_path: Path, missing: str) -> None:
    m = _metrics()
    for v in m["models"].values():
        v.pop(missing)
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps(m))
    md = Path(build_report(str(tmp_path))).read_text()
    assert "| Metric |" in md


def test_bench_summary_images_resolve_from_report_md(tmp_path: Path) -> None:
    # bench/summary.md links its plots relative to bench/ (it reads on its own there);
    # report.md, one level up, must point into bench/.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "summary.md").write_text(
        "## Serving benchmark\n\n"
        "![latency vs throughput](latency_vs_throughput.png)\n\n"
        "![TTFT distribution](ttft_distribution.png)\n\n"
        "![old](bench/old.png) [vLLM](https://docs.vllm.ai/x.png)\n"
    )
    for name in ("latency_vs_throughput.png", "ttft_distribution.png", "old.png"):
        (tmp_path / "bench" / name).write_bytes(PNG_MAGIC)
    md = Path(build_report(str(tmp_path))).read_text()
    assert "![latency vs throughput](bench/latency_vs_throughput.png)" in md
    assert "![TTFT distribution](bench/ttft_distribution.png)" in md
    assert "](bench/old.png)" in md and "bench/bench/" not in md  # summaries from before
    assert "](https://docs.vllm.ai/x.png)" in md
    assert md.count("ttft_distribution.png") == 1  # not repeated as an extra plot


def test_report_names_the_trained_student_and_its_init(tmp_path: Path) -> None:
    import yaml

    cfg = {"student": {"model": "/cache/student-init"}, "train": {"loss": "kd"}}
    (tmp_path / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    md = Path(build_report(str(tmp_path))).read_text()
    assert "- student init: `/cache/student-init`" in md
    assert "- student: " not in md  # not trained yet
    (tmp_path / "train" / "student").mkdir(parents=True)
    (tmp_path / "train" / "student" / "config.json").write_text("{}")
    md = Path(build_report(str(tmp_path))).read_text()
    assert f"- student: `{tmp_path}/train/student`" in md
    assert "- student init: `/cache/student-init`" in md


def test_on_policy_rounds_are_linked(tmp_path) -> None:
    import json
    from pathlib import Path

    from distray.report import build_report

    root = tmp_path / "onpolicy"
    root.mkdir()
    (root / "metrics.json").write_text(json.dumps({"rounds": [
        {"round": 0, "reverse_kl": 0.3, "teacher_nll": 5.7}, {"round": 1, "reverse_kl": 0.2, "teacher_nll": 4.9},
    ]}))
    (root / "rounds.png").write_bytes(b"\x89PNG")
    text = Path(build_report(str(tmp_path))).read_text()
    assert "## On-policy rounds" in text and "onpolicy/rounds.png" in text and "4.9" in text

"""Bench metric math, prompts and the summary, without Ray or a server.

    .venv/bin/python -m pytest tests/unit/test_bench_metrics.py -q
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from distray.bench import (
    METRICS,
    PERCENTILES,
    BenchResult,
    SweepPoint,
    compute_metrics,
    generated_prompts,
    load_prompts,
    summary_markdown,
)
from distray.bench.load import run_sync
from distray.config import EndpointConfig, config_from_dict
from distray.tasks import COT_INSTRUCTION


@dataclass
class Out:
    """The fields of vLLM's RequestFuncOutput that the metrics read."""

    success: bool = True
    latency: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_len: int = 0
    error: str = ""


def test_latency_metrics_follow_vllm_definitions() -> None:
    # 5 output tokens: TTFT 0.1 s, then 4 gaps of 0.05 s -> e2e 0.3 s, TPOT (0.3-0.1)/4 = 0.05 s
    a = Out(latency=0.3, ttft=0.1, itl=[0.05] * 4, output_tokens=5, prompt_len=10)
    # 3 tokens: TTFT 0.2, gaps 0.1, 0.1 -> e2e 0.4, TPOT 0.1
    b = Out(latency=0.4, ttft=0.2, itl=[0.1, 0.1], output_tokens=3, prompt_len=6)
    m = compute_metrics([a, b], duration_s=2.0)
    assert m["completed"] == 2 and m["errors"] == 0
    assert m["total_input_tokens"] == 16 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(12.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["mean_tpot_ms"] == pytest.approx(75.0)
    assert m["mean_itl_ms"] == pytest.approx((4 * 50 + 2 * 100) / 6)
    assert m["median_itl_ms"] == pytest.approx(50.0)
    assert m["mean_e2el_ms"] == pytest.approx(350.0)
    # numpy's linear-interpolated percentile, as vLLM uses
    assert m["p90_e2el_ms"] == pytest.approx(390.0)
    assert m["p99_e2el_ms"] == pytest.approx(399.0)


def test_failed_requests_are_errors_and_excluded_from_latency() -> None:
    ok = Out(latency=0.2, ttft=0.1, itl=[0.1], output_tokens=2)
    bad = Out(success=False, latency=9.0, ttft=9.0, error="HTTP 500")
    m = compute_metrics([ok, bad, bad], duration_s=1.0)
    assert m["completed"] == 1 and m["errors"] == 2
    assert m["median_e2el_ms"] == pytest.approx(200.0)
    assert m["request_throughput"] == pytest.approx(1.0)


def test_single_token_answers_have_no_tpot_and_missing_usage_counts_one_token() -> None:
    m = compute_metrics([Out(latency=0.1, ttft=0.1, output_tokens=0)], duration_s=1.0)
    assert m["total_output_tokens"] == 1
    assert m["mean_tpot_ms"] == 0.0 and m["mean_itl_ms"] == 0.0
    assert m["mean_ttft_ms"] == pytest.approx(100.0)


def test_all_failed_gives_zero_latencies_not_nan() -> None:
    m = compute_metrics([Out(success=False)] * 3, duration_s=1.0)
    assert m["errors"] == 3 and m["completed"] == 0
    assert all(m[f"mean_{k}_ms"] == 0.0 for k in METRICS)


def test_every_named_metric_is_a_sweep_point_field() -> None:
    m = compute_metrics([Out(latency=0.2, ttft=0.1, itl=[0.1], output_tokens=2)], 1.0)
    fields = set(SweepPoint.__dataclass_fields__)
    assert set(m) <= fields
    for k in METRICS:
        for stat in ["mean", "median"] + [f"p{p}" for p in PERCENTILES]:
            assert f"{stat}_{k}_ms" in fields


def _point(endpoint: str, c: int, rps: float, ttft: float) -> SweepPoint:
    m = compute_metrics([Out(latency=0.5, ttft=ttft, itl=[0.1] * 4, output_tokens=5)] * 4, 4 / rps)
    return SweepPoint(endpoint=endpoint, model=endpoint, mode="concurrency", concurrency=c,
                      request_rate_rps=None, num_requests=4, duration_s=4 / rps, **m)  # type: ignore[arg-type]


def test_summary_has_one_row_per_point_and_a_student_teacher_ratio() -> None:
    r = BenchResult(points=[_point("student", 4, 8.0, 0.05), _point("teacher", 4, 2.0, 0.2)],
                    endpoints=["student", "teacher"], prompts_source="test.jsonl")
    eps = [EndpointConfig(name=n, base_url="http://127.0.0.1:8000/v1", model=n) for n in r.endpoints]
    md = summary_markdown(r, eps, {"num_prompts": 4, "max_tokens": 5, "ignore_eos": True})
    rows = [line for line in md.splitlines() if line.startswith("| student") or line.startswith("| teacher")]
    assert len(rows) == 2 and "c=4" in rows[0]
    assert "Student vs teacher at c=4: 4.00× request throughput, 0.25× p50 TTFT" in md
    # Relative to bench/, where summary.md sits next to the plots (report.md rebases them).
    assert "![latency vs throughput](latency_vs_throughput.png)" in md
    assert "![TTFT distribution](ttft_distribution.png)" in md
    assert r.point("teacher", concurrency=4).endpoint == "teacher"


def test_sweep_point_labels() -> None:
    p = _point("s", 16, 1.0, 0.1)
    assert p.load == "c=16"
    p.mode, p.concurrency, p.request_rate_rps = "rate", None, 2.5
    assert p.load == "r=2.5/s"
    assert "errors 0" in p.line()


def test_generated_prompts_are_fixed_by_seed() -> None:
    a, b = generated_prompts(8, seed=3), generated_prompts(8, seed=3)
    assert a == b and len(a) == 8
    assert all(m[0]["role"] == "user" and m[0]["content"] for m in a)


def test_prompts_come_from_the_test_file_without_the_reference(tmp_path) -> None:
    path = tmp_path / "test.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "rev abc"}, {"role": "assistant", "content": "cba"}]},
        {"prompt": "What is 2+3?", "reference": "5"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path)}, "data": {"test": str(path)}})
    prompts, source = load_prompts(cfg, 5)
    assert source == str(path) and len(prompts) == 5
    assert prompts[0] == [{"role": "user", "content": "rev abc"}]
    assert prompts[1][-1]["content"] == "What is 2+3?"
    assert prompts[2] == prompts[0]  # fewer rows than requests: cycled


def test_prompts_fall_back_to_generated(tmp_path) -> None:
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path)}})
    prompts, source = load_prompts(cfg, 3)
    assert source.startswith("generated") and len(prompts) == 3


def test_prompts_are_the_ones_generate_sends(tmp_path) -> None:
    # chain_of_thought and {labels} change the prompts generate/evaluate send; bench must match.
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"prompt": "great soup", "reference": "positive"}) + "\n")
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path)},
        "data": {"test": str(path)},
        "task": {
            "system_prompt": "Classify the review.", "prompt_template": "{prompt}\nOne of {labels}:",
            "labels": ["positive", "negative"], "chain_of_thought": True,
        },
    })
    (messages,), _ = load_prompts(cfg, 1)
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Classify the review.")
    assert COT_INSTRUCTION in messages[0]["content"]
    assert messages[-1] == {"role": "user", "content": "great soup\nOne of positive, negative:"}


def test_run_sync_works_inside_a_running_event_loop() -> None:
    # A notebook cell runs inside an event loop, where asyncio.run() refuses to start.
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert run_sync(answer()) == 42  # no loop running: plain asyncio.run

    async def notebook_cell() -> int:
        return run_sync(answer())

    assert asyncio.run(notebook_cell()) == 42

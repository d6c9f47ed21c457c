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
    combine_rounds,
    compare_student_teacher,
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
    assert "not faster" not in md
    # Relative to bench/, where summary.md sits next to the plots (report.md rebases them).
    assert "![latency vs throughput](latency_vs_throughput.png)" in md
    assert "![TTFT distribution](ttft_distribution.png)" in md
    assert r.point("teacher", concurrency=4).endpoint == "teacher"


def test_rounds_combine_into_medians_with_their_range() -> None:
    rounds = [_point("student", 16, rps, 0.1) for rps in (10.0, 14.0, 11.0)]
    p = combine_rounds(rounds)
    assert p.rounds == 3 and p.request_throughput == pytest.approx(11.0)
    assert p.spread("request_throughput") == pytest.approx((10.0, 14.0))
    assert p.num_requests == 12 and p.completed == 12 and p.errors == 0  # counts are summed
    assert len(p.ttfts_ms) == sum(len(r.ttfts_ms) for r in rounds)
    with pytest.raises(ValueError):
        combine_rounds([_point("student", 16, 1.0, 0.1), _point("teacher", 16, 1.0, 0.1)])


def _both(student_rps: list[float], teacher_rps: list[float], c: int = 16) -> BenchResult:
    return BenchResult(
        points=[combine_rounds([_point("student", c, x, 0.1) for x in student_rps]),
                combine_rounds([_point("teacher", c, x, 0.1) for x in teacher_rps])],
        endpoints=["student", "teacher"],
    )


EPS = [EndpointConfig(name=n, base_url="http://127.0.0.1:8000/v1", model=n) for n in ("student", "teacher")]


def test_a_student_slower_than_the_teacher_is_flagged_in_words() -> None:
    """The quickstart's inversion (student 12.03 req/s vs teacher 15.85 at c=16) is said in words,
    with the likely cause; overlapping rounds point at the shared machine."""
    apart = _both([12.0, 12.03, 12.5], [15.5, 15.85, 16.2])
    (line,) = compare_student_teacher(apart, EPS)
    assert "**The student is not faster than the teacher at c=16**" in line
    assert "12.03 req/s (12.00–12.50) vs the teacher's 15.85 (15.50–16.20)" in line
    assert "overhead-bound at this size" in line and "share its cores" in line
    (line,) = compare_student_teacher(_both([12.0, 12.03, 17.0], [11.0, 15.85, 16.2]), EPS)
    assert "not faster" in line and "ranges overlap" in line and "shared machine" in line
    md = summary_markdown(apart, EPS, {"num_prompts": 4, "max_tokens": 5, "ignore_eos": True, "rounds": 3})
    assert "not faster than the teacher at c=16" in md
    assert "3 rounds per load level" in md and "| 12.03 (12.00–12.50) |" in md
    assert compare_student_teacher(_both([20.0, 21.0, 22.0], [15.5, 15.85, 16.2]), EPS)[0].endswith("rounds).")


def test_sweep_alternates_endpoints_round_by_round(monkeypatch) -> None:
    """A B A B at each load, 3 rounds by default, one combined point per endpoint and load."""
    from distray.bench import load

    calls: list[tuple[str, int | None]] = []

    def fake_point(ep: EndpointConfig, prompts: list, *, concurrency: int | None = None, **kw: object) -> SweepPoint:
        calls.append((ep.name, concurrency))
        return _point(ep.name, concurrency or 0, 4.0, 0.1)

    monkeypatch.setattr(load, "warm_up", lambda *a, **k: 0.0)
    monkeypatch.setattr(load, "run_point", fake_point)
    r = load.bench_endpoints(EPS, [[{"role": "user", "content": "hi"}]], concurrency=[1, 4])
    assert calls == [("student", 1), ("teacher", 1)] * 3 + [("student", 4), ("teacher", 4)] * 3
    assert [(p.endpoint, p.load, p.rounds) for p in r.points] == [
        ("student", "c=1", 3), ("teacher", "c=1", 3), ("student", "c=4", 3), ("teacher", "c=4", 3)]
    assert config_from_dict({}).bench.rounds == 3


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

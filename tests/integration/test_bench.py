"""distray bench for real: a sweep against the served tiny model, and the metric math vs vLLM's.

    .venv/bin/python -m pytest tests/integration/test_bench.py -x -q

Uses the `served` fixture of test_serve.py (deployed for this module, shut down after it).
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from test_serve import served  # noqa: F401  (deployed once for this module)

from distray import bench
from distray.config import EndpointConfig
from distray.errors import StageError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_20_requests_every_metric_positive_no_errors(served, tmp_path) -> None:  # noqa: F811
    prompts = bench.generated_prompts(20, seed=1)
    r = bench.bench_endpoints([served["endpoint"]], prompts, concurrency=[4], max_tokens=8,
                              timeout_s=120, out_dir=str(tmp_path))
    (p,) = r.points
    assert p.completed == 20 and p.errors == 0, p.error_samples
    assert p.total_output_tokens == 20 * 8  # ignore_eos: exactly max_tokens each
    for stat in ("mean", "median", "p90", "p99"):
        for m in bench.METRICS:
            assert getattr(p, f"{stat}_{m}_ms") > 0, f"{stat}_{m}_ms"
    assert p.request_throughput > 0 and p.output_throughput > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["points"][0]["median_ttft_ms"] == pytest.approx(p.median_ttft_ms)
    assert len(saved["points"][0]["ttfts_ms"]) == 20
    for png in ("latency_vs_throughput.png", "ttft_distribution.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| student | c=4 |" in (tmp_path / "summary.md").read_text()


def test_bench_stage_writes_the_run_outputs(served) -> None:  # noqa: F811
    from distray.paths import RunPaths

    cfg = served["cfg"].model_copy(deep=True)
    cfg.bench.endpoints = [served["endpoint"]]
    cfg.bench.num_prompts = 8
    cfg.bench.max_tokens = 4
    cfg.bench.concurrency = [2]
    cfg.bench.request_rates = [20.0]
    r = bench.run(cfg)
    paths = RunPaths(cfg.run_dir)
    assert r.results_json == paths.bench_results and os.path.exists(paths.bench_results)
    assert r.summary_md == paths.bench_summary
    summary = open(paths.bench_summary).read()
    assert "| student | c=2 |" in summary and "| student | r=20/s |" in summary
    assert "](latency_vs_throughput.png)" in summary  # relative to bench/ (report.md rebases them)
    assert [p.errors for p in r.points] == [0, 0]


def test_warm_up_fails_fast_and_says_what_to_check(served) -> None:  # noqa: F811
    ep = served["endpoint"]
    msgs = [{"role": "user", "content": "hi"}]
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="cannot connect.*distray serve"):
        bench.warm_up(ep.model_copy(update={"base_url": "http://127.0.0.1:9/v1"}), msgs,
                      timeout_s=60, ignore_eos=True)
    assert time.perf_counter() - t0 < 15
    with pytest.raises(StageError, match=r"404.*serves \['student'\]"):
        bench.warm_up(ep.model_copy(update={"model": "nope"}), msgs, timeout_s=60, ignore_eos=True)
    with pytest.raises(StageError, match="401.*api_key_env"):
        bench.warm_up(ep.model_copy(update={"api_key_env": None}), msgs, timeout_s=60,
                      ignore_eos=True)


def test_compute_metrics_matches_vllm_calculate_metrics() -> None:
    """distray's metric math against vLLM's own, on the same synthetic outcomes."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    rng = random.Random(0)
    outs = []
    for i in range(40):
        n = rng.randint(1, 12)
        itl = [rng.uniform(0.001, 0.05) for _ in range(n - 1)]
        ttft = rng.uniform(0.01, 0.3)
        outs.append(RequestFuncOutput(
            success=i % 9 != 0, latency=ttft + sum(itl), ttft=ttft, itl=itl,
            output_tokens=n if i % 7 else 0, prompt_len=rng.randint(3, 50), start_time=i * 0.01,
        ))
    theirs, _ = calculate_metrics(input_requests=[], outputs=outs, dur_s=3.0, tokenizer=None,
                                  selected_percentiles=[90.0, 99.0], goodput_config_dict={})
    ours = bench.compute_metrics(outs, 3.0)
    assert ours["completed"] == theirs.completed and ours["errors"] == theirs.failed
    assert ours["total_output_tokens"] == theirs.total_output
    assert ours["total_input_tokens"] == theirs.total_input
    for k in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert ours[k] == pytest.approx(getattr(theirs, k))
    for m in bench.METRICS:
        assert ours[f"mean_{m}_ms"] == pytest.approx(getattr(theirs, f"mean_{m}_ms"))
        assert ours[f"median_{m}_ms"] == pytest.approx(getattr(theirs, f"median_{m}_ms"))
        pct = dict(getattr(theirs, f"percentiles_{m}_ms"))
        assert ours[f"p90_{m}_ms"] == pytest.approx(pct[90.0])
        assert ours[f"p99_{m}_ms"] == pytest.approx(pct[99.0])


def test_unreachable_endpoint_in_config_is_a_stage_error(tmp_path) -> None:
    from distray.config import config_from_dict

    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path)},
        "bench": {"endpoints": [EndpointConfig(name="x", base_url="http://127.0.0.1:9/v1",
                                               model="m").model_dump()],
                  "num_prompts": 2},
    })
    with pytest.raises(StageError, match="cannot connect"):
        bench.run(cfg)

"""Load benchmark of OpenAI-compatible endpoints: a concurrency and/or Poisson request-rate sweep.

    distray bench --config run.yaml
    distray bench --config run.yaml bench.concurrency=[1,4,16,64] bench.request_rates=[2,8]

Endpoints come from `bench.endpoints`, or default to what `distray serve` deploys for the run
(the student, and the teacher with `serve.serve_teacher`); when nothing answers there, `run`
deploys them for the benchmark and shuts them down afterwards.

Each load level runs `bench.rounds` rounds (3 by default), the endpoints' rounds alternating
(A B A B ...), so load from other processes drifts over both; a point's figures are the
medians over its rounds, with the min–max beside them. Where the student is not faster than
the teacher, the summary says so and names the likely cause.

Requests are sent with vLLM's own benchmark client (`vllm.benchmarks.lib.endpoint_request_func`:
streaming chat completions, TTFT at the first chunk, ITL between chunks, token counts from the
server's `usage`), and the metrics are computed as `vllm.benchmarks.serve.calculate_metrics`
does and named as it names them: `mean/median/p90/p99_{ttft,tpot,itl,e2el}_ms`,
`request_throughput` (req/s), `output_throughput` (output tok/s), plus `errors`. distray adds the
sweep around it, a fail-fast warm-up, and the report:

    <run>/bench/results.json               every sweep point, per-request TTFTs included
    <run>/bench/latency_vs_throughput.png  TTFT and end-to-end latency against throughput
    <run>/bench/ttft_distribution.png      TTFT CDF per endpoint and load
    <run>/bench/summary.md                 the table report.md includes
"""

from __future__ import annotations

import logging

from distray.bench.load import bench_endpoints, generated_prompts, load_prompts, run_point, warm_up
from distray.bench.metrics import (
    METRICS,
    PERCENTILES,
    BenchResult,
    SweepPoint,
    combine_rounds,
    compute_metrics,
)
from distray.bench.outputs import compare_student_teacher, summary_markdown
from distray.config import DistrayConfig
from distray.paths import RunPaths

__all__ = [
    "BenchResult",
    "SweepPoint",
    "PERCENTILES",
    "METRICS",
    "bench_endpoints",
    "combine_rounds",
    "compare_student_teacher",
    "compute_metrics",
    "generated_prompts",
    "load_prompts",
    "run",
    "run_point",
    "summary_markdown",
    "warm_up",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def _reachable(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url.rstrip("/") + "/models", timeout=5.0).status_code in (200, 401)
    except httpx.HTTPError:
        return False


def run(cfg: DistrayConfig, *, app_name: str | None = None) -> BenchResult:
    """Benchmark `bench.endpoints` (default: the served student/teacher) and write the report.

    With no `bench.endpoints`, the models are benchmarked where `distray serve` serves them; when
    nothing answers there, or when `app_name` is given, they are deployed for the benchmark with
    `distray.serve.deploy` and shut down afterwards.

    Args:
        cfg: the prepared config.
        app_name: deploy as this Serve app (route prefix `/<app_name>`) whatever else runs, so
            an app that `distray serve` runs is neither replaced nor deleted (`distray run`).

    Raises:
        ConfigError: no endpoints, or an API key env var is empty.
        StageError: a warm-up request failed.
        DataError: the prompt file has no valid rows.
    """
    from distray import serve

    b = cfg.bench
    prompts, source = load_prompts(cfg, b.num_prompts)
    endpoints = list(b.endpoints)
    deployed = False
    if not endpoints and app_name is not None:
        endpoints = serve.deploy(cfg, app_name=app_name, route_prefix=f"/{app_name}")
        deployed = True
    elif not endpoints:
        endpoints = serve.served_endpoints(cfg)
        if not _reachable(endpoints[0].base_url):
            logger.info("bench: nothing answers at %s; deploying the served models for the benchmark",
                        endpoints[0].base_url)
            endpoints = serve.deploy(cfg)
            deployed = True
    paths = RunPaths(cfg.run_dir)
    try:
        result = bench_endpoints(
            endpoints, prompts, concurrency=b.concurrency, request_rates=b.request_rates,
            max_tokens=b.max_tokens, timeout_s=b.timeout_s, ignore_eos=b.ignore_eos,
            seed=cfg.run.seed, out_dir=paths.bench, prompts_source=source, rounds=b.rounds,
        )
    finally:
        if deployed:
            serve.shutdown(app_name)
    logger.info(
        "bench: %d sweep points over %s in %.0f s -> %s, %s, %s",
        len(result.points), result.endpoints, result.duration_s, result.results_json,
        result.summary_md, ", ".join(result.plots),
    )
    return result


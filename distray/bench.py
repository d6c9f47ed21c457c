"""Load benchmark of OpenAI-compatible endpoints: a concurrency and/or Poisson request-rate sweep.

    distray bench --config run.yaml
    distray bench --config run.yaml bench.concurrency=[1,4,16,64] bench.request_rates=[2,8]

Endpoints come from `bench.endpoints`, or default to what `distray serve` deploys for the run
(the student, and the teacher with `serve.serve_teacher`); when nothing answers there, `run`
deploys them for the benchmark and shuts them down afterwards.

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

import asyncio
import concurrent.futures
import json
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from distray.config import DistrayConfig, EndpointConfig
from distray.errors import ConfigError, DataError, StageError
from distray.paths import RunPaths

__all__ = [
    "BenchResult",
    "SweepPoint",
    "PERCENTILES",
    "METRICS",
    "bench_endpoints",
    "compute_metrics",
    "load_prompts",
    "run",
    "summary_markdown",
    "warm_up",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

PERCENTILES = (90, 99)
# Latency metrics as vLLM names them: ttft (time to first token), tpot (time per output token
# after the first), itl (inter-token latency), e2el (end-to-end request latency).
METRICS = ("ttft", "tpot", "itl", "e2el")


# --------------------------------------------------------------------------------------------
# metric math (vLLM's definitions; pure, unit-tested, cross-checked against vLLM)
# --------------------------------------------------------------------------------------------


def compute_metrics(outputs: Sequence[Any], duration_s: float) -> dict[str, float | int]:
    """Summarise request outcomes the way `vllm.benchmarks.serve.calculate_metrics` does.

    Args:
        outputs: request outcomes with vLLM's `RequestFuncOutput` fields: `success`, `latency`
            (s), `ttft` (s), `itl` (list of s), `output_tokens`, `prompt_len`.
        duration_s: wall time of the whole sweep point.

    Returns:
        `completed`, `errors`, `total_input_tokens`, `total_output_tokens`,
        `request_throughput` (req/s), `output_throughput` (tok/s), `total_token_throughput`,
        and `mean_/median_/p90_/p99_` × `ttft/tpot/itl/e2el` `_ms`. A latency with no samples
        is 0, as in vLLM. TPOT counts only requests with more than one output token; a request
        whose server sent no usage counts one output token (vLLM without a tokenizer).
    """
    ttfts: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    total_in = total_out = completed = 0
    for o in outputs:
        if not o.success:
            continue
        out_len = o.output_tokens or 1
        total_out += out_len
        total_in += o.prompt_len or 0
        if out_len > 1:
            tpots.append((o.latency - o.ttft) / (out_len - 1))
        itls.extend(o.itl)
        ttfts.append(o.ttft)
        e2els.append(o.latency)
        completed += 1
    dur = max(duration_s, 1e-9)
    m: dict[str, float | int] = {
        "completed": completed,
        "errors": len(outputs) - completed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": completed / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    for name, xs in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        arr = np.asarray(xs or [0.0], dtype=float) * 1000.0
        m[f"mean_{name}_ms"] = float(np.mean(arr))
        m[f"median_{name}_ms"] = float(np.median(arr))
        for p in PERCENTILES:
            m[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return m


@dataclass
class SweepPoint:
    """One load level against one endpoint. Latencies in ms, throughputs per second."""

    endpoint: str
    model: str
    mode: str  # "concurrency" (closed loop) or "rate" (Poisson arrivals)
    concurrency: int | None
    request_rate_rps: float | None
    num_requests: int
    duration_s: float
    completed: int
    errors: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float
    median_ttft_ms: float
    p90_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    p90_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    p90_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    p90_e2el_ms: float
    p99_e2el_ms: float
    ttfts_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def load(self) -> str:
        """`c=16` or `r=4.0/s`."""
        if self.mode == "concurrency":
            return f"c={self.concurrency}"
        return f"r={self.request_rate_rps:g}/s"

    def line(self) -> str:
        """One dense progress line."""
        return (
            f"bench {self.endpoint} {self.load} | {self.completed}/{self.num_requests} ok | "
            f"{self.request_throughput:.2f} req/s | {self.output_throughput:.1f} tok/s | "
            f"TTFT p50 {self.median_ttft_ms:.0f} ms p99 {self.p99_ttft_ms:.0f} ms | "
            f"TPOT p50 {self.median_tpot_ms:.1f} ms | E2E p50 {self.median_e2el_ms:.0f} ms | "
            f"errors {self.errors}"
        )


@dataclass
class BenchResult:
    """What a benchmark run measured and wrote."""

    points: list[SweepPoint]
    endpoints: list[str]
    results_json: str | None = None
    summary_md: str | None = None
    plots: list[str] = field(default_factory=list)
    prompts_source: str = ""
    duration_s: float = 0.0

    def point(self, endpoint: str, *, concurrency: int | None = None, rate: float | None = None) -> SweepPoint:
        """The sweep point of `endpoint` at a concurrency or a request rate."""
        for p in self.points:
            if p.endpoint == endpoint and (
                (concurrency is not None and p.concurrency == concurrency)
                or (rate is not None and p.request_rate_rps == rate)
            ):
                return p
        raise KeyError(f"no sweep point for {endpoint} at concurrency={concurrency} rate={rate}")


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------

_TOPICS = (
    "the water cycle", "binary search", "photosynthesis", "the French revolution", "TCP handshakes",
    "compound interest", "plate tectonics", "hash tables", "the immune system", "supply and demand",
    "black holes", "garbage collection", "the printing press", "vaccines", "neural networks",
    "the Silk Road",
)
_ASKS = (
    "Explain {t} to a twelve-year-old.", "Write three bullet points about {t}.",
    "What is the most common misconception about {t}?", "Summarise {t} in two sentences.",
)


def generated_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` fixed chat prompts (same seed, same prompts) for when a run has no test data."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = _TOPICS[int(rng.integers(len(_TOPICS)))]
        a = _ASKS[int(rng.integers(len(_ASKS)))]
        out.append([{"role": "user", "content": a.format(t=t)}])
    return out


def load_prompts(cfg: DistrayConfig, n: int) -> tuple[list[list[dict[str, str]]], str]:
    """The fixed prompt set: `bench.prompts`, else the run's test data, else generated.

    Rows are read with the data contract (`formats.iter_input_rows`) and the prompts generate
    and evaluate send (`tasks.task_prompts`: `{labels}` filled, the chain-of-thought
    instruction added); a final assistant turn (the reference) is not sent. Fewer rows than
    `n` are cycled.

    Returns:
        (chat messages per request, a description of the source).

    Raises:
        DataError: the named prompt file has no valid rows.
    """
    from distray.formats import MESSAGES, iter_input_rows
    from distray.storage import exists
    from distray.tasks import task_prompts

    system_prompt, prompt_template = task_prompts(cfg.task)
    candidates = [cfg.bench.prompts, cfg.data.test]
    task_test = RunPaths(cfg.run_dir).task_split("test")
    candidates.append(task_test)
    for path in candidates:
        if path is None or (path == task_test and not exists(path)):
            continue
        rows = []
        for row, _rej in iter_input_rows(
            path, system_prompt=system_prompt, prompt_template=prompt_template
        ):
            if row is not None:
                rows.append(row[MESSAGES])
            if len(rows) >= n:
                break
        if not rows:
            raise DataError(f"prompt file `{path}` has no valid rows; check it with `distray data check {path}`")
        return [rows[i % len(rows)] for i in range(n)], path
    return generated_prompts(n, cfg.run.seed), f"generated ({n} prompts, seed {cfg.run.seed})"


# --------------------------------------------------------------------------------------------
# running the sweep
# --------------------------------------------------------------------------------------------


def _api_key(ep: EndpointConfig) -> str | None:
    if ep.api_key_env is None:
        return None
    key = os.environ.get(ep.api_key_env, "")
    if not key:
        raise ConfigError(
            f"endpoint `{ep.name}` reads its API key from ${ep.api_key_env}, which is empty; "
            f"export {ep.api_key_env}=<key>"
        )
    return key


def _headers(ep: EndpointConfig) -> dict[str, str]:
    key = _api_key(ep)
    return {"Authorization": f"Bearer {key}"} if key else {}


def warm_up(
    ep: EndpointConfig, messages: list[dict[str, str]], *, timeout_s: float, ignore_eos: bool
) -> float:
    """Send one streaming request and fail fast, saying what to check, when it does not work.

    Returns:
        The warm-up request's latency in seconds.

    Raises:
        StageError: the endpoint is unreachable, rejects the key, lacks the model, or errors.
    """
    import httpx

    url = ep.base_url.rstrip("/") + "/chat/completions"
    payload: dict[str, Any] = {
        "model": ep.model, "messages": messages, "max_completion_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True
    where = f"endpoint `{ep.name}` ({url}, model `{ep.model}`)"
    t0 = time.perf_counter()
    try:
        timeout = httpx.Timeout(timeout_s, connect=5.0)
        with httpx.Client(timeout=timeout) as client:
            with client.stream("POST", url, json=payload, headers=_headers(ep)) as r:
                body = r.read().decode("utf-8", "replace")
                status = r.status_code
            if status == 200 and "data:" in body:
                return time.perf_counter() - t0
            hint = ""
            if status == 401:
                hint = (
                    f"; the server wants an API key: set api_key_env of this endpoint to the "
                    f"env var holding it (now {ep.api_key_env!r})"
                )
            elif status == 404:
                try:
                    listed = [m["id"] for m in client.get(
                        ep.base_url.rstrip("/") + "/models", headers=_headers(ep)
                    ).json()["data"]]
                    hint = f"; the server serves {listed}"
                except Exception:
                    hint = "; check the model id and that base_url ends in /v1"
            elif status == 400 and ignore_eos:
                hint = "; if this is not a vLLM-based server, set bench.ignore_eos=false"
    except httpx.ConnectError as e:
        raise StageError(
            f"warm-up: cannot connect to {where}: {e}; start the server (`distray serve --config "
            "...`) or fix the endpoint's base_url"
        ) from e
    except httpx.TimeoutException as e:
        raise StageError(
            f"warm-up: {where} did not answer within {timeout_s:.0f} s; is the model still "
            "loading? raise bench.timeout_s or check the server's logs"
        ) from e
    except httpx.HTTPError as e:
        raise StageError(f"warm-up: request to {where} failed: {e}") from e
    raise StageError(f"warm-up: {where} answered HTTP {status}: {body[:400]}{hint}")


async def _run_point_async(
    ep: EndpointConfig,
    prompts: list[list[dict[str, str]]],
    *,
    concurrency: int | None,
    rate_rps: float | None,
    max_tokens: int,
    timeout_s: float,
    ignore_eos: bool,
    seed: int,
) -> tuple[list[Any], float]:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS, RequestFuncInput

    request_func = ASYNC_REQUEST_FUNCS["openai-chat"]
    api_url = ep.base_url.rstrip("/") + "/chat/completions"
    headers = _headers(ep)
    inputs = [
        RequestFuncInput(
            prompt="", chat_messages=msgs, api_url=api_url, prompt_len=0, output_len=max_tokens,
            model=ep.model, ignore_eos=ignore_eos, extra_headers=headers or None,
        )
        for msgs in prompts
    ]
    # Same connection handling as vllm.benchmarks.serve.benchmark: pooled keep-alive.
    connector = aiohttp.TCPConnector(
        limit=concurrency or 0, limit_per_host=concurrency or 0, keepalive_timeout=60,
        force_close=False,
    )
    sem = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(inp: Any, session: aiohttp.ClientSession) -> Any:
        if sem is None:
            return await request_func(request_func_input=inp, session=session)
        async with sem:
            return await request_func(request_func_input=inp, session=session)

    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=True
    ) as session:
        start = time.perf_counter()
        if rate_rps is None:
            outputs = await asyncio.gather(*(one(i, session) for i in inputs))
        else:
            # Poisson arrivals: exponential gaps, seeded so every endpoint sees the same schedule.
            gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, len(inputs))
            arrivals = np.cumsum(gaps) - gaps[0]
            tasks = []
            for inp, at in zip(inputs, arrivals, strict=True):
                delay = start + float(at) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(inp, session)))
            outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(outputs), duration


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run `coro` to completion from synchronous code and return its result.

    `asyncio.run` refuses to start inside a thread whose event loop is already running
    (a Jupyter notebook calling `job.run()`); there the coroutine gets its own loop in a
    worker thread, and this call blocks until it is done, as it does outside a notebook.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distray-bench") as pool:
        return pool.submit(asyncio.run, coro).result()


def run_point(
    ep: EndpointConfig,
    prompts: list[list[dict[str, str]]],
    *,
    concurrency: int | None = None,
    rate_rps: float | None = None,
    max_tokens: int = 64,
    timeout_s: float = 120.0,
    ignore_eos: bool = True,
    seed: int = 0,
) -> SweepPoint:
    """Run one sweep point (all `prompts`) against one endpoint and summarise it."""
    if (concurrency is None) == (rate_rps is None):
        raise ValueError("give exactly one of concurrency and rate_rps")
    outputs, duration = _run_sync(
        _run_point_async(
            ep, prompts, concurrency=concurrency, rate_rps=rate_rps, max_tokens=max_tokens,
            timeout_s=timeout_s, ignore_eos=ignore_eos, seed=seed,
        )
    )
    m = compute_metrics(outputs, duration)
    errors: list[str] = []
    for o in outputs:
        if not o.success and len(errors) < 3:
            errors.append((o.error or "unknown error").strip().splitlines()[-1][:300])
    return SweepPoint(
        endpoint=ep.name,
        model=ep.model,
        mode="concurrency" if concurrency is not None else "rate",
        concurrency=concurrency,
        request_rate_rps=rate_rps,
        num_requests=len(prompts),
        duration_s=duration,
        ttfts_ms=[round(o.ttft * 1000.0, 3) for o in outputs if o.success],
        error_samples=errors,
        **m,  # type: ignore[arg-type]
    )


def bench_endpoints(
    endpoints: Sequence[EndpointConfig],
    prompts: list[list[dict[str, str]]],
    *,
    concurrency: Sequence[int] = (1, 4, 16),
    request_rates: Sequence[float] = (),
    max_tokens: int = 64,
    timeout_s: float = 120.0,
    ignore_eos: bool = True,
    seed: int = 0,
    out_dir: str | None = None,
    prompts_source: str = "",
) -> BenchResult:
    """Warm up every endpoint, then run the sweep against each in turn.

    Args:
        endpoints: OpenAI-compatible endpoints (base_url ends in /v1).
        prompts: chat messages, one list per request; every sweep point sends all of them.
        concurrency: closed-loop levels (in-flight requests held constant).
        request_rates: Poisson arrival rates in req/s (open loop, unbounded concurrency).
        max_tokens: output tokens per request (with `ignore_eos`, exactly this many).
        timeout_s: per-request timeout; also the warm-up's.
        ignore_eos: ask vLLM-based servers to generate all `max_tokens` (stable TPOT/throughput).
        seed: Poisson schedule seed.
        out_dir: where results.json, plots and summary.md go; None writes nothing.
        prompts_source: described in results.json and the summary.

    Raises:
        ConfigError: an endpoint's API key env var is empty.
        StageError: a warm-up request failed (with what to check).
    """
    if not endpoints:
        raise ConfigError("no endpoints to benchmark; list them in bench.endpoints")
    if not concurrency and not request_rates:
        raise ConfigError("`bench.concurrency` and `bench.request_rates` are both empty; set one")
    t0 = time.perf_counter()
    for ep in endpoints:
        warm = warm_up(ep, prompts[0], timeout_s=timeout_s, ignore_eos=ignore_eos)
        logger.info("bench %s: warm-up ok in %.2f s", ep.name, warm)
    points: list[SweepPoint] = []
    for ep in endpoints:
        loads: list[tuple[int | None, float | None]] = [(c, None) for c in concurrency]
        loads += [(None, r) for r in request_rates]
        for c, r in loads:
            p = run_point(
                ep, prompts, concurrency=c, rate_rps=r, max_tokens=max_tokens,
                timeout_s=timeout_s, ignore_eos=ignore_eos, seed=seed,
            )
            logger.info("%s", p.line())
            points.append(p)
    result = BenchResult(
        points=points,
        endpoints=[ep.name for ep in endpoints],
        prompts_source=prompts_source,
        duration_s=time.perf_counter() - t0,
    )
    if out_dir is not None:
        settings = {
            "num_prompts": len(prompts), "max_tokens": max_tokens, "ignore_eos": ignore_eos,
            "concurrency": list(concurrency), "request_rates": list(request_rates),
            "timeout_s": timeout_s, "seed": seed,
        }
        _write_outputs(result, endpoints, settings, out_dir)
    return result


# --------------------------------------------------------------------------------------------
# outputs: results.json, plots, summary.md
# --------------------------------------------------------------------------------------------


def _plots(points: list[SweepPoint], endpoints: list[str]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Any] = {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in endpoints:
        for mode, marker in (("concurrency", "o"), ("rate", "s")):
            pts = [p for p in points if p.endpoint == name and p.mode == mode]
            if not pts:
                continue
            pts.sort(key=lambda p: p.request_throughput)
            x_tok = [p.output_throughput for p in pts]
            x_req = [p.request_throughput for p in pts]
            label = f"{name} ({'closed loop' if mode == 'concurrency' else 'Poisson'})"
            (line,) = ax1.plot(x_tok, [p.median_ttft_ms for p in pts], marker=marker, label=f"{label} p50")
            ax1.plot(x_tok, [p.p99_ttft_ms for p in pts], marker=marker, linestyle="--",
                     color=line.get_color(), alpha=0.6, label=f"{label} p99")
            ax2.plot(x_req, [p.median_e2el_ms for p in pts], marker=marker, color=line.get_color(), label=label)
            for p, x, y in zip(pts, x_req, [p.median_e2el_ms for p in pts], strict=True):
                ax2.annotate(p.load, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax1.set(xlabel="output throughput (tok/s)", ylabel="TTFT (ms)", title="TTFT vs throughput")
    ax2.set(xlabel="request throughput (req/s)", ylabel="median end-to-end latency (ms)",
            title="Latency vs throughput")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out["latency_vs_throughput.png"] = fig

    fig, axes = plt.subplots(1, len(endpoints), figsize=(5.5 * len(endpoints), 4), squeeze=False)
    for ax, name in zip(axes[0], endpoints, strict=True):
        for p in (p for p in points if p.endpoint == name):
            if p.ttfts_ms:
                xs = np.sort(p.ttfts_ms)
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=p.load)
        ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=f"TTFT distribution: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out["ttft_distribution.png"] = fig
    return out


def summary_markdown(result: BenchResult, endpoints: Sequence[EndpointConfig], settings: dict[str, Any]) -> str:
    """The benchmark as markdown: settings, one table row per sweep point, ratios, plots.

    Image links are relative to the summary's own folder (it sits next to the plots), so the
    file reads on its own; report.md rewrites them when it includes the summary.
    """
    eps = ", ".join(f"`{e.name}` ({e.base_url}, model `{e.model}`)" for e in endpoints)
    lines = [
        "## Serving benchmark",
        "",
        f"Endpoints: {eps}. {settings['num_prompts']} requests per load level, "
        f"{settings['max_tokens']} output tokens each"
        f"{' (ignore_eos)' if settings['ignore_eos'] else ''}; prompts: {result.prompts_source or 'given'}. "
        "Latencies in ms (vLLM's definitions: TTFT to the first streamed chunk, TPOT per output "
        "token after the first, ITL between chunks, E2E per request).",
        "",
        "| endpoint | load | req/s | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | E2E p50 | E2E p99 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result.points:
        lines.append(
            f"| {p.endpoint} | {p.load} | {p.request_throughput:.2f} | {p.output_throughput:.1f} | "
            f"{p.median_ttft_ms:.0f} | {p.p99_ttft_ms:.0f} | {p.median_tpot_ms:.1f} | "
            f"{p.median_itl_ms:.1f} | {p.median_e2el_ms:.0f} | {p.p99_e2el_ms:.0f} | {p.errors} |"
        )
    names = result.endpoints
    if "student" in names and "teacher" in names:
        for p in (p for p in result.points if p.endpoint == "student"):
            q = next((q for q in result.points if q.endpoint == "teacher" and q.load == p.load), None)
            if q and q.request_throughput > 0 and q.median_ttft_ms > 0:
                lines.append("")
                lines.append(
                    f"Student vs teacher at {p.load}: {p.request_throughput / q.request_throughput:.2f}× "
                    f"request throughput, {p.median_ttft_ms / q.median_ttft_ms:.2f}× p50 TTFT."
                )
    errs = [(p, e) for p in result.points for e in p.error_samples[:1]]
    if errs:
        lines += ["", "Errors (first per load level):"]
        lines += [f"- {p.endpoint} {p.load}: {e}" for p, e in errs]
    lines += [
        "",
        "![latency vs throughput](latency_vs_throughput.png)",
        "",
        "![TTFT distribution](ttft_distribution.png)",
        "",
    ]
    return "\n".join(lines)


def _write_outputs(
    result: BenchResult, endpoints: Sequence[EndpointConfig], settings: dict[str, Any], out_dir: str
) -> None:
    from distray.storage import write_png, write_text

    out_dir = out_dir.rstrip("/")
    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:  # pragma: no cover
        vllm_version = None
    payload = {
        "endpoints": [e.model_dump() for e in endpoints],
        "settings": settings,
        "prompts_source": result.prompts_source,
        "client": f"vllm.benchmarks.lib.endpoint_request_func (vllm {vllm_version})",
        "duration_s": result.duration_s,
        "points": [asdict(p) for p in result.points],
    }
    result.results_json = f"{out_dir}/results.json"
    write_text(result.results_json, json.dumps(payload, indent=1))
    for name, fig in _plots(result.points, result.endpoints).items():
        result.plots.append(write_png(f"{out_dir}/{name}", fig))
    result.summary_md = f"{out_dir}/summary.md"
    write_text(result.summary_md, summary_markdown(result, endpoints, settings))


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
            seed=cfg.run.seed, out_dir=paths.bench, prompts_source=source,
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

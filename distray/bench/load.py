"""The load: the prompts, a fail-fast warm-up, and the concurrency / request-rate sweep."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from distray.bench.metrics import BenchResult, SweepPoint, combine_rounds, compute_metrics
from distray.bench.outputs import write_outputs
from distray.config import DistrayConfig, EndpointConfig
from distray.errors import ConfigError, DataError, StageError
from distray.paths import RunPaths

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


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
    from distray.formats import MESSAGES
    from distray.inputs import iter_input_rows
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


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
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
    outputs, duration = run_sync(
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
    rounds: int = 3,
) -> BenchResult:
    """Warm up every endpoint, then run the sweep: at each load, `rounds` rounds per endpoint,
    the endpoints alternating (A B A B ...), combined into one point per endpoint and load.

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
        rounds: rounds per endpoint and load; each point's figures are their medians.

    Raises:
        ConfigError: an endpoint's API key env var is empty.
        StageError: a warm-up request failed (with what to check).
    """
    if not endpoints:
        raise ConfigError("no endpoints to benchmark; list them in bench.endpoints")
    if not concurrency and not request_rates:
        raise ConfigError("`bench.concurrency` and `bench.request_rates` are both empty; set one")
    if rounds < 1:
        raise ConfigError(f"`bench.rounds` must be at least 1, got {rounds}")
    t0 = time.perf_counter()
    for ep in endpoints:
        warm = warm_up(ep, prompts[0], timeout_s=timeout_s, ignore_eos=ignore_eos)
        logger.info("bench %s: warm-up ok in %.2f s", ep.name, warm)
    points: list[SweepPoint] = []
    loads: list[tuple[int | None, float | None]] = [(c, None) for c in concurrency]
    loads += [(None, r) for r in request_rates]
    for c, r in loads:
        # Rounds alternate between endpoints at each load (A B A B ...): a neighbour that
        # takes the cores for a while slows a round of each, not every round of one.
        per_endpoint: dict[str, list[SweepPoint]] = {ep.name: [] for ep in endpoints}
        for i in range(rounds):
            for ep in endpoints:
                p = run_point(
                    ep, prompts, concurrency=c, rate_rps=r, max_tokens=max_tokens,
                    timeout_s=timeout_s, ignore_eos=ignore_eos, seed=seed,
                )
                logger.info("%s (round %d/%d)", p.line(), i + 1, rounds)
                per_endpoint[ep.name].append(p)
        points += [combine_rounds(per_endpoint[ep.name]) for ep in endpoints]
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
            "timeout_s": timeout_s, "seed": seed, "rounds": rounds,
        }
        write_outputs(result, endpoints, settings, out_dir)
    return result



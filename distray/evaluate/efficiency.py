"""Efficiency figures of one model, measured the same way for every model on the same machine.

    python -m distray.evaluate.efficiency MODEL_DIR --backend hf --prompt "rev abcde="

Figures (field names carry their units):
- `parameters`, `weights_mb`: unique parameter count, and parameter + buffer bytes, of the model
  built by transformers on the meta device in its stored dtype (no memory is allocated, so this is
  exact and free). This is the `memory` figure that reductions are computed from: engine memory
  is dominated by the KV cache the engine preallocates (VLLM_CPU_KVCACHE_SPACE on CPU,
  gpu_memory_utilization on GPU), which is a setting, not a property of the model.
- `peak_rss_mb`: peak resident memory of a fresh process (a Ray task that runs once, then exits)
  while it loads the model in the evaluate backend and runs the latency and throughput
  requests, minus the process's resident memory just before loading. It includes the engine's
  preallocations. `peak_gpu_mb` is torch's peak allocated CUDA memory in that process (GPU only).
- `latency_ms` / `latency_p90_ms`: single-request end-to-end latency, median / p90 of N greedy
  requests sent one at a time (one warm-up request first, not counted). They run free: each
  answer ends at its eos or at max_tokens (`latency_output_tokens` is their mean length).
- `ttft_ms`: median latency of the same requests cut to one output token (prefill + first token).
- `tpot_ms`: time per output token after the first, free-running: median over the requests of
  (latency − that prompt's ttft) / (output tokens − 1).
- `equal_length_latency_ms`, `equal_length_tpot_ms`: the same requests with `ignore_eos` and
  `equal_length_tokens` output tokens, so every model writes exactly as many tokens: a model
  that stops early does not look faster per request, nor one that rambles to max_tokens
  cheaper per token. The three requests of a prompt run back to back, so drift hits all alike.
- `throughput_rows_per_s`, `output_tokens_per_s`: one batch over the test prompts, timed from
  submit to the last answer.

With `with_answers=True` that batch's greedy answers come back too (`Efficiency.answers`, ids
and text per prompt), and evaluate scores them instead of answering the test prompts again
through generate's Ray Data path: one engine start per model instead of two.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "Efficiency",
    "count_parameters",
    "measure_local",
    "measure_local_remote",
    "measure_api",
    "percentile",
    "tpot_ms",
]


@dataclass
class Efficiency:
    """Efficiency figures of one model (None where a figure does not apply, e.g. API models)."""

    parameters: int | None = None
    weights_mb: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    load_s: float | None = None
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_samples: int = 0
    latency_output_tokens: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    equal_length_tokens: int | None = None
    equal_length_latency_ms: float | None = None
    equal_length_tpot_ms: float | None = None
    throughput_rows_per_s: float | None = None
    output_tokens_per_s: float | None = None
    throughput_rows: int = 0
    backend: str | None = None
    method: dict[str, str] = field(default_factory=dict)
    #: The throughput batch's answers, `{"token_ids", "text"}` per prompt (`with_answers`).
    answers: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def count_parameters(model_dir: str, trust_remote_code: bool = False) -> tuple[int, float]:
    """Unique parameters and parameter + buffer MiB of a HF model folder, without loading it.

    The model is built on the meta device in its stored dtype (config `dtype`/`torch_dtype`,
    float32 when unset), so tied weights are counted once and nothing is allocated.

    Returns:
        `(parameters, weights_mb)`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    n_params = sum(p.numel() for p in params.values())
    n_bytes = sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])
    return int(n_params), n_bytes / 2**20


def _status_kb(key: str) -> int | None:
    """A `/proc/self/status` figure in kB (VmRSS, VmHWM); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0), so the peak counts from here.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _render_ids(tokenizer: Any, messages: list[dict[str, str]], use_chat_template: bool) -> list[int]:
    """Prompt token ids exactly as the generate engines build them."""
    from distray.prompts import render_prompt

    return render_prompt(tokenizer, messages, use_chat_template)[1]


def measure_local(
    model_dir: str,
    prompts: list[list[dict[str, str]]],
    *,
    backend: str = "hf",
    max_tokens: int = 32,
    latency_samples: int = 5,
    throughput_rows: int | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    batch_size: int = 16,
    use_chat_template: bool = True,
    trust_remote_code: bool = False,
    equal_length_tokens: int | None = None,
    with_answers: bool = False,
) -> Efficiency:
    """Load a local model in this process and measure memory, latency and throughput.

    Meant to run in a fresh process (see `measure_local_remote`), so the peak resident memory
    is this model's alone.

    Args:
        model_dir: a HF model folder.
        prompts: chat prompts (lists of {role, content}); latency cycles through them, the batch
            uses the first `throughput_rows` (all by default).
        backend: `vllm` (an in-process `vllm.LLM`) or `hf` (transformers generate).
        max_tokens: greedy tokens per answer.
        latency_samples: single requests timed (after one warm-up).
        throughput_rows: rows in the timed batch.
        engine_kwargs: vLLM settings (enforce_eager, max_model_len, ...).
        batch_size: rows per transformers generate call (hf).
        use_chat_template: render prompts with the tokenizer's chat template.
        trust_remote_code: allow model code from the folder.
        equal_length_tokens: output tokens of the equal-length requests (ignore_eos); None
            uses `max_tokens`, 0 skips them.
        with_answers: keep the throughput batch's greedy answers (`Efficiency.answers`).
    """
    if not prompts:
        raise ValueError("measure_local needs at least one prompt")
    eff = Efficiency(backend=backend)
    eff.parameters, eff.weights_mb = count_parameters(model_dir, trust_remote_code)
    batch_prompts = prompts[: throughput_rows or len(prompts)]
    import torch

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _status_kb("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    if backend == "vllm":
        one, batch = _vllm_engine(model_dir, max_tokens, engine_kwargs or {}, use_chat_template, trust_remote_code)
    elif backend == "hf":
        one, batch = _hf_engine(model_dir, max_tokens, batch_size, use_chat_template, trust_remote_code)
    else:
        raise ValueError(f"unknown backend {backend!r}; use vllm or hf")
    eff.load_s = time.perf_counter() - t0

    equal = max_tokens if equal_length_tokens is None else equal_length_tokens
    one(prompts[0])  # warm-up: first-call compilation and allocations are not latency
    lat = _latency(one, prompts, latency_samples, equal)
    _set_latency(eff, lat, equal)

    t = time.perf_counter()
    answers = batch(batch_prompts)
    wall = time.perf_counter() - t
    out_tokens = sum(len(a["token_ids"]) for a in answers)
    if with_answers:
        eff.answers = answers
    eff.throughput_rows = len(batch_prompts)
    eff.throughput_rows_per_s = len(batch_prompts) / wall
    eff.output_tokens_per_s = out_tokens / wall

    hwm = _status_kb("VmHWM")
    if rss0 is not None and hwm is not None:
        eff.peak_rss_mb = max(0, hwm - rss0) / 1024.0
    if gpu:
        eff.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    eff.method = {
        "weights_mb": "parameter + buffer bytes of the model built on the meta device (stored dtype)",
        "peak_rss_mb": f"peak RSS of a fresh process during load + requests ({backend}), "
        "minus RSS before load; includes engine preallocation",
        "latency_ms": f"median of {len(lat)} single greedy requests, max_tokens={max_tokens}",
        "tpot_ms": "median of (latency - ttft) / (output tokens - 1); ttft: the same request "
        "cut to 1 output token",
        "equal_length": f"the same requests with ignore_eos and exactly {equal} output tokens"
        if equal else "off (evaluate.equal_length_tokens: 0)",
        "throughput": f"one batch of {len(batch_prompts)} rows, wall time submit to last answer",
    }
    return eff


@dataclass
class LatencySample:
    """One prompt's three back-to-back requests (ms) and output lengths (tokens)."""

    first_ms: float
    free_ms: float
    free_tokens: int
    equal_ms: float | None = None
    equal_tokens: int = 0


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args, **kwargs)
    return (time.perf_counter() - t) * 1000.0, int(n)


def _latency(one: Any, prompts: list[list[dict[str, str]]], samples: int, equal: int) -> list[LatencySample]:
    """Per prompt: one token (ttft), free-running, then `equal` tokens with ignore_eos."""
    out = []
    for i in range(samples):
        msgs = prompts[i % len(prompts)]
        first_ms, _ = _timed(one, msgs, max_tokens=1)
        free_ms, free_n = _timed(one, msgs)
        s = LatencySample(first_ms, free_ms, free_n)
        if equal:
            s.equal_ms, s.equal_tokens = _timed(one, msgs, max_tokens=equal, ignore_eos=True)
        out.append(s)
    return out


def tpot_ms(latency_ms: float, ttft_ms: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (latency − ttft) / (tokens − 1); None under 2
    tokens. Clamped at 0, where timing noise exceeds the decode time."""
    if output_tokens < 2:
        return None
    return max(0.0, latency_ms - ttft_ms) / (output_tokens - 1)


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _set_latency(eff: Efficiency, lat: list[LatencySample], equal: int) -> None:
    free = [s.free_ms for s in lat]
    eff.latency_ms = statistics.median(free)
    eff.latency_p90_ms = percentile(free, 90)
    eff.latency_samples = len(lat)
    eff.latency_output_tokens = sum(s.free_tokens for s in lat) / len(lat)
    eff.ttft_ms = statistics.median(s.first_ms for s in lat)
    eff.tpot_ms = _median([tpot_ms(s.free_ms, s.first_ms, s.free_tokens) for s in lat])
    if equal:
        eff.equal_length_tokens = min(s.equal_tokens for s in lat)
        eff.equal_length_latency_ms = _median([s.equal_ms for s in lat])
        eff.equal_length_tpot_ms = _median(
            [tpot_ms(s.equal_ms, s.first_ms, s.equal_tokens) for s in lat if s.equal_ms is not None]
        )


def _vllm_engine(
    model_dir: str,
    max_tokens: int,
    engine_kwargs: dict[str, Any],
    use_chat_template: bool,
    trust_remote_code: bool,
) -> tuple[Any, Any]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(
            "evaluate.backend is `vllm` but vllm is not installed; pip install 'distray[cpu]' "
            "(or [gpu]), or set evaluate.backend: hf"
        ) from e
    import torch

    kwargs = {"enforce_eager": not torch.cuda.is_available(), **engine_kwargs}
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    llm = LLM(model=model_dir, **kwargs)
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def _prompts(msgs: list[list[dict[str, str]]]) -> list[Any]:
        return [{"prompt_token_ids": _render_ids(tok, m, use_chat_template)} for m in msgs]

    def one(messages: list[dict[str, str]], max_tokens: int = max_tokens, ignore_eos: bool = False) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        out = llm.generate(_prompts([messages]), params, use_tqdm=False)
        return len(out[0].outputs[0].token_ids)

    def batch(msgs: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
        outs = llm.generate(_prompts(msgs), sp, use_tqdm=False)
        return [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outs]

    return one, batch


def _hf_engine(
    model_dir: str,
    max_tokens: int,
    batch_size: int,
    use_chat_template: bool,
    trust_remote_code: bool,
) -> tuple[Any, Any]:
    from distray.hf_engine import HFEngine

    engine = HFEngine(model_dir, trust_remote_code=trust_remote_code)

    def _gen(msgs: list[list[dict[str, str]]], n: int = max_tokens) -> list[dict[str, Any]]:
        ids = [_render_ids(engine.tok, m, use_chat_template) for m in msgs]
        # Greedy; each answer's ids end at its first eos (kept), so padding is not counted.
        return [{"token_ids": a.token_ids, "text": a.text} for a in engine.generate(ids, max_tokens=n)]

    def one(messages: list[dict[str, str]], max_tokens: int = max_tokens, ignore_eos: bool = False) -> int:
        if ignore_eos:
            return _fixed_length(engine, _render_ids(engine.tok, messages, use_chat_template), max_tokens)
        return len(_gen([messages], max_tokens)[0]["token_ids"])

    def batch(msgs: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
        return [a for i in range(0, len(msgs), batch_size) for a in _gen(msgs[i : i + batch_size])]

    return one, batch


def _fixed_length(engine: Any, prompt_ids: list[int], n: int) -> int:
    """Greedy decoding of exactly `n` new tokens (fewer only where the context ends): the
    transformers generate loop of `HFEngine.generate` with the eos masked (`min_new_tokens`),
    vLLM's `ignore_eos`."""
    import torch

    if engine.max_model_len is not None:
        n = max(1, min(n, engine.max_model_len - len(prompt_ids)))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=engine.device)
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=engine.pad_id,
            eos_token_id=sorted(engine.eos) or None,
        )
    return int(out.shape[1] - len(prompt_ids))


def measure_local_remote(
    model_dir: str,
    prompts: list[list[dict[str, str]]],
    *,
    num_gpus: float = 0.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> Efficiency:
    """`measure_local` in a fresh Ray worker process that exits afterwards (`max_calls=1`).

    The vLLM engine runs inside that process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so its memory
    is the process's memory.
    """
    import ray

    env_vars = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}

    @ray.remote(num_cpus=1, num_gpus=num_gpus, max_calls=1)
    def _measure(model_dir: str, prompts: list[list[dict[str, str]]], kwargs: dict[str, Any]) -> dict[str, Any]:
        return measure_local(model_dir, prompts, **kwargs).to_dict()

    ref = _measure.options(runtime_env={"env_vars": env_vars}).remote(model_dir, prompts, kwargs)
    return Efficiency(**ray.get(ref))


def measure_api(
    base_url: str,
    model: str,
    prompts: list[list[dict[str, str]]],
    *,
    api_key: str | None = None,
    max_tokens: int = 32,
    latency_samples: int = 5,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    backoff_base_s: float = 0.5,
    backoff_max_s: float = 30.0,
    transport: Any = None,
) -> Efficiency:
    """Single-request latency of an OpenAI-compatible endpoint (parameters and memory unknown).

    Throughput is left to the caller: for an API model it is the prediction run's rows/s.
    429, 408, 409, 5xx, timeouts and dropped connections are retried up to `max_retries` times
    with the openai teacher's backoff, `distray.http_retry` (a Retry-After is a floor on the
    wait, up to `backoff_max_s`). A request that still fails, or fails with another 4xx, leaves the latency
    figures None, with a warning naming the URL and the error: the predictions are already
    made, and one busy probe should not discard them.

    Args:
        base_url: the endpoint's `/v1` URL.
        model: the model name to send.
        prompts: chat prompts; requests cycle through them.
        api_key: sent as a Bearer token when set.
        max_tokens: greedy tokens per answer.
        latency_samples: requests timed (after one warm-up).
        timeout_s: timeout of one request.
        max_retries: retries of one request.
        backoff_base_s: first retry delay; doubles, with full jitter.
        backoff_max_s: longest retry delay.
        transport: an `httpx.BaseTransport` for the client (tests pass `httpx.MockTransport`).
    """
    import httpx

    from distray.http_retry import backoff_s, retry_after_s, retryable_status

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"
    eff = Efficiency(backend="openai")
    lat: list[float] = []
    with httpx.Client(timeout=timeout_s, headers=headers, transport=transport) as client:
        for i in range(latency_samples + 1):
            body = {
                "model": model,
                "messages": prompts[i % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            for attempt in range(max_retries + 1):
                retry_after = None
                t = time.perf_counter()
                try:
                    r = client.post(url, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    error, retryable = f"{type(e).__name__}: {e}", True
                else:
                    if r.status_code == 200:
                        break
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                    retryable = retryable_status(r.status_code)
                    retry_after = retry_after_s(r.headers)
                if not retryable or attempt == max_retries:
                    logger.warning(
                        "latency probe of %s failed after %d attempts (%s); latency_ms is left "
                        "empty for this model", url, attempt + 1, error,
                    )
                    eff.method = {"latency_ms": f"not measured: {url} answered {error}"}
                    return eff
                # A Retry-After longer than backoff_max_s is not worth waiting for in a probe.
                time.sleep(min(backoff_max_s, backoff_s(attempt, backoff_base_s, backoff_max_s, retry_after)))
            if i:  # the first request warms connections up
                lat.append((time.perf_counter() - t) * 1000.0)
    eff.latency_ms = statistics.median(lat) if lat else None
    eff.latency_p90_ms = percentile(lat, 90)
    eff.latency_samples = len(lat)
    eff.method = {"latency_ms": f"median of {len(lat)} sequential chat requests to {url}"}
    return eff


def main(argv: list[str] | None = None) -> None:
    """Measure one local model from the command line and print the figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--backend", choices=["vllm", "hf"], default="hf")
    p.add_argument("--prompt", action="append", default=None, help="a user prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--latency-samples", type=int, default=5)
    p.add_argument("--equal-length-tokens", type=int, default=None,
                   help="output tokens of the ignore_eos requests (default --max-tokens; 0: off)")
    args = p.parse_args(argv)
    prompts = [[{"role": "user", "content": t}] for t in (args.prompt or ["Hello"])]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    eff = measure_local(
        args.model_dir,
        prompts,
        backend=args.backend,
        max_tokens=args.max_tokens,
        latency_samples=args.latency_samples,
        equal_length_tokens=args.equal_length_tokens,
    )
    print(json.dumps(eff.to_dict(), indent=2))


if __name__ == "__main__":
    main()

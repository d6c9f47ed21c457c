"""The benchmark's figures: vLLM's metric definitions, one sweep point, the whole result."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

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
    #: Rounds this point combines (`combine_rounds`): counts are summed over them, rates and
    #: latencies are the median of the rounds' figures.
    rounds: int = 1
    #: Each round's figure, for `SPREAD` metrics: the min–max the summary prints.
    round_figures: dict[str, list[float]] = field(default_factory=dict)

    def spread(self, metric: str) -> tuple[float, float]:
        """(min, max) of `metric` over the rounds; the point's own value with one round."""
        xs = self.round_figures.get(metric) or [float(getattr(self, metric))]
        return min(xs), max(xs)

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


#: The figures whose per-round values a combined point keeps (`SweepPoint.round_figures`).
SPREAD = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
          "median_e2el_ms", "p99_e2el_ms")
#: Fields that count requests or tokens: summed over rounds, not medians.
_SUMMED = ("num_requests", "duration_s", "completed", "errors", "total_input_tokens",
           "total_output_tokens")


def combine_rounds(rounds: Sequence[SweepPoint]) -> SweepPoint:
    """One sweep point from several rounds of the same endpoint and load.

    Rates and latencies are the median over rounds (one slow round, when another process took
    the cores, moves a median less than a mean); counts are summed; the per-request TTFTs are
    pooled; `round_figures` keeps each round's `SPREAD` figures for the min–max.

    Raises:
        ValueError: no rounds, or rounds of different endpoints or loads.
    """
    if not rounds:
        raise ValueError("combine_rounds needs at least one round")
    first = rounds[0]
    if any((r.endpoint, r.load) != (first.endpoint, first.load) for r in rounds):
        raise ValueError("combine_rounds: rounds of different endpoints or loads")
    values: dict[str, Any] = {}
    for name in SweepPoint.__dataclass_fields__:
        xs = [getattr(r, name) for r in rounds]
        if name in _SUMMED:
            values[name] = sum(xs)
        elif name.endswith(("_ms", "_throughput")) and isinstance(xs[0], (int, float)):
            values[name] = float(np.median(xs))
        else:
            values[name] = xs[0]
    values["ttfts_ms"] = [t for r in rounds for t in r.ttfts_ms]
    values["error_samples"] = [e for r in rounds for e in r.error_samples][:3]
    values["rounds"] = sum(r.rounds for r in rounds)
    values["round_figures"] = {m: [float(getattr(r, m)) for r in rounds] for m in SPREAD}
    return SweepPoint(**values)


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



"""What the benchmark writes: results.json, the plots and summary.md."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from distray.bench.metrics import BenchResult, SweepPoint
from distray.config import EndpointConfig

logger = logging.getLogger(__name__)


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


def _with_spread(p: SweepPoint, metric: str, fmt: str) -> str:
    """`median (min–max)` over the point's rounds; the bare figure for one round."""
    value = format(getattr(p, metric), fmt)
    if p.rounds <= 1:
        return value
    lo, hi = p.spread(metric)
    return f"{value} ({format(lo, fmt)}–{format(hi, fmt)})"


def _host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or url


def compare_student_teacher(result: BenchResult, endpoints: Sequence[EndpointConfig] = ()) -> list[str]:
    """One sentence per load where both `student` and `teacher` were measured.

    Faster means more requests per second in a closed loop (concurrency) and a lower median
    end-to-end latency at a request rate (where both serve the same rate). Where the student
    is not faster, the sentence says so and names the likely cause: the rounds' ranges
    overlap (within this machine's noise: a shared machine), or they do not (the student
    really is not faster here: overhead-bound at this size, where serving overhead rather
    than the model's compute sets the speed).
    """
    out: list[str] = []
    hosts = {_host(e.base_url) for e in endpoints if e.name in ("student", "teacher")}
    shared = len(hosts) == 1 and len([e for e in endpoints if e.name in ("student", "teacher")]) == 2
    for p in (p for p in result.points if p.endpoint == "student"):
        q = next((q for q in result.points if q.endpoint == "teacher" and q.load == p.load), None)
        if q is None or q.request_throughput <= 0 or q.median_ttft_ms <= 0 or q.median_e2el_ms <= 0:
            continue
        head = (f"Student vs teacher at {p.load}: {p.request_throughput / q.request_throughput:.2f}× "
                f"request throughput, {p.median_ttft_ms / q.median_ttft_ms:.2f}× p50 TTFT, "
                f"{p.median_e2el_ms / q.median_e2el_ms:.2f}× p50 end-to-end latency"
                f" (medians of {p.rounds} rounds).")
        if p.mode == "concurrency":
            metric, unit, better = "request_throughput", "req/s", p.request_throughput > q.request_throughput
        else:
            metric, unit, better = "median_e2el_ms", "ms p50 end-to-end", p.median_e2el_ms < q.median_e2el_ms
        if better:
            out.append(head)
            continue
        (s_lo, s_hi), (t_lo, t_hi) = p.spread(metric), q.spread(metric)
        fig = (f"{getattr(p, metric):.2f} {unit} ({s_lo:.2f}–{s_hi:.2f}) vs the teacher's "
               f"{getattr(q, metric):.2f} ({t_lo:.2f}–{t_hi:.2f})")
        where = (f"both endpoints are served from {next(iter(hosts))} and share its cores"
                 if shared else "the endpoints' machines may be shared with other work")
        if s_lo <= t_hi and t_lo <= s_hi:
            cause = (f"the rounds' ranges overlap, so the difference is within this machine's noise: "
                     f"a shared machine ({where}); rerun with more bench.rounds or on a quiet machine")
        else:
            cause = ("the ranges do not overlap, so this is likely overhead-bound at this size: both "
                     "models are small enough that per-request serving overhead (HTTP, Ray Serve's "
                     "hops, scheduling, tokenization), not the model's compute, sets the speed, and a "
                     f"smaller student gains little; also {where}")
        out.append(f"{head} **The student is not faster than the teacher at {p.load}**: {fig}; {cause}.")
    return out


def summary_markdown(result: BenchResult, endpoints: Sequence[EndpointConfig], settings: dict[str, Any]) -> str:
    """The benchmark as markdown: settings, one table row per sweep point, ratios, plots.

    Image links are relative to the summary's own folder (it sits next to the plots), so the
    file reads on its own; report.md rewrites them when it includes the summary.
    """
    eps = ", ".join(f"`{e.name}` ({e.base_url}, model `{e.model}`)" for e in endpoints)
    rounds = int(settings.get("rounds", 1))
    how = (f"{rounds} rounds per load level, the endpoints' rounds alternating; each figure is "
           "the median over rounds, with the min–max in brackets"
           if rounds > 1 else "one round per load level")
    lines = [
        "## Serving benchmark",
        "",
        f"Endpoints: {eps}. {settings['num_prompts']} requests per round, "
        f"{settings['max_tokens']} output tokens each"
        f"{' (ignore_eos)' if settings['ignore_eos'] else ''}; {how}; prompts: "
        f"{result.prompts_source or 'given'}. "
        "Latencies in ms (vLLM's definitions: TTFT to the first streamed chunk, TPOT per output "
        "token after the first, ITL between chunks, E2E per request).",
        "",
        "| endpoint | load | req/s | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | E2E p50 | E2E p99 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result.points:
        lines.append(
            f"| {p.endpoint} | {p.load} | {_with_spread(p, 'request_throughput', '.2f')} | "
            f"{_with_spread(p, 'output_throughput', '.1f')} | {_with_spread(p, 'median_ttft_ms', '.0f')} | "
            f"{p.p99_ttft_ms:.0f} | {p.median_tpot_ms:.1f} | {p.median_itl_ms:.1f} | "
            f"{_with_spread(p, 'median_e2el_ms', '.0f')} | {p.p99_e2el_ms:.0f} | {p.errors} |"
        )
    for sentence in compare_student_teacher(result, endpoints):
        lines += ["", sentence]
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


def write_outputs(
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



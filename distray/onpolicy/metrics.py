"""Per-round figures: how far the student's own samples are from the teacher, and what it cost.

    python -c "from distray.onpolicy.metrics import plot_rounds; help(plot_rounds)"

Computed on the fixed eval prompts, for the student that wrote the round's rollouts (student 0
is `student.model`; the last point is the student after the last round):

- `reverse_kl`: KL(student ‖ teacher) per answer token on the student's own samples, estimated
  from q(token) and p(token) of each sampled token (both from prompt logprobs over the same ids)
  with the k3 estimator (r − 1) − log r, r = p/q: unbiased at sampling temperature 1 and never
  negative. `reverse_kl_seq` sums it per answer.
- `teacher_nll`: −log p_teacher per token of the student's greedy answers (how likely the
  teacher finds what the student says).
- `greedy_exact_match`: greedy answers equal to the reference (prompts that have one).
- time per phase (`*_s`), optimizer steps and teacher-scored tokens, per round and cumulative.

`<run>/onpolicy/metrics.json` holds the list; `rounds.png` plots it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from distray import formats as F
from distray import storage
from distray.onpolicy.layout import (
    EVAL_GREEDY,
    EVAL_SAMPLE,
    PURPOSE,
    STUDENT_TOKEN_LOGPROBS,
    TEACHER_TOKEN_LOGPROBS,
    RoundPaths,
)

__all__ = ["eval_figures", "sample_figures", "greedy_figures", "plot_rounds"]

logger = logging.getLogger(__name__)


def sample_figures(teacher_lps: list[list[float]], student_lps: list[list[float]]) -> dict[str, float]:
    """Reverse KL from per-token logprobs of the same sampled answers (teacher p, student q).

    Returns:
        `{reverse_kl, reverse_kl_seq, eval_samples}`, empty when there is no sample.
    """
    # Schulman's k3 estimator, (r − 1) − log r with r = p/q at x ~ q: unbiased like log q − log p,
    # but never negative, so a handful of samples gives a usable figure.
    diffs = [
        [math.expm1(max(min(p - q, 50.0), -50.0)) - (p - q) for p, q in zip(tp, sp, strict=True)]
        for tp, sp in zip(teacher_lps, student_lps, strict=True)
        if tp and len(tp) == len(sp)
    ]
    tokens = sum(len(d) for d in diffs)
    if not tokens:
        return {}
    return {
        "reverse_kl": sum(sum(d) for d in diffs) / tokens,
        "reverse_kl_seq": sum(sum(d) for d in diffs) / len(diffs),
        "eval_samples": len(diffs),
    }


def greedy_figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    """teacher_nll and exact match of greedy answers (rows with `teacher_token_logprobs`)."""
    lps = [lp for r in rows for lp in (r.get(TEACHER_TOKEN_LOGPROBS) or [])]
    if not lps:
        return {}
    out = {
        "teacher_nll": -sum(lps) / len(lps),
        "greedy_answer_tokens": len(lps) / len(rows),
        "eval_greedy": len(rows),
    }
    refs = [r for r in rows if r.get(F.REFERENCE) is not None]
    if refs:
        hits = sum(str(r.get(F.RESPONSE) or "").strip() == str(r[F.REFERENCE]).strip() for r in refs)
        out["greedy_exact_match"] = hits / len(refs)
    return out


def _rows(folder: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    out: list[dict[str, Any]] = []
    fs, _ = storage.filesystem_for(folder)
    for path in storage.list_files(folder, (".parquet",)) if storage.exists(folder) else []:
        with fs.open_input_file(path) as f:
            out.extend(pq.read_table(f).to_pylist())
    return out


def eval_figures(rp: RoundPaths) -> dict[str, float]:
    """The round's eval figures, from its scored/ and self/ shards."""
    scored = [r for r in _rows(rp.scored) if r.get(PURPOSE) in (EVAL_SAMPLE, EVAL_GREEDY)]
    own = {r[F.ID]: r[STUDENT_TOKEN_LOGPROBS] for r in _rows(rp.self_scored)}
    samples = [r for r in scored if r[PURPOSE] == EVAL_SAMPLE and r[F.ID] in own]
    out = sample_figures(
        [r[TEACHER_TOKEN_LOGPROBS] for r in samples], [own[r[F.ID]] for r in samples]
    )
    out.update(greedy_figures([r for r in scored if r[PURPOSE] == EVAL_GREEDY]))
    return out


#: Phases drawn in the time panel, with their labels.
_PHASES = (("rollouts_s", "rollouts"), ("scoring_s", "scoring"), ("mix_s", "mix"), ("train_s", "train"))


def plot_rounds(points: list[dict[str, Any]], path: str) -> str | None:
    """Reverse KL and teacher NLL by student round, and time per phase by round.

    Returns:
        `path`, or None when there is nothing to draw.
    """
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.6), dpi=100)
    try:
        for ax, key, title in (
            (axes[0], "reverse_kl", "reverse KL on own samples (nats/token)"),
            (axes[1], "teacher_nll", "teacher NLL of greedy answers (nats/token)"),
        ):
            xs = [p["round"] for p in points if key in p]
            ax.plot(xs, [p[key] for p in points if key in p], marker="o")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("student after round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        ax = axes[2]
        bottom = [0.0] * len(points)
        xs = [p["round"] for p in points]
        for key, label in _PHASES:
            ys = [float(p.get(key) or 0.0) for p in points]
            ax.bar(xs, ys, bottom=bottom, label=label)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ax.set_title("time per phase (s)", fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        fig.tight_layout()
        return storage.write_png(path, fig, dpi=100)
    finally:
        plt.close(fig)


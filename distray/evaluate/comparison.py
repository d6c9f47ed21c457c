"""Student vs teacher and student vs baseline, from each model's figures in metrics.json.

    python -c "from distray.evaluate.comparison import compare; help(compare)"

Pure functions over the per-model figures `evaluate.runner` measured: retention and gain per
task scorer, the change of each fidelity scorer, and reductions in size, memory and latency.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROLES", "compare", "headline", "primary_scorer"]

ROLES = ("teacher", "student", "baseline")


def _ratio_pct(a: float | None, b: float | None) -> float | None:
    """100 · a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return 100.0 * a / b


def _reduction_pct(student: float | None, teacher: float | None) -> float | None:
    r = _ratio_pct(student, teacher)
    return None if r is None else 100.0 - r


def _change(a: dict[str, Any], b: dict[str, Any], names: list[str]) -> dict[str, float | None]:
    """a − b per fidelity scorer (nats for teacher_nll, points for the others)."""
    return {k: None if a.get(k) is None or b.get(k) is None else a[k] - b[k] for k in names}


def compare(
    models: dict[str, dict[str, Any]], scorers: list[str], fidelity_names: list[str] | None = None
) -> dict[str, Any]:
    """Student vs teacher and student vs baseline figures from per-model figures.

    Args:
        models: role → figures, with `scores`.
        scorers: the task scorers (retention and gain are computed for these).
        fidelity_names: the fidelity scorers (their change, student − other, is reported).

    Returns:
        `{"student_vs_teacher": {...}, "student_vs_baseline": {...}}` (empty dicts when a side
        is missing).
    """
    out: dict[str, Any] = {"student_vs_teacher": {}, "student_vs_baseline": {}}
    fid = list(fidelity_names or [])
    s, t, b = models.get("student"), models.get("teacher"), models.get("baseline")
    if s and t:
        ss, ts = s.get("scores", {}), t.get("scores", {})
        out["student_vs_teacher"] = {
            "accuracy_retention_pct": {
                k: _ratio_pct(ss.get(k), ts.get(k)) for k in scorers if k != "teacher_agreement"
            },
            "fidelity_change": _change(ss, ts, fid),
            "parameter_reduction_pct": _reduction_pct(s.get("parameters"), t.get("parameters")),
            "memory_reduction_pct": _reduction_pct(s.get("weights_mb"), t.get("weights_mb")),
            "peak_rss_reduction_pct": _reduction_pct(s.get("peak_rss_mb"), t.get("peak_rss_mb")),
            "latency_reduction_pct": _reduction_pct(s.get("latency_ms"), t.get("latency_ms")),
            "ttft_reduction_pct": _reduction_pct(s.get("ttft_ms"), t.get("ttft_ms")),
            "tpot_reduction_pct": _reduction_pct(s.get("tpot_ms"), t.get("tpot_ms")),
            "equal_length_latency_reduction_pct": _reduction_pct(
                s.get("equal_length_latency_ms"), t.get("equal_length_latency_ms")
            ),
            "equal_length_tpot_reduction_pct": _reduction_pct(
                s.get("equal_length_tpot_ms"), t.get("equal_length_tpot_ms")
            ),
            "throughput_gain_x": (
                None
                if not s.get("throughput_rows_per_s") or not t.get("throughput_rows_per_s")
                else s["throughput_rows_per_s"] / t["throughput_rows_per_s"]
            ),
        }
    if s and b:
        ss, bs = s.get("scores", {}), b.get("scores", {})
        out["student_vs_baseline"] = {
            "accuracy_gain_pts": {
                k: (None if ss.get(k) is None or bs.get(k) is None else ss[k] - bs[k])
                for k in scorers
            },
            "fidelity_change": _change(ss, bs, fid),
        }
    return out


def primary_scorer(scorers: list[str]) -> str | None:
    """The scorer the headline quotes: the first task scorer that is not teacher agreement."""
    for s in scorers:
        if s != "teacher_agreement":
            return s
    return scorers[0] if scorers else None


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few figures report.md and the CLI quote, from the full metrics (`primary_scorer`)."""
    p = metrics.get("primary_scorer")
    vt = metrics.get("student_vs_teacher") or {}
    vb = metrics.get("student_vs_baseline") or {}
    models = metrics.get("models", {})
    head: dict[str, Any] = {"scorer": p}
    for role in ROLES:
        if role in models:
            head[f"{role}_{p}"] = models[role].get("scores", {}).get(p)
    head["accuracy_retention_pct"] = (vt.get("accuracy_retention_pct") or {}).get(p)
    head["latency_reduction_pct"] = vt.get("latency_reduction_pct")
    head["memory_reduction_pct"] = vt.get("memory_reduction_pct")
    head["accuracy_gain_pts"] = (vb.get("accuracy_gain_pts") or {}).get(p)
    return head

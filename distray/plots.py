"""Plots of the stages' outputs: the loss curve (train), accuracy and latency by model (evaluate).

Each stage draws its own next to its outputs; report.md links them and redraws them from the
outputs when they are missing.

    python -c "from distray.plots import plot_loss; plot_loss([{'step': 1, 'loss': 2.0}], 'loss.png')"

PNGs go through `distray.storage.write_png`, so a run folder on a bucket gets them too.
"""

from __future__ import annotations

from typing import Any

from distray.storage import write_png

__all__ = ["ROLE_TITLES", "ordered_roles", "plot_accuracy", "plot_latency", "plot_loss"]

ROLE_TITLES = {"teacher": "Teacher", "student": "Student (distilled)", "baseline": "Baseline"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def plot_loss(records: list[dict[str, Any]], path: str) -> str | None:
    """Draw train (and validation) loss against the optimizer step.

    `records` are train/metrics.jsonl rows: step lines carry `loss`, evaluation lines
    `val_step` and `val_loss`; other rows (the final summary) are ignored::

        {"step": 10, "epoch": 0, "loss": 2.31, "lr": 0.0003, ...}
        {"step": 10, "val_step": 10, "val_loss": 2.40, "val_sft_loss": 2.40}
        {"final": true, "step": 20, "train_loss": 1.9, ...}

    Returns:
        `path`, or None when there is no loss to draw (nothing is written).
    """
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_step" in r and "val_loss" in r]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if val:
            ax.plot(*zip(*val, strict=True), marker="o", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return write_png(path, fig, dpi=100)
    finally:
        plt.close(fig)


def ordered_roles(models: dict[str, Any]) -> list[str]:
    order = ["teacher", "student", "baseline"]
    return [m for m in order if m in models] + [m for m in models if m not in order]


def plot_accuracy(metrics: dict[str, Any], path: str) -> str | None:
    """Grouped bars: each scorer's value (%) per model. Returns the path, or None with no scores."""
    models = metrics.get("models", {})
    names = ordered_roles(models)
    scorers = [s for s in metrics.get("scorers", []) if any(
        models[m].get("scores", {}).get(s) is not None for m in names
    )]
    if not names or not scorers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(scorers) * len(names) / 2 + 2), 3.4))
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        vals = [models[m].get("scores", {}).get(s) for s in scorers]
        xs = [j + i * width for j in range(len(scorers))]
        bars = ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=ROLE_TITLES.get(m, m))
        for b, v in zip(bars, vals, strict=True):
            ax.annotate("–" if v is None else f"{v:,.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(scorers))])
    ax.set_xticklabels(scorers)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Accuracy by model")
    ax.legend(fontsize=8, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.1),
              frameon=False)
    return write_png(path, fig)


def plot_latency(metrics: dict[str, Any], path: str) -> str | None:
    """Bars of single-request latency p50 with the p90 as a whisker, per model."""
    models = metrics.get("models", {})
    names = [m for m in ordered_roles(models) if models[m].get("latency_ms") is not None]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 1.5), 3.2))
    p50 = [models[m]["latency_ms"] for m in names]
    p90 = [models[m].get("latency_p90_ms") or models[m]["latency_ms"] for m in names]
    err = [[0] * len(names), [max(0.0, b - a) for a, b in zip(p50, p90, strict=True)]]
    bars = ax.bar(range(len(names)), p50, yerr=err, capsize=4,
                  color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(names)])
    for b, v in zip(bars, p50, strict=True):
        ax.annotate(f"{v:,.1f} ms", (b.get_x() + b.get_width() / 2, b.get_height() / 2),
                    ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([ROLE_TITLES.get(m, m) for m in names])
    ax.set_ylabel("latency (ms), p50 with p90 whisker")
    ax.set_title("Single-request latency by model")
    return write_png(path, fig)

"""The run report: report.md with the teacher / student / baseline comparison and every figure.

    distray report runs/quickstart

`build_report(run_dir)` reads what the stages left in a run folder and writes
`<run>/report.md`. Every section is optional: a run that only generated and trained gets those
sections and no comparison. Plots are (re)drawn from the JSON, so the report can be rebuilt at
any time:

- evaluate/metrics.json → the comparison table, evaluate/accuracy.png, evaluate/latency.png
- generate/stats.json → the generation summary
- train/metrics.jsonl → train/loss.png (when the trainer did not draw it) and the last metrics
- bench/summary.md, bench/results.json, bench/*.png → the load benchmark
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

from distray.paths import RunPaths
from distray.plots import ROLE_TITLES, ordered_roles, plot_accuracy, plot_latency, plot_loss
from distray.storage import exists, list_files, read_text, write_text

__all__ = ["run", "build_report", "plot_accuracy", "plot_latency", "plot_loss", "comparison_table", "fmt_count"]

logger = logging.getLogger(__name__)

# ---- small formatting helpers --------------------------------------------------------------


def fmt_count(n: float | None) -> str:
    """1234567 → "1.23M", 4100 → "4.1k"; "–" for None."""
    if n is None:
        return "–"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _f(x: float | None, digits: int = 1, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{suffix}"


def _read_json(path: str) -> Any | None:
    if not exists(path):
        return None
    try:
        return json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("cannot read %s: %s", path, e)
        return None


def _load_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    for line in read_text(path).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


# ---- tables -------------------------------------------------------------------------------


def comparison_table(metrics: dict[str, Any]) -> str:
    """The seed-style comparison: one row per figure, one column per model, then the
    student-vs-teacher change.

    Rows: size and memory; latency free-running (each answer ends at its eos) and at an equal
    output length (ignore_eos), so answer length does not skew per-request or per-token time;
    throughput; the task scorers (%); the fidelity scorers against the teacher's answers.
    Rows with no figure for any model are left out.
    """
    models = metrics.get("models", {})
    names = ordered_roles(models)
    vs = metrics.get("student_vs_teacher") or {}
    has_change = "student" in models and "teacher" in models

    def row(label: str, key: str, fmt: Any, change: str = "") -> str | None:
        vals = [models[m].get(key) for m in names]
        if all(v is None for v in vals):
            return None
        cells = [fmt(v) for v in vals]
        return f"| {label} | " + " | ".join(cells) + (f" | {change} |" if has_change else " |")

    def reduction(key: str) -> str:
        v = vs.get(key)
        # A reduction shows as the change a reader expects (-40% latency); +0.0 avoids "-0.0%".
        return "–" if v is None else f"{round(-v, 1) + 0.0:+.1f}%"

    # Every local model's equal-length requests write the same number of tokens.
    equal = next((models[m]["equal_length_tokens"] for m in names if models[m].get("equal_length_tokens")), "N")
    header = "| Metric | " + " | ".join(ROLE_TITLES.get(m, m) for m in names)
    header += " | Student vs teacher |" if has_change else " |"
    sep = "|---" * (len(names) + 1 + int(has_change)) + "|"
    lines = [header, sep]
    rows = [
        row("Parameters", "parameters", fmt_count, reduction("parameter_reduction_pct")),
        row("Memory, weights (MB)", "weights_mb", lambda v: _f(v, 1), reduction("memory_reduction_pct")),
        row("Peak RSS of the loaded engine (MB)", "peak_rss_mb", lambda v: _f(v, 0),
            reduction("peak_rss_reduction_pct")),
        row("Peak GPU memory (MB)", "peak_gpu_mb", lambda v: _f(v, 0), ""),
        row("Latency p50 (ms)", "latency_ms", lambda v: _f(v, 1), reduction("latency_reduction_pct")),
        row("Latency p90 (ms)", "latency_p90_ms", lambda v: _f(v, 1), ""),
        row("Answer length in latency requests (tokens)", "latency_output_tokens", lambda v: _f(v, 1), ""),
        row("Time to first token p50 (ms)", "ttft_ms", lambda v: _f(v, 1), reduction("ttft_reduction_pct")),
        row("Time per output token p50 (ms)", "tpot_ms", lambda v: _f(v, 2), reduction("tpot_reduction_pct")),
        row(f"Latency p50 at {equal} tokens (ms)", "equal_length_latency_ms", lambda v: _f(v, 1),
            reduction("equal_length_latency_reduction_pct")),
        row(f"Time per output token p50 at {equal} tokens (ms)", "equal_length_tpot_ms",
            lambda v: _f(v, 2), reduction("equal_length_tpot_reduction_pct")),
        row("Throughput (rows/s)", "throughput_rows_per_s", lambda v: _f(v, 2),
            "–" if vs.get("throughput_gain_x") is None else f"×{vs['throughput_gain_x']:.2f}"),
        row("Output tokens/s", "output_tokens_per_s", lambda v: _f(v, 1), ""),
    ]
    lines += [r for r in rows if r is not None]
    retention = vs.get("accuracy_retention_pct") or {}
    for s in metrics.get("scorers", []):
        vals = [models[m].get("scores", {}).get(s) for m in names]
        if all(v is None for v in vals):
            continue
        change = "–" if retention.get(s) is None else f"{retention[s]:.1f}% retained"
        cells = " | ".join(_f(v, 1) for v in vals)
        lines.append(f"| {s} (%) | {cells}" + (f" | {change} |" if has_change else " |"))
        if s == "teacher_agreement":
            vals = [models[m].get("scores", {}).get("teacher_bleu") for m in names]
            if any(v is not None for v in vals):
                cells = " | ".join(_f(v, 1) for v in vals)
                lines.append(f"| teacher_bleu | {cells}" + (" | |" if has_change else " |"))
    lines += _fidelity_rows(metrics, names, has_change)
    lines += _degeneration_rows(metrics, names, has_change)
    return "\n".join(lines)


#: Fidelity scorers in the table: label, digits, unit of the student-vs-teacher change.
_FIDELITY_ROWS = {
    "teacher_nll": ("teacher_nll (nats/token, lower is closer)", 3, " nats"),
    "token_agreement": ("token_agreement with the teacher (%)", 1, " pts"),
    "rouge_l_vs_teacher": ("rouge_l_vs_teacher (%)", 1, " pts"),
}


def _fidelity_rows(metrics: dict[str, Any], names: list[str], has_change: bool) -> list[str]:
    """The fidelity scorers' rows; the change column is student − teacher."""
    models = metrics.get("models", {})
    change = (metrics.get("student_vs_teacher") or {}).get("fidelity_change") or {}
    lines = []
    for key, (label, digits, unit) in _FIDELITY_ROWS.items():
        vals = [models[m].get("scores", {}).get(key) for m in names]
        if all(v is None for v in vals):
            continue
        d = change.get(key)
        diff = "–" if d is None else f"{round(d, digits) + 0.0:+.{digits}f}{unit}"
        cells = " | ".join(_f(v, digits) for v in vals)
        lines.append(f"| {label} | {cells}" + (f" | {diff} |" if has_change else " |"))
    return lines


def _degeneration_rows(metrics: dict[str, Any], names: list[str], has_change: bool) -> list[str]:
    """Repeated n-grams and answers cut at max_tokens (lower is better); the change column is
    the student's figure as a multiple of the teacher's."""
    models = metrics.get("models", {})
    n = (metrics.get("diagnostics") or {}).get("repetition_ngram", 4)
    lines = []
    for key, label in (("repetition", f"Repeated {n}-grams in answers (%, lower is better)"),
                       ("max_tokens_hit_pct", f"Answers cut at max_tokens={metrics.get('max_tokens')} (%)")):
        vals = [models[m].get("scores", {}).get(key) for m in names]
        if all(v is None for v in vals):
            continue
        t, st = (models.get(r, {}).get("scores", {}).get(key) for r in ("teacher", "student"))
        ratio = "–" if t is None or st is None or t == 0 else f"×{st / t:.2f} the teacher's"
        cells = " | ".join(_f(v, 1) for v in vals)
        lines.append(f"| {label} | {cells}" + (f" | {ratio} |" if has_change else " |"))
    return lines


def _degeneration_note(metrics: dict[str, Any]) -> str | None:
    """Names each model whose answers loop or run to the cap: repetition over 1.5× the
    teacher's (and over 1.5%), or more than 5% of answers cut at max_tokens."""
    models = metrics.get("models", {})
    t = (models.get("teacher") or {}).get("scores", {}).get("repetition")
    flagged = []
    for m in ordered_roles(models):
        sc = models[m].get("scores", {})
        rep, cut = sc.get("repetition"), sc.get("max_tokens_hit_pct")
        why = []
        if m != "teacher" and rep is not None and t is not None and rep > 1.5 * max(t, 1.0):
            why.append(f"{rep:.1f}% repeated n-grams vs the teacher's {t:.1f}%")
        if cut is not None and cut > 5.0:
            why.append(f"{cut:.0f}% of answers cut at max_tokens")
        if why:
            flagged.append(f"{ROLE_TITLES.get(m, m)} ({', '.join(why)})")
    if not flagged:
        return None
    return "**Degenerate output:** " + "; ".join(flagged) + "."


def _headline(metrics: dict[str, Any]) -> str | None:
    vs = metrics.get("student_vs_teacher") or {}
    gain = metrics.get("student_vs_baseline") or {}
    primary = metrics.get("primary_scorer")
    ret = (vs.get("accuracy_retention_pct") or {}).get(primary) if primary else None
    if ret is None:
        return None
    parts = [f"The distilled student keeps **{ret:.1f}%** of the teacher's {primary}"]
    if vs.get("parameter_reduction_pct") is not None:
        parts.append(f"with {vs['parameter_reduction_pct']:.0f}% fewer parameters")
    if vs.get("latency_reduction_pct") is not None:
        lr = vs["latency_reduction_pct"]
        parts.append(f"and {abs(lr):.0f}% {'lower' if lr >= 0 else 'higher'} single-request latency")
    text = " ".join(parts) + "."
    g = (gain.get("accuracy_gain_pts") or {}).get(primary)
    if g is not None:
        text += f" Against the baseline it gains **{g:+.1f} points** of {primary}."
    return text


# A markdown link or image target: `](target)` or `](target "title")`.
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)")


def _rebase_links(markdown: str, folder: str) -> str:
    """Prefix `folder/` to the relative link targets of a markdown file from `folder`, so
    its images still resolve when the text is included in a file one level up.

    Absolute targets (URLs, `/...`, `#anchors`) are left alone, and so are targets that
    already start with `folder/` (summaries written before the links became relative).
    """

    def fix(m: re.Match[str]) -> str:
        target = m.group(1)
        if "://" in target or target.startswith(("/", "#", "mailto:", f"{folder}/")):
            return m.group(0)
        return f"]({folder}/{target}"

    return _LINK_TARGET.sub(fix, markdown)


def _kv_table(d: dict[str, Any], keys: list[str] | None = None) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for k in keys or list(d):
        v = d.get(k)
        if isinstance(v, (dict, list)) or v is None:
            continue
        lines.append(f"| {k} | {_f(v, 3) if isinstance(v, float) else v} |")
    return "\n".join(lines)


# ---- the report ---------------------------------------------------------------------------


def _run_section(paths: RunPaths) -> list[str]:
    """The run's models, task and loss, from config.resolved.yaml."""
    out: list[str] = []
    cfg = None
    if exists(paths.resolved_config):
        import yaml

        try:
            cfg = yaml.safe_load(read_text(paths.resolved_config))
        except yaml.YAMLError:
            cfg = None
    if isinstance(cfg, dict):
        teacher = cfg.get("teacher") or ((cfg.get("teachers") or [None])[0])
        student = cfg.get("student") or {}
        task = cfg.get("task") or {}
        data = cfg.get("data") or {}
        builtin = (data.get("builtin") or {}).get("name")
        # The distilled student is the train stage's export; `student.model` is where it started.
        trained = paths.student if exists(f"{paths.student}/config.json") else None
        bits = [
            f"- task: `{task.get('type', 'custom')}`" + (f" (built-in `{builtin}`)" if builtin else ""),
            f"- teacher: `{teacher.get('model')}` ({teacher.get('kind')})" if isinstance(teacher, dict) else None,
            f"- student: `{trained}`" if trained else None,
            f"- student init: `{student.get('model')}`" if student.get("model") else None,
            f"- train loss: `{(cfg.get('train') or {}).get('loss')}`",
            "- config: [config.resolved.yaml](config.resolved.yaml)",
        ]
        out.append("\n".join(b for b in bits if b) + "\n")
    return out


def _evaluate_section(paths: RunPaths) -> list[str]:
    """Teacher vs student vs baseline: the table, the headline and the plots."""
    out: list[str] = []
    metrics = _read_json(paths.eval_metrics)
    if isinstance(metrics, dict) and metrics.get("models"):
        out.append("## Teacher vs student vs baseline\n")
        head = _headline(metrics)
        if head:
            out.append(head + "\n")
        out.append(comparison_table(metrics) + "\n")
        degenerate = _degeneration_note(metrics)
        if degenerate:
            out.append(degenerate + "\n")
        primary = metrics.get("primary_scorer")
        for name, vt in (metrics.get("extra_vs_teacher") or {}).items():
            ret = (vt.get("accuracy_retention_pct") or {}).get(primary)
            nll = (vt.get("fidelity_change") or {}).get("teacher_nll")
            bits = ([f"keeps {ret:.1f}% of the teacher's {primary}"] if ret is not None else []) + (
                [f"teacher_nll {nll:+.3f} nats vs the teacher"] if nll is not None else [])
            if bits:
                out.append(f"`{name}`: " + ", ".join(bits) + ".\n")
        vb = metrics.get("student_vs_baseline") or {}
        if vb.get("accuracy_gain_pts"):
            gains = ", ".join(f"{k} {v:+.1f} pts" for k, v in vb["accuracy_gain_pts"].items() if v is not None)
            if gains:
                out.append(f"Student vs baseline accuracy gain: {gains}.\n")
        n = metrics.get("test_rows")
        out.append(
            f"Test rows: {n}. Scores are % (BLEU and ROUGE-L × 100). Memory is parameter + "
            "buffer bytes of the model; peak RSS includes the engine's KV-cache preallocation. "
            "Latency is one request at a time; throughput is one batch over the test prompts.\n"
        )
        figs = []
        acc = plot_accuracy(metrics, f"{paths.evaluate}/accuracy.png")
        lat = plot_latency(metrics, f"{paths.evaluate}/latency.png")
        if acc:
            figs.append("![accuracy by model](evaluate/accuracy.png)")
        if lat:
            figs.append("![latency by model](evaluate/latency.png)")
        if figs:
            out.append("\n".join(figs) + "\n")
        preds = [f"[{m}](evaluate/predictions/{m}.parquet)" for m in ordered_roles(metrics["models"])]
        out.append("Predictions: " + ", ".join(preds) + "; figures: [metrics.json](evaluate/metrics.json)\n")
    return out


def _generate_section(paths: RunPaths) -> list[str]:
    """The teacher data's stats."""
    out: list[str] = []
    stats = _read_json(paths.generate_stats)
    if isinstance(stats, dict):
        out.append("## Teacher data (generate)\n")
        out.append(_kv_table(stats) + "\n")
    return out


def _train_section(paths: RunPaths) -> list[str]:
    """The loss curve and the last metrics record."""
    out: list[str] = []
    train_records = _load_jsonl(paths.train_metrics) if exists(paths.train_metrics) else []
    loss_png = paths.loss_plot
    if not exists(loss_png) and train_records:
        plot_loss(train_records, loss_png)
    if train_records or exists(loss_png):
        out.append("## Training\n")
        if exists(loss_png):
            out.append("![training loss](train/loss.png)\n")
        if train_records:
            last = train_records[-1]
            out.append(f"{len(train_records)} metric records; the last:\n")
            out.append(_kv_table(last) + "\n")
    return out


def _bench_section(paths: RunPaths) -> list[str]:
    """The serving load benchmark's summary and plots."""
    out: list[str] = []
    bench_summary = paths.bench_summary
    bench_json = _read_json(paths.bench_results)
    bench_pngs: list[str] = []
    if exists(paths.bench):
        try:
            bench_pngs = list_files(paths.bench, (".png",))
        except Exception:  # noqa: BLE001 - a missing or odd folder just means no plots
            bench_pngs = []
    if exists(bench_summary) or bench_json is not None or bench_pngs:
        out.append("## Serving load benchmark (bench)\n")
        text = ""
        if exists(bench_summary):
            # The summary's links are relative to bench/; report.md sits one level up.
            text = _rebase_links(read_text(bench_summary).strip(), "bench")
            # Demote the summary's own headings under this section's.
            text = "\n".join("#" + ln if ln.startswith("#") else ln for ln in text.splitlines())
            out.append(text + "\n")
        # Plots the summary does not show already.
        extra = [p for p in bench_pngs if f"bench/{os.path.basename(p)}" not in text]
        for png in extra:
            rel = "bench/" + os.path.basename(png)
            out.append(f"![{os.path.splitext(os.path.basename(png))[0]}]({rel})")
        if extra:
            out.append("")
        if bench_json is not None:
            out.append("Every figure: [bench/results.json](bench/results.json)\n")
    return out


def _onpolicy_section(paths: RunPaths) -> list[str]:
    """On-policy rounds (`train.mode: on_policy`): the per-round plot and the last round's figures."""
    root = f"{paths.run_dir}/onpolicy"
    data = _read_json(f"{root}/metrics.json")
    if not isinstance(data, dict) or not data.get("rounds"):
        return []
    out = ["## On-policy rounds\n"]
    if exists(f"{root}/rounds.png"):
        out.append("![on-policy rounds](onpolicy/rounds.png)\n")
    rounds = data["rounds"]
    out.append(f"{len(rounds)} rounds; the last:\n")
    last = rounds[-1] if isinstance(rounds[-1], dict) else {}
    out.append(_kv_table({k: v for k, v in last.items() if not isinstance(v, (dict, list))}) + "\n")
    out.append("Every figure: [onpolicy/metrics.json](onpolicy/metrics.json)\n")
    return out


def build_report(run_dir: str) -> str:
    """Write `<run_dir>/report.md` from the run folder's JSON and figures.

    Args:
        run_dir: a run folder (local or cloud URI).

    Returns:
        The path of report.md.
    """
    paths = RunPaths(run_dir)
    name = os.path.basename(run_dir.rstrip("/"))
    out = [f"# distray run report: {name}\n", *_run_section(paths)]
    n_head = len(out)
    for section in (_evaluate_section, _generate_section, _train_section, _onpolicy_section, _bench_section):
        out += section(paths)
    if len(out) <= n_head:
        out.append("Nothing to report yet: run `distray generate`, `train`, `evaluate` or `bench` first.\n")
    text = "\n".join(out).rstrip() + "\n"
    write_text(paths.report, text)
    logger.info("report: %s", paths.report)
    return paths.report


def run(cfg: Any) -> str:
    """The pipeline's report stage: `build_report(cfg.run_dir)`."""
    return build_report(cfg.run_dir)

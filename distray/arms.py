"""Training arms side by side: one teacher data set, one initial student, several losses.

    python jobs/example.py --config jobs/configs/smollm2-135m_to_pruned_kd.yaml
    python jobs/example.py --config C --arms pruned,sft,kd,jsd train.temperature=2.0

An arm is a way to get a student from `student.model` (typically `student.from_teacher`'s
pruned copy): `pruned` (no training at all) or a `train.loss` (`sft`, `kd`, `reverse_kl`,
`jsd`). Every arm starts from the same weights and sees the same teacher rows in the same order
for the same number of steps (only `train.loss` differs), so the arms differ by their loss
alone. The run folder:

    <run>/generate/              the teacher's answers + top-k, labelled once (pipeline stage)
    <run>/student-init/          the pruned student every arm starts from
    <run>/arms/<arm>/train/      each trained arm (train_model: metrics.jsonl, student/)
    <run>/arms/<arm>/evaluate/   evaluate stage runs, two arms each (see `eval_pairs`)
    <run>/arms.json, arms_loss.png, report.md

Scoring goes through the evaluate stage unchanged. It compares at most three models per run
(teacher, student, baseline), so the arms are evaluated in pairs: the first arm of a pair as the
`student`, the second as the `baseline` (its folder in `evaluate.baseline`). Every pair scores
the teacher's greedy answers again; the report gives the share of test prompts on which the
pairs' teacher answers are identical, since the arms of different pairs are compared against
those answers.

Every arm-vs-arm difference gets a 95% paired bootstrap interval over the test prompts
(`distray.evaluate.stats`, from the per-row `score_*` columns of the predictions); where it
contains 0 the report says "within noise" instead of ranking the two arms. The report also
flags arms whose answers loop or run to `evaluate.max_tokens` (the `repetition` scorer).

Reruns reuse what is done: the generate stage skips itself, an arm whose `arm.json` settings
match is not retrained, and a pair whose arms did not change is not evaluated again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distray import storage
from distray.config import DistrayConfig, config_from_dict
from distray.errors import ConfigError

__all__ = ["ARMS", "PRUNED", "ArmsResult", "arm_config", "arm_differences", "eval_pairs", "run",
           "render_report", "ordering_ci"]

logger = logging.getLogger(__name__)

#: `pruned` is the student before any training; the others are `train.loss` values.
PRUNED = "pruned"
ARMS = (PRUNED, "sft", "kd", "reverse_kl", "jsd")
#: Figures of each model in the table: (metrics key, column title, format).
COLUMNS = (
    ("teacher_nll", "teacher_nll (nats/token) ↓", "{:.3f}"),
    ("token_agreement", "token_agreement (%) ↑", "{:.1f}"),
    ("rouge_l_vs_teacher", "rouge_l_vs_teacher ↑", "{:.1f}"),
    ("rouge_l", "rouge_l vs human ↑", "{:.1f}"),
    ("repetition", "repeated 4-grams (%) ↓", "{:.1f}"),
    ("max_tokens_hit_pct", "cut at max_tokens (%) ↓", "{:.0f}"),
    ("latency_output_tokens", "answer tokens", "{:.0f}"),
    ("latency_ms", "latency ms (free)", "{:.0f}"),
    ("equal_length_latency_ms", "latency ms (equal length)", "{:.0f}"),
    ("equal_length_tpot_ms", "TPOT ms (equal length)", "{:.1f}"),
)


@dataclass
class ArmsResult:
    """What the arms run wrote and measured.

    Attributes:
        run_dir: the run folder.
        report_path: report.md.
        figures: model (`teacher`, then each arm) → flat figures (scores and efficiency).
        train: trained arm → its training figures (steps, loss, tok/s, time).
        seconds: phase → wall seconds this call spent (generate, train:<arm>, evaluate:<pair>).
        ordering_met: pruned < sft < every logit arm on teacher_nll and token_agreement
            (None when an arm of the comparison is missing).
        differences: every arm-vs-arm difference per scorer with its 95% paired bootstrap
            interval over the test prompts (`arm_differences`).
        ordering_ci: the same goal judged by those intervals: "met", "NOT met" or "within noise".
    """

    run_dir: str
    report_path: str
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    teacher_answers_identical_pct: float | None = None
    ordering_met: bool | None = None
    differences: list[dict[str, Any]] = field(default_factory=list)
    ordering_ci: str | None = None


def check_arms(arms: list[str]) -> list[str]:
    """`arms` without repeats, each checked.

    Raises:
        ConfigError: an unknown arm.
    """
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ConfigError(f"`--arms` has {bad or 'nothing'}; choose from {', '.join(ARMS)}")
    return list(dict.fromkeys(arms))


def arm_config(cfg: DistrayConfig, arm: str) -> DistrayConfig:
    """The prepared config of one arm: its own run folder `<run>/arms/<arm>`, its loss, and the
    already pruned student (so preparing an arm never prunes again)."""
    data = cfg.model_dump(mode="json")
    data["run"] = {**data["run"], "output_dir": f"{cfg.run_dir}/arms", "name": arm}
    data["student"] = {**data["student"], "from_teacher": None}
    if arm != PRUNED:
        data["train"] = {**data["train"], "loss": arm}
    return config_from_dict(data, f"(arm {arm})")


def eval_pairs(arms: list[str]) -> list[tuple[str | None, str | None]]:
    """(student arm, baseline arm) of each evaluate run: consecutive arms two by two; `pruned`
    (no trained folder of its own) is always the baseline side.

    >>> eval_pairs(["pruned", "sft", "kd", "reverse_kl"])
    [('sft', 'pruned'), ('kd', 'reverse_kl')]
    """
    out: list[tuple[str | None, str | None]] = []
    for i in range(0, len(arms), 2):
        a: str | None = arms[i]
        b = arms[i + 1] if i + 1 < len(arms) else None
        if a == PRUNED:
            a, b = b, a
        out.append((a, b))
    return out


# ---- phases -------------------------------------------------------------------------------


def _settings(cfg: DistrayConfig, train_data: str) -> dict[str, Any]:
    """What an arm's training depends on: train's lineage settings (answer-changing only, the
    one classification of `distray.settings`) and the teacher data's content digest."""
    from distray import lineage
    from distray.digest import tree_digest

    return {**lineage.settings(cfg, "train"), "data": tree_digest(train_data)}


def _train_arm(
    cfg: DistrayConfig, arm: str, train_data: str, validation_data: str | None, force: bool
) -> tuple[dict[str, Any], bool]:
    """Train one arm unless an identical one is done; returns (its figures, trained now)."""
    from distray.pipeline import clear_stage
    from distray.train.trainer import train_model

    acfg = arm_config(cfg, arm)
    out = f"{acfg.run_dir}/train"
    record = f"{acfg.run_dir}/arm.json"
    wanted = _settings(acfg, train_data)
    done = json.loads(storage.read_text(record)) if storage.exists(record) else {}
    if not force and done.get("settings") == wanted and storage.exists(f"{out}/student/config.json"):
        logger.info("arm %s: trained already with these settings (%s), reused", arm, out)
        return done["result"], False
    clear_stage(acfg, "train")  # other settings: resuming its checkpoints would mix two runs
    res = train_model(acfg, train_data, out, validation_data=validation_data, answers="teacher")
    fig = {k: v for k, v in asdict(res).items() if k in (
        "steps", "epochs", "train_rows", "train_loss", "tokens_per_s", "train_time_s", "elapsed_s",
        "loss", "student_dir", "metrics_path", "truncated")}
    storage.write_text(record, json.dumps({"settings": wanted, "result": fig}, indent=2) + "\n")
    return fig, True


def _evaluate_pair(
    cfg: DistrayConfig, pair: tuple[str | None, str | None], changed: bool, force: bool
) -> dict[str, Any]:
    """Run the evaluate stage for one pair of arms; returns its metrics.json."""
    from distray.evaluate.runner import run as evaluate_run

    student, baseline = pair
    acfg = arm_config(cfg, student or baseline or PRUNED)
    models = ["teacher"] + (["student"] if student else []) + (["baseline"] if baseline else [])
    base_dir = (cfg.student.model if baseline == PRUNED else f"{cfg.run_dir}/arms/{baseline}/train/student") \
        if baseline and cfg.student else None
    ev = acfg.evaluate.model_copy(update={"models": models, "baseline": base_dir})
    ecfg = acfg.model_copy(update={"evaluate": ev})
    metrics = f"{ecfg.run_dir}/evaluate/metrics.json"
    if storage.exists(metrics) and not (changed or force):
        logger.info("arms %s: evaluated already (%s), reused", pair, metrics)
    else:
        evaluate_run(ecfg)
    return dict(json.loads(storage.read_text(metrics)))


def _teacher_consistency(cfg: DistrayConfig, pairs: list[tuple[str | None, str | None]]) -> float | None:
    """% of test prompts on which every pair's teacher answered the same text."""
    import pyarrow.parquet as pq

    answers = []
    for s, b in pairs:
        p = f"{cfg.run_dir}/arms/{s or b}/evaluate/predictions/teacher.parquet"
        if storage.exists(p):
            fs, inner = storage.filesystem_for(p)
            t = pq.read_table(inner, columns=["id", "response"], filesystem=fs).to_pylist()
            answers.append({r["id"]: r["response"] for r in t})
    if len(answers) < 2:
        return None
    ids = set(answers[0])
    same = sum(1 for i in ids if all(a.get(i) == answers[0][i] for a in answers[1:]))
    return 100.0 * same / max(len(ids), 1)


def _flat(model: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in model.items() if not isinstance(v, dict)}, **model.get("scores", {})}


def ordering(figures: dict[str, dict[str, Any]], arms: list[str]) -> bool | None:
    """pruned < sft < each logit arm, on teacher_nll (lower is better) and token_agreement."""
    logit = [a for a in arms if a not in (PRUNED, "sft")]
    if PRUNED not in figures or "sft" not in figures or not logit:
        return None
    for key, better in (("teacher_nll", lambda a, b: a < b), ("token_agreement", lambda a, b: a > b)):
        vals = {a: figures[a].get(key) for a in (PRUNED, "sft", *logit)}
        if any(v is None for v in vals.values()):
            return None
        if not better(vals["sft"], vals[PRUNED]) or not all(better(vals[a], vals["sft"]) for a in logit):
            return False
    return True


#: Scorers compared arm against arm: per-row column `score_<name>` of the predictions, the factor
#: that puts a row's value in the table's unit, and whether lower is better.
CI_SCORERS: dict[str, tuple[float, bool]] = {
    "teacher_nll": (1.0, True), "token_agreement": (100.0, False), "rouge_l_vs_teacher": (100.0, False),
    "rouge_l": (100.0, False), "repetition": (100.0, True), "max_tokens_hit_pct": (100.0, True),
}


def _per_row(cfg: DistrayConfig, pairs: list[tuple[str | None, str | None]]) -> dict[str, dict[str, dict[str, Any]]]:
    """arm → scorer → {test row id: the row's figure}, from each pair's predictions."""
    import pyarrow.parquet as pq

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s, b in pairs:
        for role, arm in (("student", s), ("baseline", b)):
            p = f"{cfg.run_dir}/arms/{s or b}/evaluate/predictions/{role}.parquet"
            if not arm or not storage.exists(p):
                continue
            fs, inner = storage.filesystem_for(p)
            rows = pq.read_table(inner, filesystem=fs).to_pylist()
            cols = [c[len("score_"):] for c in (rows[0] if rows else {}) if c.startswith("score_")]
            out[arm] = {c: {r["id"]: r[f"score_{c}"] for r in rows} for c in cols}
            # A row cut at the cap counts 1, one that stopped 0: the mean is max_tokens_hit_pct.
            out[arm]["max_tokens_hit_pct"] = {
                r["id"]: None if r.get("finish_reason") is None else float(r["finish_reason"] == "length")
                for r in rows}
    return out


def arm_differences(
    per_row: dict[str, dict[str, dict[str, Any]]], arms: list[str], *, seed: int = 0
) -> list[dict[str, Any]]:
    """Every later arm minus every earlier one, per scorer of `CI_SCORERS` (others: % and higher
    is better), with the 95% paired bootstrap interval over the prompts both arms answered.

    Args:
        per_row: arm → scorer → {test row id: figure} (None where the row was not scored).
        arms: table order; `arms[j] − arms[i]` for i < j.
        seed: the bootstrap's seed.

    Returns:
        One dict per (pair, scorer): `a`, `b`, `scorer`, `diff`, `low`, `high`, `n` in the table's
        unit, and `better`: the arm the interval ranks first, or None (within noise).
    """
    from distray.evaluate.stats import paired_bootstrap

    out: list[dict[str, Any]] = []
    for j, a in enumerate(arms):
        for b in arms[:j]:
            if a not in per_row or b not in per_row:
                continue
            for scorer in [k for k in per_row[a] if k in per_row[b]]:
                scale, lower = CI_SCORERS.get(scorer, (100.0, False))
                ra, rb = per_row[a][scorer], per_row[b][scorer]
                ids = [i for i in ra if i in rb]
                ci = paired_bootstrap([None if ra[i] is None else ra[i] * scale for i in ids],
                                      [None if rb[i] is None else rb[i] * scale for i in ids], seed=seed)
                if ci is None:
                    continue
                better = None if ci.within_noise else (a if (ci.diff < 0) == lower else b)
                out.append({"a": a, "b": b, "scorer": scorer, "diff": ci.diff, "low": ci.low,
                            "high": ci.high, "n": ci.n, "better": better})
    return out


def ordering_ci(differences: list[dict[str, Any]], arms: list[str]) -> str | None:
    """pruned < sft < each logit arm on teacher_nll and token_agreement, judged by the intervals:
    "NOT met" when one step is ranked the wrong way, "within noise" when one cannot be ranked,
    "met" when every step is ranked the right way; None without the figures."""
    logit = [a for a in arms if a not in (PRUNED, "sft")]
    steps = [("sft", PRUNED)] + [(a, "sft") for a in logit]
    by = {(d["a"], d["b"], d["scorer"]): d for d in differences}
    if PRUNED not in arms or "sft" not in arms or not logit:
        return None
    verdicts = []
    for hi, lo in steps:
        for scorer in ("teacher_nll", "token_agreement"):
            d = by.get((hi, lo, scorer)) or by.get((lo, hi, scorer))
            if d is None:
                return None
            verdicts.append("within noise" if d["better"] is None else "met" if d["better"] == hi else "NOT met")
    return "NOT met" if "NOT met" in verdicts else "within noise" if "within noise" in verdicts else "met"


def run(cfg: DistrayConfig, arms: list[str], *, force: bool = False) -> ArmsResult:
    """Generate once, train every arm, evaluate them in pairs, write one report.

    Args:
        cfg: the loaded (not yet prepared) config; `train.loss` is replaced per arm.
        arms: from ARMS, in table order.
        force: retrain and re-evaluate every arm (the teacher data is kept).

    Returns:
        ArmsResult with the table figures and report path.

    Raises:
        ConfigError: an unknown arm, a logit arm without `generate.logprobs`, or a run folder on
            a bucket (the arms read and write local folders).
    """
    from distray import pipeline
    from distray.lease import hold
    from distray.prepare import prepare
    from distray.ray_utils import init_ray

    arms = check_arms(arms)
    if "://" in cfg.run.output_dir:
        raise ConfigError(f"`run.output_dir` ({cfg.run.output_dir}) must be local for the arms run")
    if any(a not in (PRUNED, "sft") for a in arms) and cfg.generate.logprobs is None:
        raise ConfigError("logit arms (kd, reverse_kl, jsd) need `generate.logprobs` (e.g. 8)")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    init_ray(cfg)
    pipeline.run(cfg, stages=["generate"])  # skipped when the teacher data is there
    seconds["generate"] = round(time.perf_counter() - t0, 1)
    cfg = prepare(cfg)
    from distray.paths import RunPaths
    from distray.train.datasets import teacher_splits

    train_data, validation_data = teacher_splits(RunPaths(cfg.run_dir))
    res = ArmsResult(run_dir=cfg.run_dir, report_path=f"{cfg.run_dir}/report.md", seconds=seconds)
    changed: set[str] = set()
    with hold(cfg.run_dir):
        for arm in arms:
            if arm == PRUNED:
                continue
            t = time.perf_counter()
            res.train[arm], now = _train_arm(cfg, arm, train_data, validation_data, force)
            if now:
                changed.add(arm)
                seconds[f"train:{arm}"] = round(time.perf_counter() - t, 1)
        pairs = eval_pairs(arms)
        for pair in pairs:
            t = time.perf_counter()
            m = _evaluate_pair(cfg, pair, bool(changed & set(pair)), force)
            seconds[f"evaluate:{pair[0]}+{pair[1]}"] = round(time.perf_counter() - t, 1)
            res.figures.setdefault("teacher", _flat(m["models"]["teacher"]))
            for role, name in (("student", pair[0]), ("baseline", pair[1])):
                if name:
                    res.figures[name] = _flat(m["models"][role])
    res.teacher_answers_identical_pct = _teacher_consistency(cfg, pairs)
    res.ordering_met = ordering(res.figures, arms)
    res.differences = arm_differences(_per_row(cfg, pairs), arms, seed=cfg.run.seed)
    res.ordering_ci = ordering_ci(res.differences, arms)
    res.seconds["total"] = round(time.perf_counter() - t0, 1)
    _write_outputs(cfg, arms, res)
    logger.info("arms %s: report %s, figures %s/arms.json, ordering pruned < sft < logit: %s",
                arms, res.report_path, cfg.run_dir, res.ordering_met)
    return res


# ---- report -------------------------------------------------------------------------------


def _records(path: str) -> list[dict[str, Any]]:
    if not storage.exists(path):
        return []
    return [json.loads(x) for x in storage.read_text(path).splitlines() if x.strip()]


def plot_arms_loss(train: dict[str, dict[str, Any]], path: str) -> str | None:
    """Two panels against the optimizer step: cross-entropy on the teacher's tokens (the same
    quantity in every arm) and each arm's own training objective."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    from distray.storage import write_png

    curves = {arm: [r for r in _records(t.get("metrics_path", "")) if "loss" in r and "step" in r]
              for arm, t in train.items()}
    curves = {a: c for a, c in curves.items() if c}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), dpi=100)
    try:
        for arm, recs in curves.items():
            steps = [r["step"] for r in recs]
            axes[0].plot(steps, [r.get("sft_loss", r["loss"]) for r in recs], marker=".", label=arm)
            axes[1].plot(steps, [r["loss"] for r in recs], marker=".", label=arm)
        axes[0].set_title("cross-entropy on the teacher's tokens")
        axes[1].set_title("training objective of the arm")
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        return write_png(path, fig, dpi=100)
    finally:
        plt.close(fig)


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else spec.format(v)


def render_report(cfg: DistrayConfig, arms: list[str], res: ArmsResult, loss_png: str | None) -> str:
    """report.md of the arms run: settings, the table, the loss curves, the verdict, timings."""
    tc, ft = cfg.train, cfg.student.from_teacher if cfg.student else None
    stats_p = f"{cfg.run_dir}/generate/stats.json"
    stats = json.loads(storage.read_text(stats_p)) if storage.exists(stats_p) else {}
    lines = [
        f"# {cfg.run.name}: training arms side by side",
        "",
        f"Teacher `{cfg.all_teachers[0].label}`; student: "
        + (f"the teacher pruned to {ft.layers} layers ({ft.select})" if ft else f"`{cfg.student.model if cfg.student else ''}`")
        + f". Teacher data: {stats.get('total_data_rows', '?')} rows "
        f"({stats.get('total_reject_rows', 0)} rejected), greedy, top-{cfg.generate.logprobs} logprobs.",
        f"Every trained arm: same initial weights, same rows, same order, {tc.epochs} epoch(s), "
        f"global batch {tc.global_batch_size or tc.micro_batch_size * tc.num_workers}, lr {tc.lr:g}, "
        f"{tc.precision}; "
        f"logit arms mix alpha {tc.alpha:g} × logit loss + {1 - tc.alpha:g} × cross-entropy, "
        f"temperature {tc.temperature:g}.",
        f"Scored on {cfg.data.test} (held out), greedy, max {cfg.evaluate.max_tokens} tokens.",
        "",
        "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " | steps | train tok/s |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for name in ["teacher", *arms]:
        f = res.figures.get(name, {})
        t = res.train.get(name, {})
        lines.append(
            f"| {name} | " + " | ".join(_fmt(f.get(k), spec) for k, _, spec in COLUMNS)
            + f" | {_fmt(t.get('steps'), '{}')} | {_fmt(t.get('tokens_per_s'), '{:.0f}')} |"
        )
    word = {True: "met", False: "NOT met", None: "not measured"}
    # With per-prompt intervals the verdict is theirs: a step they cannot rank is "within noise".
    verdict = res.ordering_ci if res.differences else word[res.ordering_met]
    lines += [
        "",
        f"Goal pruned < sft < logit arms on teacher_nll and token_agreement: **{verdict or 'not measured'}**"
        + (" (95% bootstrap intervals over the test prompts)." if res.differences else "."),
    ]
    logit = [a for a in res.figures if a not in ("teacher", PRUNED, "sft")]
    if len(logit) > 1:
        # One verdict per logit arm: which loss beat SFT, not only whether all of them did.
        per = {a: (ordering_ci(res.differences, [PRUNED, "sft", a]) if res.differences
                   else word[ordering(res.figures, [PRUNED, "sft", a])]) for a in logit}
        lines.append("Per arm: " + "; ".join(
            f"pruned < sft < {a}: {v or 'not measured'}" for a, v in per.items()) + ".")
    lines += _differences_table(res.differences)
    lines += _degenerate_arms(res.figures)
    if res.teacher_answers_identical_pct is not None:
        lines.append(
            f"The teacher's greedy answers were identical in every evaluate run on "
            f"{res.teacher_answers_identical_pct:.0f}% of the test prompts."
        )
    if loss_png:
        lines += ["", f"![loss curves]({Path(loss_png).name})"]
    lines += ["", "| phase | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res.seconds.items()]
    lines += ["", "Figures: arms.json; each arm's run folder: arms/<arm>/ (train/, evaluate/)."]
    return "\n".join(lines) + "\n"


def _differences_table(differences: list[dict[str, Any]]) -> list[str]:
    """Arm − arm per scorer: the mean difference, its 95% interval, and the arm it ranks first
    or "within noise" when the interval contains 0."""
    if not differences:
        return []
    scorers = list(dict.fromkeys(d["scorer"] for d in differences))
    pairs = list(dict.fromkeys((d["a"], d["b"]) for d in differences))
    by = {(d["a"], d["b"], d["scorer"]): d for d in differences}
    lines = ["", "Arm − arm, mean over the test prompts [95% paired bootstrap interval]; the better arm, "
             "or within noise where the interval contains 0 (teacher_nll in nats/token, others in points):",
             "", "| arms | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers)]
    for a, b in pairs:
        cells = []
        for sc in scorers:
            d, k = by.get((a, b, sc)), 3 if sc == "teacher_nll" else 1
            cells.append("–" if d is None else f"{d['diff']:+.{k}f} [{d['low']:+.{k}f}, {d['high']:+.{k}f}] "
                         + (f"{d['better']} better" if d["better"] else "within noise"))
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def _degenerate_arms(figures: dict[str, dict[str, Any]]) -> list[str]:
    """Arms whose answers loop (repetition over 1.5× the teacher's) or run to the cap (> 5%)."""
    t = figures.get("teacher", {}).get("repetition")
    bad = []
    for name, f in figures.items():
        rep, cut = f.get("repetition"), f.get("max_tokens_hit_pct")
        why = ([f"{rep:.1f}% repeated 4-grams (teacher {t:.1f}%)"]
               if name != "teacher" and rep is not None and t is not None and rep > 1.5 * max(t, 1.0) else [])
        why += [f"{cut:.0f}% of answers cut at max_tokens"] if cut is not None and cut > 5.0 else []
        if why:
            bad.append(f"{name} ({', '.join(why)})")
    return ["", "**Degenerate output:** " + "; ".join(bad) + "."] if bad else []


def _write_outputs(cfg: DistrayConfig, arms: list[str], res: ArmsResult) -> None:
    from distray.storage import write_text

    loss_png = plot_arms_loss(res.train, f"{cfg.run_dir}/arms_loss.png")
    write_text(f"{cfg.run_dir}/arms.json", json.dumps(asdict(res), indent=2, default=str) + "\n")
    write_text(res.report_path, render_report(cfg, arms, res, loss_png))

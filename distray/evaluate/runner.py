"""The evaluate stage: teacher vs distilled student vs baseline on the test set.

    distray evaluate --config jobs/configs/quickstart.yaml

For each model in `evaluate.models` (and each of `evaluate.extra_models`, any model folder
under its own name: `distray evaluate --model kd=PATH`) the test prompts go through the same
batch generation path as `distray generate` (`distray.teacher.generate_dataset`: Ray Data +
vLLM, HF, or the API teacher), greedy, `evaluate.max_tokens` per answer. Predictions land in
`<run>/evaluate/predictions/<model>.parquet` with a per-row score column per scorer; the
figures in `<run>/evaluate/metrics.json`, plots beside it; report.md shows the table.

metrics.json (every figure; None where it does not apply)::

    {"test_rows": 200, "scorers": ["exact_match", ...], "primary_scorer": "exact_match",
     "models": {"teacher": {"model", "parameters", "weights_mb", "peak_rss_mb", "latency_ms",
                            "ttft_ms", "tpot_ms", "equal_length_latency_ms", "equal_length_tpot_ms",
                            "throughput_rows_per_s", "output_tokens_per_s",
                            "scores": {scorer: value, "teacher_nll", "token_agreement", ...}, ...},
                "student": {...}, "baseline": {...}, "<extra model>": {...}},
     "fidelity": {"scorers": ["teacher_nll", ...], "skipped": {role: reason}},
     "diagnostics": {"scorers": ["repetition"], "repetition_ngram": 4},
     "student_vs_teacher": {"accuracy_retention_pct": {scorer: %}, "latency_reduction_pct",
                            "memory_reduction_pct", "fidelity_change": {scorer: student − teacher}, ...},
     "student_vs_baseline": {"accuracy_gain_pts": {scorer: points}, "fidelity_change": {...}},
     "extra_vs_teacher": {"<extra model>": {same keys as student_vs_teacher}},
     "headline": {...}}

Every model's `scores` also hold `repetition` (% repeated word 4-grams, mean over answers) and
`max_tokens_hit_pct` (% of answers cut at the cap), whatever `evaluate.scorers` says.
`scorers` are the task's scorers (% of rows right); the fidelity scorers
(`distray.evaluate.fidelity`: teacher_nll in nats per token, token_agreement and
rouge_l_vs_teacher in %) sit in the same `scores` of each model, listed under `fidelity`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from distray import formats as F
from distray import inputs, storage
from distray.config import (
    DistrayConfig,
    HFTeacher,
    OpenAITeacher,
    SamplingConfig,
    VLLMTeacher,
)
from distray.engines import engine_for
from distray.errors import ConfigError, DataError, StageError
from distray.evaluate import fidelity
from distray.evaluate.comparison import compare, headline, primary_scorer
from distray.evaluate.efficiency import Efficiency, measure_api, measure_local_remote
from distray.evaluate.scorers import DIAGNOSTIC_SCORERS, REPETITION_N, ScoreResult, score, score_all
from distray.lease import check_fence
from distray.paths import RunPaths

__all__ = ["EvaluateResult", "run", "resolve_models", "test_data_path", "compare"]

logger = logging.getLogger(__name__)

#: Most rows in the timed throughput batch (the whole test set up to this).
THROUGHPUT_ROWS_MAX = 512


@dataclass
class EvaluateResult:
    """What `distray evaluate` wrote, and its headline figures.

    Attributes:
        metrics_path: evaluate/metrics.json.
        predictions: model → predictions Parquet path.
        plots: PNGs drawn (accuracy by model, latency by model).
        models: model → flat figures (parameters, memory, latency, throughput, each scorer).
        comparison: the headline: retention %, latency / memory reduction %, baseline gain.
    """

    metrics_path: str
    predictions: dict[str, str] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Model:
    role: str
    engine: VLLMTeacher | OpenAITeacher | HFTeacher
    path: str | None  # local folder, None for API models


# ---- what to evaluate ---------------------------------------------------------------------


def test_data_path(cfg: DistrayConfig) -> str:
    """The test prompts: `data.test` (a built-in task's split once `distray.prepare` ran).

    Raises:
        ConfigError: no test data.
    """
    if cfg.data.test:
        return cfg.data.test
    raise ConfigError(
        "evaluate needs test prompts with references: set `data.test` (JSONL/Parquet) or "
        "`data.builtin` (a built-in task)"
    )


def _is_model_dir(path: str) -> bool:
    return storage.exists(f"{path.rstrip('/')}/config.json")


def _local_engine(
    cfg: DistrayConfig, role: str, path: str, base: Any = None, placement: dict[str, Any] | None = None
) -> VLLMTeacher | HFTeacher:
    """The engine config that runs a local model in evaluate: `evaluate.backend` for every
    local model, so they are all measured the same way.

    Args:
        placement: the teacher's own vLLM sizing (`VLLMEngine.placement`): a big model keeps
            its TP/PP; evaluate's engine_kwargs apply on top.
    """
    ev = cfg.evaluate
    trust = bool(getattr(base, "trust_remote_code", False))
    if ev.backend == "hf":
        batch = getattr(base, "batch_size", None) or 16
        return HFTeacher(model=path, name=role, batch_size=min(batch, 64), trust_remote_code=trust)
    extra = dict(placement or {})
    kwargs: dict[str, Any] = dict(extra.pop("engine_kwargs", {}))
    kwargs.update(ev.engine_kwargs)
    return VLLMTeacher(model=path, name=role, engine_kwargs=kwargs, trust_remote_code=trust, **extra)


def _extra_model_dir(name: str, path: str) -> str:
    """The local folder of `evaluate.extra_models[name]`: an offline alias fetched, a relative
    path made absolute (Ray workers do not share the driver's cwd), a URI copied to the nodes.

    Raises:
        ConfigError: the path is not a model folder.
    """
    from distray.cluster import localize_model
    from distray.models.aliases import resolve_model

    folder = resolve_model(path)
    if "://" not in folder:
        folder = os.path.abspath(os.path.expanduser(folder))
    if not _is_model_dir(folder):
        raise ConfigError(
            f"`evaluate.extra_models.{name}` ({path}) is not a model folder (no config.json); point "
            "it at a Hugging Face model folder, e.g. --model NAME=runs/x/train/student"
        )
    return localize_model(folder)


def resolve_models(cfg: DistrayConfig) -> list[_Model]:
    """The models `evaluate.models` names, in order teacher, student, baseline, then each of
    `evaluate.extra_models` under its own name (run like the student).

    Raises:
        StageError: the distilled student is asked for but not trained yet.
        ConfigError: the baseline or an extra model's folder does not exist.
    """
    out: list[_Model] = []
    want = cfg.evaluate.models
    if "teacher" in want:
        teachers = cfg.all_teachers
        if not teachers:
            logger.warning("evaluate: no teacher configured; the comparison has no teacher column")
        else:
            t = teachers[0]
            if len(teachers) > 1:
                logger.info("evaluate: %d teachers; the first (%s) is the one compared", len(teachers), t.label)
            engine = engine_for(t)
            if not engine.local:
                out.append(_Model("teacher", t, None))
            else:
                own = _local_engine(cfg, "teacher", t.model, t, engine.placement())
                out.append(_Model("teacher", own, t.model))
    if "student" in want:
        student = RunPaths(cfg.run_dir).student
        if not _is_model_dir(student):
            raise StageError(
                f"the distilled student `{student}` does not exist yet; run `distray train` first, "
                "or drop `student` from evaluate.models"
            )
        from distray.cluster import localize_model

        local = localize_model(student)  # vLLM and transformers load from a local folder
        out.append(_Model("student", _local_engine(cfg, "student", local, cfg.student), local))
    if "baseline" in want:
        base = cfg.evaluate.baseline or (cfg.student.model if cfg.student else None)
        if base is None:
            logger.warning("evaluate: no baseline (set evaluate.baseline or student.model); skipped")
        elif not _is_model_dir(base):
            raise ConfigError(
                f"`evaluate.baseline` ({base}) is not a model folder (no config.json); point it at "
                "a Hugging Face model folder, or drop `baseline` from evaluate.models"
            )
        else:
            # The baseline is the student before distillation: the student's trust_remote_code.
            out.append(_Model("baseline", _local_engine(cfg, "baseline", base, cfg.student), base))
    for name, path in cfg.evaluate.extra_models.items():
        local = _extra_model_dir(name, path)
        out.append(_Model(name, _local_engine(cfg, name, local, cfg.student), local))
    if not out:
        raise ConfigError(f"`evaluate.models` ({want}) leaves nothing to evaluate")
    return out


# ---- predictions --------------------------------------------------------------------------


def _predict(
    model: _Model, cfg: DistrayConfig, test_path: str, n_rows: int
) -> tuple[dict[str, dict[str, Any]], float]:
    """Run one model over the test prompts through generate's batch path.

    Returns:
        `(input id → output row, wall seconds)`.
    """
    from distray.teacher import generate_dataset, read_prompts

    sampling = SamplingConfig(
        temperature=0.0, top_p=1.0, max_tokens=cfg.evaluate.max_tokens, n=1, seed=cfg.run.seed
    )
    t0 = time.perf_counter()
    valid, _rejects = read_prompts(test_path, cfg, max_rows=n_rows)
    ds = generate_dataset(valid, model.engine, cfg, sampling=sampling, logprobs=None)
    rows = ds.take_all()
    wall = time.perf_counter() - t0
    by_id: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = r.get(F.INPUT_ID) or r.get(F.ID)
        by_id[str(key)] = r
    return by_id, wall


def _write_predictions(path: str, table_rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, p = storage.filesystem_for(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    table = pa.Table.from_pylist(table_rows)
    with fs.open_output_stream(p) as f:
        pq.write_table(table, f)


# ---- efficiency ---------------------------------------------------------------------------


def _efficiency(
    model: _Model, cfg: DistrayConfig, prompts: list[list[dict[str, str]]], predict_wall_s: float,
    n_rows: int, out_tokens: int, *, with_answers: bool = False,
) -> Efficiency:
    ev = cfg.evaluate
    engine = engine_for(model.engine)
    ep = engine.endpoint()
    if ep is not None:
        key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
        eff = measure_api(
            ep.base_url, ep.model, prompts, api_key=key, max_tokens=ev.max_tokens,
            latency_samples=ev.latency_samples, timeout_s=ep.timeout_s,
            max_retries=ep.max_retries, backoff_base_s=ep.backoff_base_s, backoff_max_s=ep.backoff_max_s,
        )
        # An API model's throughput is what the prediction run got (max_in_flight requests).
        eff.throughput_rows = n_rows
        eff.throughput_rows_per_s = n_rows / predict_wall_s if predict_wall_s > 0 else None
        eff.output_tokens_per_s = out_tokens / predict_wall_s if predict_wall_s > 0 else None
        eff.method["throughput"] = "the prediction run: rows / wall time with max_in_flight requests"
        return eff
    from distray.ray_utils import cluster_has_gpu, engine_gpus, worker_env

    engine_kwargs = engine.engine_kwargs()
    num_gpus = float(engine_gpus(engine_kwargs)) if cluster_has_gpu() else 0.0
    return measure_local_remote(
        model.path,  # type: ignore[arg-type]
        prompts,
        num_gpus=num_gpus,
        env=worker_env(cfg),
        backend=ev.backend,
        max_tokens=ev.max_tokens,
        latency_samples=ev.latency_samples,
        throughput_rows=min(len(prompts), THROUGHPUT_ROWS_MAX),
        engine_kwargs=engine_kwargs,
        batch_size=getattr(model.engine, "batch_size", 16),
        use_chat_template=getattr(model.engine, "apply_chat_template", True),
        trust_remote_code=getattr(model.engine, "trust_remote_code", False),
        equal_length_tokens=ev.equal_length_tokens,
        with_answers=with_answers,
    )


# ---- the stage ----------------------------------------------------------------------------


def _labels(cfg: DistrayConfig) -> list[str] | None:
    if cfg.task.labels:
        return list(cfg.task.labels)
    if cfg.data.builtin is not None:
        from distray.tasks import builtin_task

        return builtin_task(cfg.data.builtin.name).labels
    return None


def _test_rows(path: str, cfg: DistrayConfig) -> list[dict[str, Any]]:
    from distray.tasks import task_prompts

    system, template = task_prompts(cfg.task)
    rows: list[dict[str, Any]] = []
    for row, _rej in inputs.iter_input_rows(path, system_prompt=system, prompt_template=template):
        if row is not None:
            rows.append(row)
            if cfg.evaluate.max_rows is not None and len(rows) >= cfg.evaluate.max_rows:
                break
    if not rows:
        raise DataError(f"test data `{path}` has no valid rows; check it with `distray data check {path}`")
    return rows


def _answers_while_measuring(m: _Model, cfg: DistrayConfig, rows: list[dict[str, Any]]) -> bool:
    """Whether the efficiency run's throughput batch gives this model's answers.

    It answers every test prompt greedily with `evaluate.max_tokens`, which is what the
    predictions are, so a local model whose test set fits one batch is loaded once instead of
    twice (the Ray Data prediction run starts its own engine: ~20 s for a tiny model on CPU,
    the weights' load time for a big one). Larger test sets, API models and runs without
    efficiency figures go through generate's batch path, which spreads rows over replicas.
    """
    return (
        cfg.evaluate.measure_efficiency
        and m.path is not None
        and os.path.isdir(m.path)
        and 0 < len(rows) <= THROUGHPUT_ROWS_MAX
    )


def _measure_and_answer(
    m: _Model, cfg: DistrayConfig, rows: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], float, Efficiency]:
    """Answers (input id → output row), their wall seconds and the efficiency figures, from one
    engine: the rows go through generate's own prompt checks (`prepare_rows`: chat template,
    `generate.max_prompt_tokens`, room in the context), the accepted ones into the measured
    batch; a refused row gets the same error row generate gives it."""
    from distray import prompts as P
    from distray.engines import common
    from distray.engines.results import ERROR

    engine = m.engine
    path = m.path
    assert path is not None
    trust = bool(getattr(engine, "trust_remote_code", False))
    ctx = engine_for(engine).context_length()
    prepared = common.prepare_rows(
        [{F.ID: str(r[F.ID]), F.MESSAGES: r[F.MESSAGES]} for r in rows],
        model=path, trust_remote_code=trust,
        apply_chat_template=getattr(engine, "apply_chat_template", True),
        max_prompt_tokens=cfg.generate.max_prompt_tokens, max_model_len=ctx,
    )
    ok = [r for r in prepared if not r.get(ERROR)]
    by_id: dict[str, dict[str, Any]] = {}
    for r in prepared:
        if r.get(ERROR):
            by_id[r[F.ID]] = common.empty_result({F.ID: r[F.ID], F.PROMPT_TOKENS: r[F.PROMPT_TOKENS]}, r[ERROR])
    if not ok:
        return by_id, 0.0, Efficiency()
    eff = _efficiency(m, cfg, [r[F.MESSAGES] for r in ok], 0.0, len(ok), 0, with_answers=True)
    eos = P.eos_ids(path, trust)
    for r, a in zip(ok, eff.answers or [], strict=True):
        ids = [int(t) for t in a["token_ids"]]
        by_id[r[F.ID]] = {
            F.ID: r[F.ID], F.RESPONSE: a["text"], F.RESPONSE_TOKEN_IDS: ids,
            F.PROMPT_TOKENS: r[F.PROMPT_TOKENS], F.COMPLETION_TOKENS: len(ids),
            F.FINISH_REASON: common.finish_reason(
                ids, max_tokens=cfg.evaluate.max_tokens, eos=eos,
                prompt_tokens=int(r[F.PROMPT_TOKENS]), max_model_len=ctx,
            ),
            ERROR: None,
        }
    eff.answers = None
    rate = eff.throughput_rows_per_s
    return by_id, (eff.throughput_rows / rate if rate else 0.0), eff


def _answer(m: _Model, cfg: DistrayConfig, rows: list[dict[str, Any]], test_path: str,
            prompts: list[Any]) -> tuple[list[dict[str, Any] | None], dict[str, Any]]:
    """One model's answers to every test row, and its efficiency figures.

    Raises:
        StageError: the model answered none of the rows.
    """
    n = len(rows)
    eff: Efficiency | None = None
    if _answers_while_measuring(m, cfg, rows):
        by_id, wall, eff = _measure_and_answer(m, cfg, rows)
        how = "in the measured batch"
    else:
        by_id, wall = _predict(m, cfg, test_path, n)
        how = "through generate's batch path"
    outs = [by_id.get(str(r[F.ID])) for r in rows]
    answered = sum(1 for o in outs if o is not None and o.get(F.RESPONSE) is not None)
    if answered == 0:
        errors = {str(o.get("error")) for o in outs if o is not None and o.get("error")}
        raise StageError(
            f"evaluate: {m.role} ({m.path or m.engine.model}) answered none of the {n} test "
            f"prompts; errors: {sorted(errors)[:3] or 'none reported'}"
        )
    out_tokens = sum(int(o.get(F.COMPLETION_TOKENS) or 0) for o in outs if o)
    logger.info("evaluate: %s answered %d/%d rows in %.2f s, %s", m.role, answered, n, wall, how)
    if eff is None:
        eff = _efficiency(m, cfg, prompts, wall, n, out_tokens) if cfg.evaluate.measure_efficiency else Efficiency()
    figures = {
        "model": m.path or m.engine.model,
        "backend": "openai" if m.path is None else cfg.evaluate.backend,
        **{k: v for k, v in eff.to_dict().items() if k not in ("method", "backend", "answers")},
        "predict_wall_s": wall,
        "answered_rows": answered,
        "output_tokens": out_tokens,
        "efficiency_method": eff.method,
    }
    return outs, figures


def _prediction_rows(
    role: str, rows: list[dict[str, Any]], outs: list[dict[str, Any] | None], scored: dict[str, ScoreResult]
) -> list[dict[str, Any]]:
    """The predictions table of one model: the prompt, the answer, engine stats, per-row scores."""
    table = []
    for i, r in enumerate(rows):
        o = outs[i] or {}
        rec: dict[str, Any] = {
            F.ID: str(r[F.ID]),
            F.PROMPT: r.get(F.PROMPT),
            "prompt_text": "\n".join(t["content"] for t in r[F.MESSAGES]),
            F.REFERENCE: r.get(F.REFERENCE),
            F.RESPONSE: o.get(F.RESPONSE),
            F.FINISH_REASON: o.get(F.FINISH_REASON),
            F.PROMPT_TOKENS: o.get(F.PROMPT_TOKENS),
            F.COMPLETION_TOKENS: o.get(F.COMPLETION_TOKENS),
            "error": o.get("error"),
            "model": role,
        }
        for name, res in scored.items():
            rec[f"score_{name}"] = res.per_row[i] if res.per_row else None
        table.append(rec)
    return table


def _fidelity(
    cfg: DistrayConfig, models: list[_Model], outputs: dict[str, list[dict[str, Any] | None]],
    rows: list[dict[str, Any]], names: list[str],
) -> fidelity.FidelityResult:
    """The fidelity scorers of every model (teacher-forced ones in Ray workers)."""
    if not names:
        return fidelity.FidelityResult()
    from distray.ray_utils import cluster_has_gpu, worker_env

    return fidelity.measure(
        names, models, outputs, [r[F.MESSAGES] for r in rows],
        num_gpus=1.0 if cluster_has_gpu() else 0.0, env=worker_env(cfg),
    )


def run(cfg: DistrayConfig) -> EvaluateResult:
    """Evaluate teacher, distilled student and baseline on the test set.

    Args:
        cfg: the prepared run config (evaluate, data.test, teacher, student).

    Returns:
        EvaluateResult with the metrics, predictions and plot paths and the headline figures.

    Raises:
        ConfigError: no test data, or nothing to evaluate.
        StageError: the student is not trained yet, or a model produced no predictions.
    """
    from distray.ray_utils import init_ray

    init_ray(cfg)
    paths = RunPaths(cfg.run_dir)
    test_path = test_data_path(cfg)
    rows = _test_rows(test_path, cfg)
    refs = [r.get(F.REFERENCE) for r in rows]
    models = resolve_models(cfg)
    labels = _labels(cfg)
    scorers: list[str] = [
        s for s in cfg.evaluate.scorers if s not in fidelity.FIDELITY_SCORERS + DIAGNOSTIC_SCORERS
    ]
    fid_names = fidelity.fidelity_scorers(cfg.evaluate.scorers, cfg.evaluate.fidelity)
    logger.info(
        "evaluate: %d test rows from %s; models %s; scorers %s; fidelity %s",
        len(rows), test_path, [m.role for m in models], scorers, fid_names,
    )
    outputs: dict[str, list[dict[str, Any] | None]] = {}
    figures: dict[str, dict[str, Any]] = {}
    for m in models:
        outputs[m.role], figures[m.role] = _answer(m, cfg, rows, test_path, [r[F.MESSAGES] for r in rows])
    preds = {role: [o.get(F.RESPONSE) if o else None for o in outs] for role, outs in outputs.items()}
    fid = _fidelity(cfg, models, outputs, rows, fid_names)

    pred_paths: dict[str, str] = {}
    for m in models:
        scored = score_all(
            scorers, preds[m.role], refs,
            teacher_preds=None if m.role == "teacher" else preds.get("teacher"),
            labels=labels, regex=cfg.evaluate.regex,
        )
        scored.update(fid.scores.get(m.role, {}))
        # Always: a student that loops or never stops must show in every report.
        scored["repetition"] = score(
            "repetition", preds[m.role], refs,
            finish_reasons=[o.get(F.FINISH_REASON) if o else None for o in outputs[m.role]],
        )
        scores: dict[str, float | None] = {}
        for name, res in scored.items():
            scores[name] = res.value
            scores.update(res.extra)
        figures[m.role]["scores"] = scores
        figures[m.role]["scored_rows"] = {name: res.n for name, res in scored.items()}
        pred_paths[m.role] = f"{paths.predictions}/{m.role}.parquet"
        check_fence(cfg.run_dir, f"evaluate predictions {pred_paths[m.role]}")
        _write_predictions(pred_paths[m.role], _prediction_rows(m.role, rows, outputs[m.role], scored))

    metrics: dict[str, Any] = {
        "test_data": test_path,
        "test_rows": len(rows),
        "rows_with_reference": sum(1 for x in refs if x is not None),
        "scorers": scorers,
        "primary_scorer": primary_scorer(scorers),
        "labels": labels,
        "max_tokens": cfg.evaluate.max_tokens,
        "models": figures,
        "fidelity": {"scorers": fid_names, "skipped": fid.skipped},
        "diagnostics": {"scorers": list(DIAGNOSTIC_SCORERS), "repetition_ngram": REPETITION_N},
        **compare(figures, scorers, fid_names),
        # Each extra model against the teacher, as the student is (retention, fidelity change).
        "extra_vs_teacher": {
            name: compare({"student": figures[name], "teacher": figures.get("teacher", {})},
                          scorers, fid_names)["student_vs_teacher"]
            for name in cfg.evaluate.extra_models
        },
    }
    metrics["headline"] = headline(metrics)
    check_fence(cfg.run_dir, f"evaluate metrics {paths.eval_metrics}")
    storage.write_text(paths.eval_metrics, json.dumps(metrics, indent=2, default=str) + "\n")

    from distray.plots import plot_accuracy, plot_latency

    drawn = (plot_accuracy(metrics, f"{paths.evaluate}/accuracy.png"),
             plot_latency(metrics, f"{paths.evaluate}/latency.png"))
    plots = [p for p in drawn if p]
    flat = {
        role: {
            **{k: v for k, v in fig.items() if k not in ("scores", "scored_rows", "efficiency_method")},
            **fig["scores"],
        }
        for role, fig in figures.items()
    }
    logger.info(
        "evaluate: metrics %s, predictions %s, plots %s; headline %s",
        paths.eval_metrics, paths.predictions, plots, metrics["headline"],
    )
    return EvaluateResult(
        metrics_path=paths.eval_metrics,
        predictions=pred_paths,
        plots=plots,
        models=flat,
        comparison=metrics["headline"],
    )

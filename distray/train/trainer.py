"""Stage 2: fine-tune the student on teacher data with Ray Train × DeepSpeed ZeRO.

    distray train --config jobs/configs/quickstart.yaml train.loss=kd train.zero_stage=3

`run(cfg)` trains on the teacher data of the run (`<run>/generate/data/train/*.parquet`, and
`<run>/generate/data/validation/` as validation when generate labelled one) and writes `<run>/train/`:
`checkpoints/` (Ray Train), `student/` (the exported Hugging Face folder), `metrics.jsonl` and
`loss.png`.

`train_model(cfg, data, out_dir, answers="reference")` is the same machinery without a teacher:
plain SFT on the ground-truth `reference` answers of an input JSONL/Parquet file (the format of
`distray.formats`), or on a Ray Dataset. The quickstart uses it to train its stand-in teacher and
the few-label baseline student.

This module orchestrates: datasets (`distray.train.datasets`), the plan (`distray.train.plan`),
the workers (`distray.train.loop`) and the export (`distray.train.export`).

Rerunning with the same output folder resumes from the latest checkpoint (Ray Train restores
its checkpoint list from storage), after a driver kill as after a worker crash.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from distray.config import DistrayConfig
from distray.errors import ConfigError, DataError, LeaseLostError, StageError
from distray.paths import RunPaths
from distray.train.datasets import Answers, RunDatasets, build_datasets, teacher_splits
from distray.train.plan import WorkerPlan, build_worker_plan
from distray.train.records import export_record, write_deepspeed_config

__all__ = ["TrainResult", "deterministic_cause", "run", "train_model"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced, and its figures.

    `epochs` counts completed passes over the data; `tokens_per_s` is non-padding tokens over
    all workers per second of training (start-up, evaluation and checkpoints excluded);
    `resumed_from_step` is the step the last (re)start continued from, 0 for a fresh run;
    `duplicate_rows` counts rows left out because another row has their id.
    `checkpoint_dir` is the checkpoint exported to `student_dir`: the latest, or the one at the
    best validation loss when early stopping ended the run (`val_loss` is then the last
    evaluation's, `best_val_loss` the exported weights').
    """

    student_dir: str
    checkpoint_dir: str | None
    metrics_path: str
    loss_plot: str | None
    steps: int
    epochs: int
    train_rows: int
    validation_rows: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    train_time_s: float
    elapsed_s: float
    truncated: int
    no_target: int
    resumed_from_step: int
    num_workers: int
    zero_stage: int
    use_gpu: bool
    loss: str
    duplicate_rows: int = 0


def run(cfg: DistrayConfig) -> TrainResult:
    """Train the student on the run's teacher data and export it to `<run>/train/student`
    (the `off_policy` variant; `distray.train.variants.run` picks by `train.mode`).

    Raises:
        ConfigError: no student, settings that contradict each other, or `train.mode`
            on_policy (its rounds run from `distray.train.variants`).
        DataError: missing teacher data, vocabulary mismatch for logit losses.
        StageError: training failed after `train.max_failures` restarts.
    """
    if cfg.train.mode != "off_policy":
        raise ConfigError(
            f"`train.mode` ({cfg.train.mode}) is not trained by train.trainer.run; run the train "
            "stage (`distray train`, or distray.train.variants.run) to pick the variant"
        )
    paths = RunPaths(cfg.run_dir)
    train_data, validation_data = teacher_splits(paths)
    return train_model(
        cfg, train_data, paths.train, validation_data=validation_data, answers="teacher"
    )


def train_model(
    cfg: DistrayConfig,
    data: Any,
    out_dir: str,
    *,
    validation_data: Any = None,
    answers: Answers = "teacher",
    model: str | None = None,
    max_rows: int | None = None,
) -> TrainResult:
    """Train `model` (default `cfg.student.model`) and export it to `<out_dir>/student`.

    Args:
        cfg: the run config; `train` and `student` sections are read.
        data: teacher data (a Parquet folder in TEACHER_DATA_SCHEMA, or a Ray Dataset of such
            rows) when `answers="teacher"`; input rows with `reference` (JSONL/Parquet file or
            folder, or a Ray Dataset of input rows) when `answers="reference"`.
        out_dir: gets `checkpoints/`, `student/`, `metrics.jsonl`, `loss.png`. Reusing a folder
            resumes from its latest checkpoint.
        validation_data: same kind as `data`; None holds out `train.validation_fraction` of
            `data` by a hash of the input id (`input_id`, else `id`).
        answers: `teacher` (learn the teacher's answers, SFT or logit losses) or `reference`
            (SFT on ground truth; no teacher involved).
        model: student folder to start from; default `cfg.student.model`.
        max_rows: use at most this many training rows (after the validation hold-out).

    Returns:
        Paths and figures of the run.

    Raises:
        ConfigError: no student folder; a logit loss on references; batch settings that
            contradict each other.
        DataError: no rows; teacher data without top-k for a logit loss; teacher and student
            vocabularies that differ (logit losses), all before any worker starts.
        StageError: training failed after `train.max_failures` restarts.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    model = _student_folder(cfg, model)
    tokenizer_dir = os.path.abspath((cfg.student.tokenizer if cfg.student else None) or model)
    data, validation_data = _abs_local(data), _abs_local(validation_data)
    if answers == "reference" and tc.is_logit_loss:
        raise ConfigError(
            f"`train.loss` ({tc.loss}) needs teacher logprobs, but training on ground-truth "
            "references has none; use train.loss: sft"
        )

    from distray.ray_utils import cluster_has_gpu, init_ray

    init_ray(cfg)
    out_dir = out_dir.rstrip("/")
    if "://" not in out_dir:
        out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)

    # Lazy datasets: executed on the cluster and streamed to the workers.
    d = build_datasets(
        cfg, data, validation_data, answers=answers, model=model, tokenizer_dir=tokenizer_dir,
        max_rows=max_rows,
    )
    use_gpu = tc.use_gpu if tc.use_gpu is not None else cluster_has_gpu()
    n_train, n_val = _count_rows(d, tc.num_workers, data, answers, cfg.run.seed)
    plan = build_worker_plan(
        cfg, n_train, model=model, tokenizer=tokenizer_dir, out_dir=out_dir, use_gpu=use_gpu,
        use_teacher_ids=d.use_teacher_ids, with_topk=d.with_topk, has_validation=d.validation is not None,
    )
    _attach_ids(cfg, plan, d)
    _log_plan(cfg, plan, n_train, n_val)
    write_deepspeed_config(plan)
    result = _fit(cfg, plan, d.for_workers())
    checkpoint, student_dir = _export(
        cfg, plan, result, data=data, validation_data=validation_data, answers=answers
    )

    from distray.plots import plot_loss
    from distray.storage import exists, read_text

    records = (
        [json.loads(line) for line in read_text(plan.metrics_path).splitlines() if line.strip()]
        if exists(plan.metrics_path)
        else []
    )
    plot = plot_loss(records, f"{out_dir}/loss.png")
    m = dict(result.metrics or {})
    res = _result_from(
        m, student_dir=student_dir, checkpoint=checkpoint, plan=plan, plot=plot,
        n_train=n_train, n_val=n_val, t_start=t_start, cfg=cfg, duplicates=d.duplicates,
    )
    if res.truncated or res.no_target:
        logger.warning(
            "%d of %d training examples were cut to train.max_seq_len (%d); %d kept no answer "
            "token at all",
            res.truncated,
            m.get("examples", 0),
            tc.max_seq_len,
            res.no_target,
        )
    logger.info(
        "train done: %d steps, train_loss %s, val_loss %s, %.0f tok/s → student %s, metrics %s, "
        "plot %s, checkpoints %s/checkpoints",
        res.steps,
        _f(res.train_loss),
        _f(res.val_loss),
        res.tokens_per_s,
        student_dir,
        plan.metrics_path,
        plot,
        out_dir,
    )
    return res


def _student_folder(cfg: DistrayConfig, model: str | None) -> str:
    """The absolute student folder: `model`, else `student.model`.

    Raises:
        ConfigError: no student set, or not a local folder.
    """
    if model is None:
        if cfg.student is None:
            raise ConfigError("`student.model` is not set; name the student's Hugging Face folder")
        model = cfg.student.model
    if not os.path.isdir(model):
        raise ConfigError(f"student model `{model}` is not a local folder; set student.model")
    # Workers do not share the driver's working directory: hand them absolute paths.
    return os.path.abspath(model)


def _count_rows(d: RunDatasets, world: int, data: Any, answers: Answers, seed: int) -> tuple[int, int]:
    """(train rows, validation rows), each id once; drops a validation set smaller than the
    worker count.

    Raises:
        DataError: no training rows.
    """
    d.collect_ids(seed)
    n_train = len(d.train_ids)
    if n_train == 0:
        what = " with a `reference` answer" if answers == "reference" else ""
        raise DataError(f"no training rows{what} in `{data}`")
    n_val = len(d.validation_ids) if d.validation_ids is not None else 0
    if d.validation is not None and n_val < world:
        logger.warning(
            "validation has %d rows, fewer than the %d workers; training without validation loss",
            n_val,
            world,
        )
        d.validation, d.validation_ids, n_val = None, None, 0
    return n_train, n_val


def _attach_ids(cfg: DistrayConfig, plan: WorkerPlan, d: RunDatasets) -> None:
    """Hand the row ids to the workers (through the object store) with the order's digest."""
    import ray

    from distray.train.order import order_digest

    world = cfg.train.num_workers
    plan.train_ids = ray.put(d.train_ids)
    plan.order_digest = order_digest(d.train_ids, cfg.run.seed, world)
    if d.validation is not None and d.validation_ids is not None:
        plan.validation_ids = ray.put(d.validation_ids)
        plan.validation_rows_per_worker = len(d.validation_ids) // world


def _log_plan(cfg: DistrayConfig, plan: WorkerPlan, n_train: int, n_val: int) -> None:
    tc = cfg.train
    logger.info(
        "train: %d rows (%d validation), %d workers × micro %d × accum %d = %d seq/step, "
        "%d steps (%d/epoch), ZeRO-%d, %s, loss %s, %s",
        n_train,
        n_val,
        tc.num_workers,
        plan.micro_batch_size,
        plan.accumulation_steps,
        plan.ds_config["train_batch_size"],
        plan.total_steps,
        plan.steps_per_epoch,
        tc.zero_stage,
        tc.precision,
        tc.loss,
        "GPU/nccl" if plan.use_gpu else "CPU/gloo",
    )


def _fit(cfg: DistrayConfig, plan: WorkerPlan, datasets: dict[str, Any]) -> Any:
    """Run the TorchTrainer; the Ray Train Result.

    Raises:
        StageError: training failed after `train.max_failures` restarts, or left no checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from distray.ray_utils import worker_env
    from distray.train.loop import train_loop_per_worker

    tc = cfg.train
    out_dir = plan.out_dir
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if plan.use_gpu else {})}
    # With validation, checkpoints are ranked by the loss of their own weights (the loop reports
    # it), so the best survives train.keep_checkpoints; Ray Train always keeps the latest too.
    scored: dict[str, Any] = (
        {"checkpoint_score_attribute": "checkpoint_val_loss", "checkpoint_score_order": "min"}
        if plan.has_validation
        else {}
    )
    run_config: Any = ray.train.RunConfig(
        # A fixed name under the run folder: rerunning finds the snapshot and resumes.
        name="checkpoints",
        storage_path=out_dir,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints, **scored),
        worker_runtime_env={"env_vars": worker_env(cfg)},  # type: ignore[call-arg]
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The validated config crosses once, as itself (pickled with the plan; no worker
        # validates it again). The datasets too: each worker reads its own rows in the run's
        # order (`distray.train.order`), so Ray Train does not split them.
        train_loop_config={"cfg": cfg, "plan": plan, "datasets": datasets},
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and worker errors
        cause = deterministic_cause(e)
        if cause is not None:
            # Changed data or settings fail every restart alike; "rerun to resume" would too.
            raise type(cause)(
                f"training stopped: {cause} (each of the {tc.max_failures} restart(s) failed the "
                "same way, and a rerun would too until that is fixed)"
            ) from e
        raise StageError(
            f"training failed after {tc.max_failures} restart(s) (train.max_failures): {e}. "
            f"Rerun the same command to resume from the latest checkpoint in {out_dir}/checkpoints"
        ) from e
    if result.checkpoint is None:
        raise StageError(f"training reported no checkpoint into {out_dir}/checkpoints")
    return result


def deterministic_cause(error: BaseException) -> ConfigError | DataError | LeaseLostError | None:
    """The ConfigError, DataError or LeaseLostError a worker raised inside a Ray Train failure,
    if any.

    Those come from the data or the settings (rows changed under a checkpoint, a token id
    outside the vocabulary) or from another run holding the folder now, so restarting cannot
    help; anything else (a lost node, an
    out-of-memory kill) may pass on a rerun. Ray Train wraps a worker's exception in
    `WorkerGroupError.worker_failures` and a traceback holder (`_base_exc`); Ray tasks in
    `RayTaskError.cause`.
    """
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ConfigError, DataError, LeaseLostError)):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        for attr in ("controller_failure", "_base_exc", "cause", "__cause__", "__context__"):
            todo.append(getattr(e, attr, None))
    return None


def _export(
    cfg: DistrayConfig, plan: WorkerPlan, result: Any, *, data: Any, validation_data: Any, answers: str
) -> tuple[str, str]:
    """Export the chosen checkpoint to `<out_dir>/student`, with its `distray_export.json`;
    (checkpoint path, student folder).

    The export is a Ray task on the cluster, next to storage, once the workers are gone.
    """
    import ray

    from distray.train.export import checkpoint_uri, export_checkpoint, export_source

    checkpoint = checkpoint_uri(export_source(result), plan.out_dir)
    record = export_record(
        cfg, plan, data=data, validation_data=validation_data, answers=answers,
        metrics=dict(result.metrics or {}), checkpoint=checkpoint,
    )
    student_dir = f"{plan.out_dir}/student"
    lora = cfg.student.lora.model_dump() if (cfg.student and cfg.student.lora) else None
    export_task: Any = ray.remote(num_cpus=1)(export_checkpoint)
    ray.get(
        export_task.remote(
            checkpoint,
            plan.model,
            student_dir,
            tokenizer=plan.tokenizer,
            lora=lora,
            trust_remote_code=cfg.student.trust_remote_code if cfg.student else False,
            fence=plan.fence,
            record=record,
        )
    )
    return checkpoint, student_dir


def _result_from(
    m: dict[str, Any], *, student_dir: str, checkpoint: str, plan: WorkerPlan, plot: str | None,
    n_train: int, n_val: int, t_start: float, cfg: DistrayConfig, duplicates: int,
) -> TrainResult:
    tc = cfg.train
    return TrainResult(
        student_dir=student_dir,
        checkpoint_dir=checkpoint,
        metrics_path=plan.metrics_path,
        loss_plot=plot,
        steps=int(m.get("step", 0)),
        epochs=int(m.get("epoch", 0)),
        train_rows=n_train,
        validation_rows=n_val,
        train_loss=m.get("train_loss"),
        val_loss=m.get("val_loss"),
        best_val_loss=m.get("best_val_loss"),
        tokens_per_s=float(m.get("tokens_per_s", 0.0)),
        train_time_s=float(m.get("train_time_s", 0.0)),
        elapsed_s=time.perf_counter() - t_start,
        truncated=int(m.get("truncated", 0)),
        no_target=int(m.get("no_target", 0)),
        resumed_from_step=int(m.get("resumed_from_step", 0)),
        duplicate_rows=duplicates,
        num_workers=tc.num_workers,
        zero_stage=tc.zero_stage,
        use_gpu=plan.use_gpu,
        loss=tc.loss,
    )


def _abs_local(source: Any) -> Any:
    """An absolute path for a local path string; URIs and Ray Datasets unchanged."""
    if isinstance(source, str) and "://" not in source:
        return os.path.abspath(source)
    return source


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"

"""What the driver decides before any worker starts: the DeepSpeed config and the step plan.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q -k "deepspeed or step_plan"

`build_deepspeed_config` merges `train.deepspeed` (DeepSpeed's own names) over distray's defaults
and makes the three batch fields agree with the world size. `plan_steps` turns rows, workers and
batch sizes into optimizer steps, and `lr_lambda` is the learning-rate schedule over them. `WorkerPlan` carries both, with the resolved paths, to every
Ray Train worker (the config travels beside it, unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from distray.config import DistrayConfig, TrainConfig, deep_merge
from distray.errors import ConfigError, DataError
from distray.lease import Fence, current

__all__ = ["WorkerPlan", "build_deepspeed_config", "build_worker_plan", "lr_lambda", "plan_steps"]

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class WorkerPlan:
    """What the driver resolved for the workers (everything else is in the config).

    Attributes:
        model: absolute path of the student folder training starts from.
        tokenizer: absolute path of the student's tokenizer folder.
        out_dir: the train output folder (local path or URI).
        metrics_path: `<out_dir>/metrics.jsonl`, written by rank 0.
        ds_config: the DeepSpeed config (`build_deepspeed_config`).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per pass over a worker's shard.
        micro_batches_per_epoch: micro-batches in a worker's shard, the skipped tail included.
        epochs: passes over the data (more than `train.epochs` when `train.max_steps` asks).
        use_teacher_ids: train on the teacher's `response_token_ids` (else re-tokenise the text).
        with_topk: batches carry the teacher's top-k (logit losses).
        has_validation: a `validation` dataset shard exists.
        seed: `run.seed`.
        use_gpu: nccl on GPUs, else gloo on CPUs.
        rows_per_worker: training rows each worker reads per epoch (its list in
            `distray.train.order`; the tail that fills no accumulation group is not read).
        validation_rows_per_worker: validation rows each worker reads (equal on every worker:
            ZeRO-3's forward is a collective).
        order_digest: identifies the row list, seed and worker count (`order.order_digest`).
        train_ids: the run's sorted unique training ids (a Ray ObjectRef to a pyarrow array).
        validation_ids: the same for validation, or None.
        fence: the run folder lease's fence (`distray.lease`), checked before a checkpoint or
            the student is published; None when the driver holds no lease.
    """

    model: str
    tokenizer: str
    out_dir: str
    metrics_path: str
    ds_config: dict[str, Any]
    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int
    epochs: int
    use_teacher_ids: bool
    with_topk: bool
    has_validation: bool
    seed: int
    use_gpu: bool
    rows_per_worker: int = 0
    validation_rows_per_worker: int = 0
    order_digest: str = ""
    train_ids: Any = None
    validation_ids: Any = None
    fence: Fence | None = None

    @property
    def micro_batch_size(self) -> int:
        """Sequences per worker per forward pass."""
        return int(self.ds_config["train_micro_batch_size_per_gpu"])

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return int(self.ds_config["gradient_accumulation_steps"])


def _user_int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    return None if v is None or v == "auto" else int(v)


def build_deepspeed_config(tc: TrainConfig, world_size: int, *, use_gpu: bool) -> dict[str, Any]:
    """distray's DeepSpeed config with `train.deepspeed` merged over it (DeepSpeed's names).

    The three batch fields are made consistent with the world size:
    `train_batch_size = train_micro_batch_size_per_gpu × world_size × gradient_accumulation_steps`.
    Values the user set in `train.deepspeed` win (`"auto"` counts as unset); the missing ones are
    derived, from `train.global_batch_size` when set.

    Raises:
        ConfigError: the batch fields contradict each other or the world size.
    """
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if tc.zero_stage >= 2:
        zero["overlap_comm"] = use_gpu
    base: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16"},
        # distray prints its own step line.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if tc.grad_clip is not None:
        base["gradient_clipping"] = tc.grad_clip
    if tc.offload_optimizer:
        # Optimizer offload needs DeepSpeed's CPU Adam, which only DeepSpeed can build.
        base["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.95]},
        }
    user = dict(tc.deepspeed)
    merged = deep_merge(base, {k: v for k, v in user.items() if k not in _BATCH_KEYS})

    micro = _user_int(user, "train_micro_batch_size_per_gpu") or tc.micro_batch_size
    accum = _user_int(user, "gradient_accumulation_steps")
    total = _user_int(user, "train_batch_size")
    per_step = micro * world_size
    if total is None and accum is None and tc.global_batch_size is not None:
        total = tc.global_batch_size
    if total is not None and accum is not None and total != per_step * accum:
        raise ConfigError(
            f"`train.deepspeed.train_batch_size` ({total}) must equal micro ({micro}) × workers "
            f"({world_size}) × gradient_accumulation_steps ({accum}) = {per_step * accum}; "
            "set only one of them"
        )
    if accum is None:
        total = total or per_step
        if total % per_step:
            raise ConfigError(
                f"global batch ({total}) must be divisible by micro_batch_size × num_workers "
                f"({micro} × {world_size} = {per_step}); adjust train.global_batch_size"
            )
        accum = total // per_step
    merged["train_micro_batch_size_per_gpu"] = micro
    merged["gradient_accumulation_steps"] = accum
    merged["train_batch_size"] = per_step * accum
    return merged


def plan_steps(
    n_rows: int, world_size: int, micro: int, accum: int, epochs: int, max_steps: int | None
) -> tuple[int, int, int, int]:
    """Optimizer steps the run will take.

    Shards are equal (`n_rows // world_size` rows each); the micro-batches of an epoch that do
    not fill a whole accumulation group are skipped. `max_steps` overrides `epochs` (as in
    transformers): the data is repeated as often as needed.

    Returns:
        `(total_steps, steps_per_epoch, micro_batches_per_epoch, epochs)`.

    Raises:
        DataError: too few rows for one optimizer step.
    """
    rows_per_worker = n_rows // world_size
    micro_batches = math.ceil(rows_per_worker / micro)
    steps_per_epoch = micro_batches // accum
    if steps_per_epoch < 1:
        raise DataError(
            f"{n_rows} training rows give {rows_per_worker} per worker ({world_size} workers), "
            f"fewer than one optimizer step needs (micro_batch_size {micro} × accumulation "
            f"{accum}); add data or lower train.global_batch_size / num_workers"
        )
    if max_steps is not None:
        return max_steps, steps_per_epoch, micro_batches, math.ceil(max_steps / steps_per_epoch)
    return steps_per_epoch * epochs, steps_per_epoch, micro_batches, epochs


def build_worker_plan(
    cfg: DistrayConfig,
    n_train: int,
    *,
    model: str,
    tokenizer: str,
    out_dir: str,
    use_gpu: bool,
    use_teacher_ids: bool,
    with_topk: bool,
    has_validation: bool,
) -> WorkerPlan:
    """The plan for `n_train` training rows on `train.num_workers` workers.

    Raises:
        ConfigError: batch settings that contradict each other (`build_deepspeed_config`).
        DataError: too few rows for one optimizer step (`plan_steps`).
    """
    tc = cfg.train
    ds_config = build_deepspeed_config(tc, tc.num_workers, use_gpu=use_gpu)
    total_steps, steps_per_epoch, micro_per_epoch, epochs = plan_steps(
        n_train,
        tc.num_workers,
        int(ds_config["train_micro_batch_size_per_gpu"]),
        int(ds_config["gradient_accumulation_steps"]),
        tc.epochs,
        tc.max_steps,
    )
    return WorkerPlan(
        model=model,
        tokenizer=tokenizer,
        out_dir=out_dir,
        metrics_path=f"{out_dir}/metrics.jsonl",
        ds_config=ds_config,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        micro_batches_per_epoch=micro_per_epoch,
        epochs=epochs,
        use_teacher_ids=use_teacher_ids,
        with_topk=with_topk,
        has_validation=has_validation,
        seed=cfg.run.seed,
        use_gpu=use_gpu,
        rows_per_worker=min(
            n_train // tc.num_workers,
            steps_per_epoch * int(ds_config["gradient_accumulation_steps"])
            * int(ds_config["train_micro_batch_size_per_gpu"]),
        ),
        fence=current(cfg.run_dir),
    )


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`.

    Step 0 of the warm-up already trains at lr/warmup (DeepSpeed's WarmupCosineLR starts at 0 and
    forces ≥ 2 warm-up steps, which is why distray passes its own LambdaLR).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

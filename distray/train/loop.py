"""The Ray Train worker function: one DeepSpeed engine per worker, streamed batches, KD losses.

    (started by distray.train.trainer.train_model through ray.train.torch.TorchTrainer)

Why our own loop rather than transformers' Trainer under Ray Train: DeepSpeed's engine already
does gradient accumulation, clipping, mixed precision, ZeRO partitioning, LR stepping and sharded
checkpoints, so the loop that is left is ~forward, loss, backward, step. KD needs the teacher's
top-k tensors in every batch and a custom loss: with HF Trainer that means a Trainer subclass
(`compute_loss`), `remove_unused_columns=False`, an IterableDataset wrapper around the Ray Data
shard with a guessed `max_steps`, and a callback for the `ray.train.report` cadence — more code,
and resume/export would go through two checkpoint systems instead of one.

Every worker runs the same number of micro-batches (the Ray Data shards are split with
`equal=True`, and a tail that does not fill a whole accumulation group is skipped), which
ZeRO's collectives need. `ray.train.report` is called at the same steps on every worker.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from distray.config import DistrayConfig

__all__ = ["WorkerPlan", "TrainState", "train_loop_per_worker", "lr_lambda"]

logger = logging.getLogger(__name__)

#: `checkpoint_val_loss` of a checkpoint whose weights were not evaluated. Ray Train ranks every
#: checkpoint by it, and needs a number: None fails its sort, inf turns null in its snapshot.
NOT_EVALUATED = 1e30


@dataclass
class WorkerPlan:
    """What the driver resolved for the workers (everything else is in the config)."""

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


@dataclass
class TrainState:
    """Progress saved in every checkpoint (DeepSpeed `client_state`)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    early_stopped: bool = False
    train_tokens: int = 0
    train_time_s: float = 0.0
    truncated: int = 0
    no_target: int = 0
    examples: int = 0
    last_val_loss: float | None = None
    last_train_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


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


def _worker_logging(rank: int) -> None:
    # A Ray worker is a fresh process: the CLI's logging setup does not reach it. Rank 0 gets a
    # handler on the `distray` logger so its step lines reach the driver console through Ray;
    # other ranks stay quiet.
    lg = logging.getLogger("distray")
    if rank == 0 and not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    for name in ("deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _fmt_count(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _load_model(plan: WorkerPlan, cfg: DistrayConfig, dtype: Any) -> tuple[Any, Any]:
    """The student (LoRA-wrapped when configured). Returns (model, keepalive).

    Under ZeRO-3 a live `HfDeepSpeedConfig` makes `from_pretrained` partition the weights while
    loading (deepspeed.zero.Init), so no worker ever holds the whole model; it must stay alive
    until `deepspeed.initialize`, hence the keepalive.
    """
    from transformers import AutoModelForCausalLM

    keepalive = None
    if plan.ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(plan.ds_config)
    model: Any = AutoModelForCausalLM.from_pretrained(
        plan.model, dtype=dtype, trust_remote_code=cfg.student.trust_remote_code if cfg.student else False
    )
    model.config.use_cache = False
    lora = cfg.student.lora if cfg.student else None
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model, keepalive


def _arrow_collate(inner: Any) -> Any:
    """Wrap a collator so Ray Data hands it pyarrow Tables (no per-column numpy conversion)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Arrow(ArrowBatchCollateFn):
        def __call__(self, batch: Any) -> Any:
            return inner(batch)

    return _Arrow()


def _batch_to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def _forward(engine: Any, batch: dict[str, Any]) -> Any:
    # use_cache=False matters beyond memory: with a cache object transformers does not read
    # packed `position_ids` as sequence boundaries.
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return engine(**kwargs).logits


def _batch_loss(engine: Any, batch: dict[str, Any], tc: Any) -> Any:
    """The configured loss of one micro-batch (training and validation use the same)."""
    from distray.train.losses import compute_loss

    return compute_loss(
        _forward(engine, batch),
        batch["labels"],
        loss=tc.loss,
        alpha=tc.alpha,
        temperature=tc.temperature,
        topk_ids=batch.get("topk_ids"),
        topk_logprobs=batch.get("topk_logprobs"),
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (`TorchTrainer(train_loop_per_worker, train_loop_config=...)`).

    Args:
        config: {"cfg": DistrayConfig as a dict, "plan": WorkerPlan as a dict}.
    """
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from distray.formats import write_text
    from distray.train.data import ChatEncoder, Collator

    cfg = DistrayConfig.model_validate(config["cfg"])
    plan = WorkerPlan(**config["plan"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _worker_logging(rank)

    if plan.use_gpu:
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ray sets OMP threads from the worker's CPU share; torch needs telling too.
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    torch.manual_seed(plan.seed + rank)
    # Ray Train has set up torch.distributed already; DeepSpeed adopts that process group
    # (its config checks, e.g. ZeRO-3's at model load, need the world size).
    deepspeed.init_distributed(dist_backend="nccl" if plan.use_gpu else "gloo")

    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = ChatEncoder(tokenizer, tc.max_seq_len)
    collator = _arrow_collate(
        Collator(
            encoder,
            pad_id,
            with_topk=plan.with_topk,
            packing=tc.packing,
            use_teacher_ids=plan.use_teacher_ids,
        )
    )

    model, keepalive = _load_model(plan, cfg, torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_cfg = plan.ds_config
    kwargs: dict[str, Any] = {"model": model, "config": ds_cfg, "model_parameters": trainable}
    if "optimizer" not in ds_cfg:
        kwargs["optimizer"] = torch.optim.AdamW(
            trainable, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95)
        )
    if "scheduler" not in ds_cfg:
        kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, tc.warmup_steps, plan.total_steps, tc.min_lr_ratio)
        )
    engine, _, _, scheduler = deepspeed.initialize(**kwargs)
    del keepalive

    state = TrainState()
    resumed_from = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d)
        if client and "distray" in client:
            state = TrainState(**client["distray"])
        resumed_from = state.step
        if rank == 0:
            logger.info("resumed from checkpoint at step %d (epoch %d)", state.step, state.epoch)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if plan.has_validation else None
    micro = int(ds_cfg["train_micro_batch_size_per_gpu"])
    accum = int(ds_cfg["gradient_accumulation_steps"])

    def allreduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def write_metrics() -> None:
        if rank == 0:
            write_text(plan.metrics_path, "".join(json.dumps(r) + "\n" for r in state.history))

    # Validation batches are kept in memory after the first pass when small: restarting a Ray
    # Data stream costs seconds, often more than the forward passes. All workers take the same
    # decision (an all-reduce), or a worker would wait forever on a shard the others left.
    val_cache: list[dict[str, Any]] | None = None
    val_cache_limit = 256
    val_cacheable = True

    def evaluate() -> dict[str, float]:
        nonlocal val_cache, val_cacheable
        assert val_shard is not None
        engine.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        seen: list[dict[str, Any]] = []
        batches = (
            val_cache
            if val_cache is not None
            else val_shard.iter_torch_batches(batch_size=micro, collate_fn=collator, prefetch_batches=1)
        )
        with torch.no_grad():
            for batch in batches:
                if val_cache is None and val_cacheable and len(seen) <= val_cache_limit:
                    seen.append(batch)
                batch = _batch_to(batch, device)
                parts = _batch_loss(engine, batch, tc)
                sums[0] += float(parts.sft_sum)
                sums[1] += float(parts.sft_count)
                sums[2] += float(parts.logit_sum)
                sums[3] += float(parts.logit_count)
        engine.train()
        if val_cache is None and val_cacheable:
            val_cacheable = allreduce([float(len(seen) > val_cache_limit)])[0] == 0
            val_cache = seen if val_cacheable else None
        s = allreduce(sums)
        val_sft = s[0] / max(s[1], 1.0)
        out = {"val_sft_loss": val_sft}
        if tc.is_logit_loss:
            val_logit = s[2] / max(s[3], 1.0)
            out["val_logit_loss"] = val_logit
            out["val_loss"] = tc.alpha * val_logit + (1 - tc.alpha) * val_sft
        else:
            out["val_loss"] = val_sft
        return out

    def summary() -> dict[str, Any]:
        return {
            "step": state.step,
            "epoch": state.epoch,
            "train_loss": state.last_train_loss,
            "val_loss": state.last_val_loss,
            "best_val_loss": state.best_val_loss,
            "best_step": state.best_step,
            "early_stopped": state.early_stopped,
            "train_tokens": state.train_tokens,
            "train_time_s": state.train_time_s,
            "tokens_per_s": state.train_tokens / state.train_time_s if state.train_time_s else 0.0,
            "truncated": state.truncated,
            "no_target": state.no_target,
            "examples": state.examples,
            "resumed_from_step": resumed_from,
        }

    last_ckpt_step = state.step if ckpt is not None else -1

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        if last_ckpt_step == state.step:
            return
        # The validation loss of exactly these weights ranks the checkpoint (the trainer's
        # checkpoint_score_attribute), so the best one outlives train.keep_checkpoints.
        ev = next((r for r in reversed(state.history) if "val_step" in r), None)
        score = ev["val_loss"] if ev is not None and ev["val_step"] == state.step else NOT_EVALUATED
        with tempfile.TemporaryDirectory(prefix="distray-ckpt-") as d:
            engine.save_checkpoint(
                d, tag=f"step{state.step:08d}", client_state={"distray": asdict(state)}
            )
            ray.train.report(
                {**summary(), "checkpoint_val_loss": score},
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"checkpoint_{state.step:08d}",
            )
        last_ckpt_step = state.step

    # An early-stopped run that is rerun is finished, not continued past its stop.
    stop = state.step >= plan.total_steps or state.early_stopped
    win_loss = win_sft = win_logit = 0.0
    win_micro = 0
    win_tokens = 0
    win_steps = 0
    win_start = time.perf_counter()
    step_loss = 0.0
    steps_in_epoch = plan.steps_per_epoch * accum  # micro-batches used per epoch

    while not stop and state.epoch < plan.epochs:
        skip = state.micro_in_epoch
        it = train_shard.iter_torch_batches(
            batch_size=micro,
            collate_fn=collator,
            prefetch_batches=2,
            local_shuffle_buffer_size=max(micro * 8, 64),
            local_shuffle_seed=plan.seed * 1000 + state.epoch,
        )
        for i, batch in enumerate(it):
            if stop:
                # Every worker stops at the same step (max_steps, or early stopping on an
                # all-reduced loss), so all of them leave the stream together.
                break
            if i >= steps_in_epoch:
                # The tail that does not fill an accumulation group; drained so the Ray Data
                # epoch completes in step on every worker.
                continue
            if i < skip:
                # Resuming mid-epoch: the micro-batches the checkpointed run already used.
                continue
            batch = _batch_to(batch, device)
            parts = _batch_loss(engine, batch, tc)
            engine.backward(parts.loss)
            engine.step()
            loss_v = float(parts.loss.detach())
            step_loss += loss_v
            win_loss += loss_v
            win_sft += float(parts.sft_sum) / max(float(parts.sft_count), 1.0)
            win_logit += float(parts.logit_sum) / max(float(parts.logit_count), 1.0)
            win_micro += 1
            win_tokens += int(batch["n_tokens"])
            state.truncated += int(batch["n_truncated"])
            state.no_target += int(batch["n_no_target"])
            state.examples += int(batch["n_examples"])
            state.micro_in_epoch = i + 1
            if (i + 1) % accum:
                continue

            # ---- one optimizer step done ----
            state.step += 1
            win_steps += 1
            state.last_train_loss = step_loss / accum
            step_loss = 0.0
            if state.micro_in_epoch >= steps_in_epoch:
                state.epoch += 1
                state.micro_in_epoch = 0
            at_end = state.step >= plan.total_steps
            log_now = state.step % tc.log_every_steps == 0 or at_end
            if log_now:
                elapsed = time.perf_counter() - win_start
                g = allreduce([win_loss, win_sft, win_logit, float(win_micro), float(win_tokens)])
                n_micro = max(g[3], 1.0)
                tokens = int(g[4])
                state.train_tokens += tokens
                state.train_time_s += elapsed
                lr = scheduler.get_last_lr()[0] if scheduler is not None else tc.lr
                rec = {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": g[0] / n_micro,
                    "sft_loss": g[1] / n_micro,
                    "lr": lr,
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                    "step_ms": 1000 * elapsed / max(win_steps, 1),
                    "time_s": state.train_time_s,
                }
                if tc.is_logit_loss:
                    rec["logit_loss"] = g[2] / n_micro
                state.history.append(rec)
                if rank == 0:
                    logger.info(
                        "step %d/%d | loss %.4f | lr %.2e | %s tok/s | %.0f ms",
                        state.step,
                        plan.total_steps,
                        rec["loss"],
                        lr,
                        _fmt_count(rec["tokens_per_s"]),
                        rec["step_ms"],
                    )
                write_metrics()
                win_loss = win_sft = win_logit = 0.0
                win_micro = win_tokens = win_steps = 0
            early_stop = False
            if val_shard is not None and tc.eval_every_steps and state.step % tc.eval_every_steps == 0:
                early_stop = _record_eval(state, evaluate(), tc, rank)
                write_metrics()
                if tc.early_stopping_patience and state.best_step == state.step:
                    checkpoint()  # the weights early stopping exports
            if early_stop or at_end:
                stop = True
            if tc.checkpoint_every_steps and state.step % tc.checkpoint_every_steps == 0:
                checkpoint()
            elif state.step % tc.report_every_steps == 0:
                ray.train.report(summary())
            if log_now:
                # Time spent in eval / checkpoint / report is not training throughput.
                win_start = time.perf_counter()
            if state.micro_in_epoch == 0 and not stop:
                checkpoint()  # epoch end
        if not stop and state.micro_in_epoch != 0:
            # The shard ran out before the planned micro-batches (fewer rows than counted).
            state.epoch += 1
            state.micro_in_epoch = 0
        if state.step >= plan.total_steps:
            stop = True

    if val_shard is not None and (not state.history or state.history[-1].get("val_step") != state.step):
        _record_eval(state, evaluate(), tc, rank)
        write_metrics()
    checkpoint()
    if last_ckpt_step == state.step and resumed_from == state.step and ckpt is not None:
        # Nothing new happened (the run had already finished); report the figures anyway.
        ray.train.report(summary())
    # The run's figures as the last metrics line (what the report shows); kept out of the
    # checkpointed history so a resumed run writes it once.
    state.history = [r for r in state.history if not r.get("final")]
    state.history.append({"final": True, **summary()})
    write_metrics()


def _record_eval(state: TrainState, ev: dict[str, float], tc: Any, rank: int) -> bool:
    """Store one validation result; True when early stopping should stop the run."""
    state.last_val_loss = ev["val_loss"]
    state.history.append({"step": state.step, "val_step": state.step, **ev})
    improved = state.best_val_loss is None or ev["val_loss"] < state.best_val_loss - 1e-6
    if improved:
        state.best_val_loss = ev["val_loss"]
        state.best_step = state.step
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    if rank == 0:
        logger.info(
            "step %d | val_loss %.4f | best %.4f", state.step, ev["val_loss"], state.best_val_loss
        )
    patience = tc.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        if rank == 0:
            logger.info(
                "early stopping at step %d: %d evaluations without improvement",
                state.step,
                state.evals_without_improvement,
            )
        state.early_stopped = True
        return True
    return False

"""The Ray Train worker: one DeepSpeed engine per worker, streamed batches, KD losses.

    (started by distray.train.trainer.train_model through ray.train.torch.TorchTrainer)

`train_loop_per_worker(config)` builds a `TrainWorker` and runs it: `setup()` (device, DeepSpeed
engine, resume), `train()` (the epoch loop), `validate()` (validation loss, early stopping),
`checkpoint()` (DeepSpeed checkpoint + `ray.train.report`) and `finish()` (the last evaluation,
checkpoint and metrics line).

Why our own loop rather than transformers' Trainer under Ray Train: DeepSpeed's engine already
does gradient accumulation, clipping, mixed precision, ZeRO partitioning, LR stepping and sharded
checkpoints, so the loop that is left is ~forward, loss, backward, step. KD needs the teacher's
top-k tensors in every batch and a custom loss: with HF Trainer that means a Trainer subclass
(`compute_loss`), `remove_unused_columns=False`, an IterableDataset wrapper around the Ray Data
shard with a guessed `max_steps`, and a callback for the `ray.train.report` cadence — more code,
and resume/export would go through two checkpoint systems instead of one.

Every worker reads its own list of rows, the same number on every worker, in an order fixed by
`run.seed` and the epoch (`distray.train.order`); ZeRO's collectives need the equal count, and
an exact resume the fixed order. `ray.train.report` is called at the same steps on every worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from typing import Any

from distray.config import DistrayConfig
from distray.train.plan import WorkerPlan, lr_lambda
from distray.train.state import NOT_EVALUATED, TrainState, Window
from distray.train.student import batch_loss, batch_to, load_model

__all__ = ["TrainState", "TrainWorker", "train_loop_per_worker"]

logger = logging.getLogger(__name__)

#: Validation batches kept in memory after the first pass (see `TrainWorker.evaluate`).
VAL_CACHE_LIMIT = 256


def _worker_logging(rank: int) -> None:
    # A Ray worker is a fresh process: the CLI's logging setup does not reach it. Rank 0 gets a
    # handler on the `distray` logger so its step lines reach the driver console through Ray;
    # other ranks stay quiet.
    lg = logging.getLogger("distray")
    if rank == 0 and not lg.handlers:
        from distray.console import LOG_FORMAT

        h = logging.StreamHandler(sys.stderr)
        # The console's own format, so the driver's console shows these lines (the rest of what
        # a worker prints goes to the log only).
        h.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    for name in ("deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _fmt_count(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


class TrainWorker:
    """One Ray Train worker's run: setup, the training loop, validation and checkpoints.

    Args:
        cfg: the run config (validated on arrival).
        plan: what the driver resolved (`distray.train.plan.WorkerPlan`).
    """

    def __init__(self, cfg: DistrayConfig, plan: WorkerPlan, datasets: dict[str, Any]) -> None:
        self.cfg = cfg
        self.datasets = datasets
        self.tc = cfg.train
        self.plan = plan
        self.micro = plan.micro_batch_size
        self.accum = plan.accumulation_steps
        self.micro_per_epoch = plan.steps_per_epoch * self.accum  # micro-batches used per epoch
        self.state = TrainState()
        self.stop = False
        self.window = Window()
        self.step_loss = 0.0
        # Validation batches are kept in memory after the first pass when small: restarting a
        # Ray Data stream costs seconds, often more than the forward passes. All workers take
        # the same decision (an all-reduce), or a worker would wait forever on a shard the
        # others left.
        self.val_cache: list[dict[str, Any]] | None = None
        self.val_cacheable = True
        # Records of `state.history` already in metrics.jsonl (None: none yet by this process).
        self.metrics_written: int | None = None

    # ---- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Device, process group, collator, DeepSpeed engine, dataset shards; resume if asked."""
        import deepspeed
        import ray.train
        import torch

        plan, tc = self.plan, self.tc
        self.rank = ray.train.get_context().get_world_rank()
        _worker_logging(self.rank)
        if plan.use_gpu:
            from ray.train.torch import get_device

            self.device = get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # Ray sets OMP threads from the worker's CPU share; torch needs telling too.
            torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
        torch.manual_seed(plan.seed + self.rank)
        # Ray Train has set up torch.distributed already; DeepSpeed adopts that process group
        # (its config checks, e.g. ZeRO-3's at model load, need the world size).
        deepspeed.init_distributed(dist_backend="nccl" if plan.use_gpu else "gloo")
        self.collator = self._collator()
        self.engine, self.scheduler = self._engine()
        self._resume()
        self._record_placement()
        self.world = ray.train.get_context().get_world_size()
        self.train_ids = ray.get(plan.train_ids)
        self.val_ids = ray.get(plan.validation_ids) if plan.validation_ids is not None else None
        self.has_val = plan.has_validation and self.val_ids is not None

    def _collator(self) -> Any:
        from transformers import AutoTokenizer

        from distray.train.data import ChatEncoder, Collator

        trust = bool(self.cfg.student.trust_remote_code) if self.cfg.student else False
        tokenizer = AutoTokenizer.from_pretrained(self.plan.tokenizer, trust_remote_code=trust)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return Collator(
            ChatEncoder(tokenizer, self.tc.max_seq_len),
            pad_id,
            with_topk=self.plan.with_topk,
            packing=self.tc.packing,
            use_teacher_ids=self.plan.use_teacher_ids,
        )

    def _engine(self) -> tuple[Any, Any]:
        """The DeepSpeed engine and LR scheduler (distray's AdamW and warm-up/cosine unless
        `train.deepspeed` names its own)."""
        import deepspeed
        import torch

        plan, tc = self.plan, self.tc
        model, keepalive = load_model(plan, self.cfg, torch.float32)
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
        return engine, scheduler

    def _resume(self) -> None:
        """Load the latest checkpoint Ray Train hands this (re)start, if any."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        self.restored = ckpt is not None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                # DeepSpeed's loader unpickles its files (they hold DeepSpeed objects, which
                # torch's weights_only loading rejects): a checkpoint folder is trusted code.
                _, client = self.engine.load_checkpoint(d)
            if client and "distray" in client:
                self.state = TrainState(**client["distray"])
            digest = self.state.order_digest
            if digest is not None and digest != self.plan.order_digest:
                from distray.errors import DataError

                raise DataError(
                    f"the checkpoint at step {self.state.step} in {self.plan.out_dir}/checkpoints "
                    "was trained on other rows than the training data holds now (teacher data "
                    "regenerated or edited, or another run.seed or train.num_workers), so it "
                    "cannot resume after its last row. Set a new run.name to train on the new "
                    "rows from the start, or restore the data and settings the checkpoint was "
                    "trained on to resume it; `--force` would delete its checkpoints"
                )
            if self.rank == 0:
                logger.info(
                    "resumed from checkpoint at step %d (epoch %d)", self.state.step, self.state.epoch
                )
        self.resumed_from = self.state.step
        self.last_ckpt_step = self.state.step if self.restored else -1

    def _record_placement(self) -> None:
        """A metrics record of where this (re)start's workers run and from which step:
        `{"workers": [{"rank": 0, "node_id": "...", "host": "...", "pid": 4242}, ...], "start_step": 12}`."""
        import ray
        import torch.distributed as dist

        me = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
              "host": socket.gethostname(), "pid": os.getpid()}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        self.state.history.append({"workers": everyone, "start_step": self.state.step})
        self.write_metrics()

    # ---- train ----------------------------------------------------------------------------

    def train(self) -> None:
        """Epochs of the shard until the planned steps, `max_steps` or early stopping."""
        st, plan = self.state, self.plan
        # An early-stopped run that is rerun is finished, not continued past its stop.
        self.stop = st.step >= plan.total_steps or st.early_stopped
        self.window = Window()
        while not self.stop and st.epoch < plan.epochs:
            self._train_epoch()
            if not self.stop and st.micro_in_epoch != 0:
                # The shard ran out before the planned micro-batches (fewer rows than counted).
                st.epoch += 1
                st.micro_in_epoch = st.rows_in_epoch = 0
            if st.step >= plan.total_steps:
                self.stop = True

    def _train_epoch(self) -> None:
        st = self.state
        for batch in self._batches(self.datasets["train"], self.train_ids, st.epoch, st.rows_in_epoch):
            if self.stop:
                # Every worker stops at the same step (max_steps, or early stopping on an
                # all-reduced loss), so all of them leave the stream together.
                break
            self._micro_step(batch)
            st.micro_in_epoch += 1
            if st.micro_in_epoch % self.accum == 0:
                self._after_optimizer_step()

    def _batches(self, ds: Any, ids: Any, epoch: int | None, start: int) -> Any:
        """Collated micro-batches of this worker's rows of `epoch` (None: validation), from
        row `start` of its list on."""
        from distray.train.order import stream, worker_ids

        rows = self.plan.rows_per_worker if epoch is not None else self.plan.validation_rows_per_worker
        mine = worker_ids(ids, seed=self.plan.seed, epoch=epoch, world=self.world, rank=self.rank, rows=rows)
        for table in stream(ds, mine[start:], start, self.micro):
            yield self.collator(table)

    def _micro_step(self, batch: dict[str, Any]) -> None:
        """Forward, backward and (every `accum` micro-batches, inside DeepSpeed) the step."""
        st, w = self.state, self.window
        batch = batch_to(batch, self.device)
        parts = batch_loss(self.engine, batch, self.tc)
        self.engine.backward(parts.loss)
        self.engine.step()
        loss_v = float(parts.loss.detach())
        self.step_loss += loss_v
        w.loss += loss_v
        w.sft += float(parts.sft_sum) / max(float(parts.sft_count), 1.0)
        w.logit += float(parts.logit_sum) / max(float(parts.logit_count), 1.0)
        w.micro += 1
        w.tokens += int(batch["n_tokens"])
        st.rows_in_epoch += int(batch["n_examples"])
        st.truncated += int(batch["n_truncated"])
        st.no_target += int(batch["n_no_target"])
        st.examples += int(batch["n_examples"])

    def _after_optimizer_step(self) -> None:
        """Count the step; log, validate, checkpoint and report on their cadences."""
        import ray.train

        st, tc, plan = self.state, self.tc, self.plan
        st.step += 1
        self.window.steps += 1
        st.last_train_loss = self.step_loss / self.accum
        self.step_loss = 0.0
        if st.micro_in_epoch >= self.micro_per_epoch:
            st.epoch += 1
            st.micro_in_epoch = st.rows_in_epoch = 0
        at_end = st.step >= plan.total_steps
        log_now = st.step % tc.log_every_steps == 0 or at_end
        if log_now:
            self._log_step()
        early_stop = False
        if self.has_val and tc.eval_every_steps and st.step % tc.eval_every_steps == 0:
            early_stop = self.validate()
            if tc.early_stopping_patience and st.best_step == st.step:
                self.checkpoint()  # the weights early stopping exports
        if early_stop or at_end:
            self.stop = True
        if tc.checkpoint_every_steps and st.step % tc.checkpoint_every_steps == 0:
            self.checkpoint()
        elif st.step % tc.report_every_steps == 0:
            ray.train.report(self.summary())
        if log_now:
            # Time spent in eval / checkpoint / report is not training throughput.
            self.window.start = time.perf_counter()
        if st.micro_in_epoch == 0 and not self.stop:
            self.checkpoint()  # epoch end

    def _log_step(self) -> None:
        """One metrics record and one dense step line over the window, all workers together."""
        st, w = self.state, self.window
        elapsed = time.perf_counter() - w.start
        g = self._allreduce([w.loss, w.sft, w.logit, float(w.micro), float(w.tokens)])
        n_micro = max(g[3], 1.0)
        tokens = int(g[4])
        st.train_tokens += tokens
        st.train_time_s += elapsed
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.tc.lr
        rec = {
            "step": st.step,
            "epoch": st.epoch,
            "loss": g[0] / n_micro,
            "sft_loss": g[1] / n_micro,
            "lr": lr,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "step_ms": 1000 * elapsed / max(w.steps, 1),
            "time_s": st.train_time_s,
        }
        if self.tc.is_logit_loss:
            rec["logit_loss"] = g[2] / n_micro
        st.history.append(rec)
        if self.rank == 0:
            left_s = max(self.plan.total_steps - st.step, 0) * rec["step_ms"] / 1000
            logger.info(
                "step %d/%d | loss %.4f | lr %.2e | %s tok/s | %.0f ms | ETA %dm%02ds",
                st.step,
                self.plan.total_steps,
                rec["loss"],
                lr,
                _fmt_count(rec["tokens_per_s"]),
                rec["step_ms"],
                int(left_s // 60),
                int(left_s % 60),
            )
        self.write_metrics()
        self.window = Window()

    # ---- validate -------------------------------------------------------------------------

    def validate(self) -> bool:
        """Evaluate, record and log the validation loss; True when early stopping says stop."""
        st = self.state
        stop = st.record_eval(self.evaluate(), self.tc.early_stopping_patience)
        if self.rank == 0:
            logger.info("step %d | val_loss %.4f | best %.4f", st.step, st.last_val_loss, st.best_val_loss)
            if stop:
                logger.info(
                    "early stopping at step %d: %d evaluations without improvement",
                    st.step,
                    st.evals_without_improvement,
                )
        self.write_metrics()
        return stop

    def evaluate(self) -> dict[str, float]:
        """Validation losses over every worker's shard, averaged over answer tokens."""
        import torch

        self.engine.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        seen: list[dict[str, Any]] = []
        fill_cache = self.val_cache is None and self.val_cacheable
        batches = (
            self.val_cache
            if self.val_cache is not None
            else self._batches(self.datasets["validation"], self.val_ids, None, 0)
        )
        with torch.no_grad():
            for batch in batches:
                if fill_cache and len(seen) <= VAL_CACHE_LIMIT:
                    seen.append(batch)
                parts = batch_loss(self.engine, batch_to(batch, self.device), self.tc)
                sums[0] += float(parts.sft_sum)
                sums[1] += float(parts.sft_count)
                sums[2] += float(parts.logit_sum)
                sums[3] += float(parts.logit_count)
        self.engine.train()
        if fill_cache:
            self.val_cacheable = self._allreduce([float(len(seen) > VAL_CACHE_LIMIT)])[0] == 0
            self.val_cache = seen if self.val_cacheable else None
        s = self._allreduce(sums)
        val_sft = s[0] / max(s[1], 1.0)
        out = {"val_sft_loss": val_sft}
        if self.tc.is_logit_loss:
            val_logit = s[2] / max(s[3], 1.0)
            out["val_logit_loss"] = val_logit
            out["val_loss"] = self.tc.alpha * val_logit + (1 - self.tc.alpha) * val_sft
        else:
            out["val_loss"] = val_sft
        return out

    # ---- checkpoint -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save a DeepSpeed checkpoint of this step and report it to Ray Train (once per step)."""
        import ray.train

        st = self.state
        if self.last_ckpt_step == st.step:
            return
        # The validation loss of exactly these weights ranks the checkpoint (the trainer's
        # checkpoint_score_attribute), so the best one outlives train.keep_checkpoints.
        ev = next((r for r in reversed(st.history) if "val_step" in r), None)
        score = ev["val_loss"] if ev is not None and ev["val_step"] == st.step else NOT_EVALUATED
        st.order_digest = self.plan.order_digest
        with tempfile.TemporaryDirectory(prefix="distray-ckpt-") as d:
            self.engine.save_checkpoint(d, tag=f"step{st.step:08d}", client_state={"distray": asdict(st)})
            if self.rank == 0:
                # What the checkpoint has consumed, readable without unpickling anything.
                progress = {k: v for k, v in asdict(st).items() if k != "history"}
                with open(f"{d}/distray_state.json", "w") as f:
                    json.dump(progress, f, indent=1)
            if self.plan.fence is not None:  # a dead driver's orphan worker registers nothing
                self.plan.fence.check(f"checkpoint of step {st.step}")
            ray.train.report(
                {**self.summary(), "checkpoint_val_loss": score},
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"checkpoint_{st.step:08d}",
            )
        self.last_ckpt_step = st.step
        self.write_metrics(flush=True)

    def finish(self) -> None:
        """The last evaluation and checkpoint, and the run's figures as the last metrics line."""
        import ray.train

        st = self.state
        if self.has_val and (not st.history or st.history[-1].get("val_step") != st.step):
            self.validate()
        self.checkpoint()
        if self.last_ckpt_step == st.step and self.resumed_from == st.step and self.restored:
            # Nothing new happened (the run had already finished); report the figures anyway.
            ray.train.report(self.summary())
        # Kept out of the checkpointed history so a resumed run writes it once.
        kept = [r for r in st.history if not r.get("final")]
        if len(kept) != len(st.history):
            self.metrics_written = None  # a record left the file: rewrite it
        st.history = kept
        st.history.append({"final": True, **self.summary()})
        self.write_metrics(flush=True)

    # ---- helpers --------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The figures reported to Ray Train (the driver's `TrainResult` reads the last)."""
        st = self.state
        return {
            "step": st.step,
            "epoch": st.epoch,
            "train_loss": st.last_train_loss,
            "val_loss": st.last_val_loss,
            "best_val_loss": st.best_val_loss,
            "best_step": st.best_step,
            "early_stopped": st.early_stopped,
            "train_tokens": st.train_tokens,
            "train_time_s": st.train_time_s,
            "tokens_per_s": st.train_tokens / st.train_time_s if st.train_time_s else 0.0,
            "truncated": st.truncated,
            "no_target": st.no_target,
            "examples": st.examples,
            "resumed_from_step": self.resumed_from,
        }

    def _allreduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def write_metrics(self, *, flush: bool = False) -> None:
        """Bring metrics.jsonl up to `state.history` (rank 0).

        Locally each call appends only the new records, so a log step costs its own line, not
        the whole file. The first call of a worker process rewrites the file from the history
        (a resumed run drops the records of steps after its checkpoint, which it trains
        again), as does a history that shrank. Object stores have no append: there the file
        is rewritten whole, only when `flush` (a checkpoint, the end of the run), so the
        records in between wait in memory.
        """
        if self.rank != 0:
            return
        from distray import storage

        history, path = self.state.history, self.plan.metrics_path
        written = self.metrics_written
        if not storage.can_append(path):
            if flush:
                storage.write_text(path, "".join(json.dumps(r) + "\n" for r in history))
                self.metrics_written = len(history)
            return
        if written is None or written > len(history):
            storage.write_text(path, "".join(json.dumps(r) + "\n" for r in history))
        elif written < len(history):
            storage.append_text(path, "".join(json.dumps(r) + "\n" for r in history[written:]))
        self.metrics_written = len(history)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (`TorchTrainer(train_loop_per_worker, train_loop_config=...)`).

    Args:
        config: {"cfg": the validated DistrayConfig, "plan": WorkerPlan,
            "datasets": {"train": Ray Dataset, "validation"?: Ray Dataset}}.
    """
    if config["plan"].fence is not None:  # a restart after another run took the folder over
        config["plan"].fence.check("training")
    worker = TrainWorker(config["cfg"], config["plan"], config["datasets"])
    worker.setup()
    worker.train()
    worker.finish()

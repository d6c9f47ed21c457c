"""Phase (a): the current student answers a round's prompts, through generate's own path.

    (run by distray.onpolicy.rounds; the rows land in <run>/onpolicy/round-XXX/rollouts/)

The student is handed to `distray.teacher.generate_dataset` as a teacher config (vLLM engine
replicas through `ray.data.llm`, or transformers with `train.on_policy.backend: hf`), so
rollouts get generate's chat template, token accounting and error rows. Training prompts and
the eval prompts' samples share one sampling; the eval prompts' greedy answers a second one.

Each row's id is a hash of (round, purpose, input id): a rerun computes the same ids and sends
only the prompts whose rollout is in neither rollouts/ nor rejects/ to the engine; a rollout
that failed transiently sits in a `retry-rollout-*` shard of rejects/, which is not done
(`distray.onpolicy.settle`). Shards are written per batch (`generate.rows_per_shard` rows) by
`distray.teacher.writer.write_shard`.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from distray import formats as F
from distray.config import DistrayConfig, HFTeacher, SamplingConfig, VLLMTeacher
from distray.onpolicy import layout
from distray.onpolicy.layout import (
    EVAL_GREEDY,
    EVAL_SAMPLE,
    PURPOSE,
    ROLLOUT_SCHEMA,
    TRAIN,
    RoundPaths,
)
from distray.teacher import writer as W

__all__ = ["rollout_id", "student_engine", "RolloutSink", "rollout_stream"]

logger = logging.getLogger(__name__)

#: Engine failures a rerun retries (written to a retry shard, so not done).
_TRANSIENT = ("engine_error", "request_failed")


def rollout_id(round_index: int, purpose: str, input_id: str) -> str:
    """The id of one rollout row (stable across reruns of the round)."""
    return F.content_hash("onpolicy-rollout", round_index, purpose, input_id)


def student_engine(cfg: DistrayConfig, model: str, label: str) -> VLLMTeacher | HFTeacher:
    """The student as a teacher config for `generate_dataset` (and for its own scoring)."""
    op = cfg.train.on_policy
    assert op is not None
    trust = bool(cfg.student.trust_remote_code) if cfg.student else False
    if op.backend == "hf":
        return HFTeacher(
            model=model, name=label, batch_size=op.batch_size, concurrency=op.concurrency,
            trust_remote_code=trust,
        )
    kwargs = op.engine_kwargs if op.engine_kwargs is not None else cfg.evaluate.engine_kwargs
    return VLLMTeacher(
        model=model, name=label, engine_kwargs=dict(kwargs), concurrency=op.concurrency,
        batch_size=op.batch_size, trust_remote_code=trust,
    )


class RolloutSink:
    """Write one batch of answered rows as rollout / reject shards; return the rollouts.

    Args:
        rp: the round's folders.
        meta: {rollout id: (purpose, input id)} of the rows sent to the engine.
        label: the `teacher` column of the rows (the student's round label).
        retry_prefix: names the shard of this batch's transient failures (engine errors),
            which a rerun retries (`distray.onpolicy.settle`); None: a pass of its own.
        fence: the run folder lease's fence, checked before each shard is published.
    """

    def __init__(
        self, rp: RoundPaths, meta: dict[str, tuple[str, str]], label: str, retry_prefix: str | None = None,
        fence: Any = None,
    ) -> None:
        self.fence = fence
        self.rp = rp
        self.meta = meta
        self.label = label
        self.retry_prefix = retry_prefix or layout.retry_prefix(layout.ROLLOUT, "sink")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distray.engines.results import reject_row

        good: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        retries: list[dict[str, Any]] = []
        for r in batch.to_pylist():
            # generate_dataset put our rollout id in `input_id` (it was the prompt row's id).
            rid = r[F.INPUT_ID]
            purpose, input_id = self.meta[rid]
            row = {**r, F.ID: rid, F.INPUT_ID: input_id, F.TEACHER: self.label, PURPOSE: purpose}
            error = r.get("error")
            if not error and not r.get(F.RESPONSE_TOKEN_IDS):
                error = "empty_answer: the student answered with no token"
            if error:
                reason, _, detail = str(error).partition(":")
                transient = reason.strip() in _TRANSIENT
                if transient:
                    logger.warning("rollout %s failed (%s); a rerun retries it", rid, str(error)[:200])
                (retries if transient else rejects).append(
                    reject_row(row, "rollout", reason.strip(), detail.strip())
                )
                continue
            good.append({f.name: row.get(f.name) for f in ROLLOUT_SCHEMA})
        W.write_shard(good, self.rp.rollouts, self.rp.tmp, schema=ROLLOUT_SCHEMA, fence=self.fence)
        for rows, prefix in ((rejects, "rejects"), (retries, self.retry_prefix)):
            W.write_shard(rows, self.rp.rejects, self.rp.tmp, schema=F.REJECT_SCHEMA, fmt="jsonl",
                          prefix=prefix, fence=self.fence)
        return pa.Table.from_pylist(good, schema=ROLLOUT_SCHEMA)


def _todo(
    rows: list[dict[str, Any]], purpose: str, round_index: int, done: Any
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """Prompt rows (their id replaced by the rollout id) not done yet, and their meta."""
    out: list[dict[str, Any]] = []
    meta: dict[str, tuple[str, str]] = {}
    for r in rows:
        rid = rollout_id(round_index, purpose, r[F.ID])
        meta[rid] = (purpose, r[F.ID])
        out.append({**r, F.ID: rid})
    if out and len(done):
        kept = W.keep_not_done(pa.Table.from_pylist([{F.ID: r[F.ID]} for r in out]), done)
        keep = set(kept.column(F.ID).to_pylist())
        out = [r for r in out if r[F.ID] in keep]
    return out, meta


def rollout_stream(
    cfg: DistrayConfig,
    rp: RoundPaths,
    student: VLLMTeacher | HFTeacher,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    *,
    retry_prefix: str | None = None,
) -> tuple[Any | None, int]:
    """The lazy rollout pipeline of a round: rows not done yet → student engine → shards.

    Args:
        cfg: the run config (`train.on_policy.sampling`, `generate.rows_per_shard`).
        rp: the round's folders.
        student: the student as an engine config (`student_engine`).
        train_rows: the round's training prompts (normalized prompt rows).
        eval_rows: the eval prompts (answered twice: sampled and greedy).
        retry_prefix: names this pass's shards of transient failures (`RolloutSink`).

    Returns:
        `(dataset of the rollouts written, in ROLLOUT_SCHEMA, or None when all are done;
        number of rows sent to the engine)`.
    """
    import ray.data

    from distray.teacher import generate_dataset

    op = cfg.train.on_policy
    assert op is not None
    done = W.load_done_ids([rp.rollouts, rp.rejects])
    sampled, meta = _todo(train_rows, TRAIN, rp.index, done)
    more, meta2 = _todo(eval_rows, EVAL_SAMPLE, rp.index, done)
    greedy, meta3 = _todo(eval_rows, EVAL_GREEDY, rp.index, done)
    sampled += more
    meta = {**meta, **meta2, **meta3}
    greedy_sampling = SamplingConfig(
        temperature=0.0, max_tokens=op.sampling.max_tokens, stop=op.sampling.stop, seed=op.sampling.seed
    )
    parts = []
    for rows, sampling in ((sampled, op.sampling), (greedy, greedy_sampling)):
        if rows:
            ds = ray.data.from_items(rows)
            parts.append(generate_dataset(ds, student, cfg, sampling=sampling, logprobs=None))
    if not parts:
        return None, 0
    answered = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    from distray.lease import current

    sink = RolloutSink(rp, meta, student.label, retry_prefix, fence=current(cfg.run_dir))
    written = answered.map_batches(
        sink, batch_format="pyarrow", batch_size=cfg.generate.rows_per_shard
    )
    return written, len(sampled) + len(greedy)

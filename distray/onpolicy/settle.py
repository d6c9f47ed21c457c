"""Which rows of an on-policy phase are still unsettled, and the retry shards of failed ones.

    (used by distray.onpolicy.rounds; the shards are <run>/onpolicy/round-XXX/rejects/retry-*)

A row is settled when it is written (rollouts/, scored/, self/) or rejected for good (a
`rejects-*` shard in rejects/). A transient failure (an engine error, a request that ran out
of retries) is recorded in a `retry-<stage>-<pass>-<hash>.jsonl` shard beside them, in
REJECT_SCHEMA with its reason, as generate's `retry-*` shards are: `load_done_ids` leaves them
out, so the next pass sends the row again. A phase whose rows are not all settled writes no
done marker, so every round's figures and training mix cover the same prompts.

Each pass of a phase writes under its own `<pass>` and, once it has gone over every row not
done, drops the older passes' retry shards of the same stage: each of their rows is now
settled or failed again (and is in this pass's shard), so rejects/ keeps one record per
unsettled row.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow.parquet as pq

from distray import formats as F
from distray import storage
from distray.onpolicy.layout import (
    EVAL_GREEDY,
    EVAL_SAMPLE,
    PURPOSE,
    ROLLOUT,
    SELF_SCORE,
    TEACHER_SCORE,
    TRAIN,
    RoundPaths,
    retry_prefix,
)
from distray.teacher import writer as W

__all__ = [
    "ROLLOUT",
    "TEACHER_SCORE",
    "SELF_SCORE",
    "retry_prefix",
    "drop_older_retries",
    "unsettled_rollouts",
    "unsettled_scores",
]

logger = logging.getLogger(__name__)

def drop_older_retries(rp: RoundPaths, stages: tuple[str, ...], pass_id: str) -> int:
    """Delete the retry shards of `stages` that earlier passes wrote; call it only after a pass
    has gone over every row not done. Returns how many were deleted."""
    n = 0
    if not storage.exists(rp.rejects):
        return 0
    fs, _ = storage.filesystem_for(rp.rejects)
    for path in W.iter_shard_files(rp.rejects):
        name = os.path.basename(path)
        for stage in stages:
            if name.startswith(retry_prefix(stage, "")) and not name.startswith(retry_prefix(stage, pass_id) + "-"):
                fs.delete_file(path)
                n += 1
                break
    return n


def _count_not_done(ids: list[str], done_in: list[str]) -> int:
    if not ids:
        return 0
    done = W.load_done_ids(done_in)
    table = W.keep_not_done(_id_table(ids), done)
    return int(table.num_rows)


def _id_table(ids: list[str]) -> Any:
    import pyarrow as pa

    return pa.table({F.ID: pa.array(ids, pa.string())})


def unsettled_rollouts(
    rp: RoundPaths, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]
) -> int:
    """How many of the round's rollouts (training prompts sampled; eval prompts sampled and
    greedy) are in neither rollouts/ nor the final rejects."""
    from distray.onpolicy.rollouts import rollout_id

    ids = [rollout_id(rp.index, TRAIN, r[F.ID]) for r in train_rows]
    for purpose in (EVAL_SAMPLE, EVAL_GREEDY):
        ids += [rollout_id(rp.index, purpose, r[F.ID]) for r in eval_rows]
    return _count_not_done(ids, [rp.rollouts, rp.rejects])


def _rollout_ids(rp: RoundPaths) -> tuple[list[str], list[str]]:
    """(every rollout id written, the eval-sample ones) of the round."""
    fs, _ = storage.filesystem_for(rp.rollouts)
    every: list[str] = []
    samples: list[str] = []
    for path in W.iter_shard_files(rp.rollouts):
        if not path.endswith(".parquet"):
            continue
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=[F.ID, PURPOSE])
        for rid, purpose in zip(t.column(F.ID).to_pylist(), t.column(PURPOSE).to_pylist(), strict=True):
            every.append(rid)
            if purpose == EVAL_SAMPLE:
                samples.append(rid)
    return every, samples


def unsettled_scores(rp: RoundPaths, *, teacher: bool = True, own: bool = True) -> int:
    """How many written rollouts lack a settled teacher score (`teacher`: in neither scored/
    nor the final rejects), plus how many eval samples lack the student's own score (`own`:
    in neither self/ nor the final rejects)."""
    every, samples = _rollout_ids(rp)
    n = _count_not_done(every, [rp.scored, rp.rejects]) if teacher else 0
    return n + (_count_not_done(samples, [rp.self_scored, rp.rejects]) if own else 0)

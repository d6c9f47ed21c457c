"""Phase (c, data): a round's training mix, λ on-policy rows and 1 − λ off-policy teacher-data rows.

    .venv/bin/python -m pytest tests/unit/test_onpolicy.py -q -k mix

The on-policy part is every scored training rollout of the round. The off-policy part is
`n_on × (1 − λ) / λ` rows of generate's teacher data, drawn by a hash of (run.seed, round, id):
a different draw each round, the same draw on a rerun. Both are written to `mix/` in the
teacher-data layout, so training reads them as it reads generate's data (the top-k and
vocabulary checks included).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distray import formats as F
from distray import storage
from distray.errors import DataError
from distray.onpolicy.layout import PURPOSE, TRAIN, RoundPaths
from distray.teacher import writer as W

__all__ = ["off_policy_count", "draw_ids", "write_mix"]

logger = logging.getLogger(__name__)


def off_policy_count(n_on: int, lmbda: float) -> int:
    """Off-policy rows that make `n_on` on-policy rows a share of `lmbda` of the mix."""
    return int(round(n_on * (1.0 - lmbda) / lmbda)) if lmbda < 1 else 0


def draw_ids(ids: list[str], n: int, seed: int, round_index: int) -> list[str]:
    """`n` of `ids` (all when fewer), by a hash of (seed, round, id): the round's draw."""
    order = sorted(set(ids), key=lambda i: F.content_hash("onpolicy-mix", seed, round_index, i))
    return order[: min(n, len(order))]


def _read(folder: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.dataset as pads

    files = W.iter_shard_files(folder)
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        return pa.table({})
    fs, _ = storage.filesystem_for(folder)
    return pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)


def write_mix(rp: RoundPaths, teacher_data: str | None, lmbda: float, seed: int,
              fence: Any = None) -> dict[str, Any]:
    """Write the round's mix to `rp.mix`; its figures.

    Args:
        rp: the round's folders (`scored/` must be complete).
        teacher_data: generate's training data folder, or None (λ = 1 needs none).
        lmbda: `train.on_policy.lmbda`.
        seed: `run.seed`.
        fence: the run folder lease's fence, checked before each shard is published.

    Returns:
        `{on_policy_rows, off_policy_rows, on_policy_tokens, off_policy_tokens}`; tokens are
        answer tokens the teacher scored (on-policy) or wrote (off-policy).

    Raises:
        DataError: no scored rollout to train on, or off-policy rows asked for and none found.
    """
    scored = _read(rp.scored)
    if scored.num_rows:
        scored = scored.filter(pc.equal(scored.column(PURPOSE), TRAIN))
    if scored.num_rows == 0:
        raise DataError(
            f"round {rp.index} has no scored training rollout in {rp.scored}; see {rp.rejects} "
            "for why the rows were rejected"
        )
    on = scored.select(F.TEACHER_DATA_SCHEMA.names).cast(F.TEACHER_DATA_SCHEMA)
    n_off = off_policy_count(on.num_rows, lmbda)
    off = F.TEACHER_DATA_SCHEMA.empty_table()
    if n_off:
        if teacher_data is None or not storage.exists(teacher_data):
            raise DataError(
                f"`train.on_policy.lmbda` ({lmbda}) mixes in off-policy teacher-data rows, but there "
                f"is no teacher data at {teacher_data}; run `distray generate` first, or set "
                "train.on_policy.lmbda: 1"
            )
        ids = _read(teacher_data, [F.ID]).column(F.ID).to_pylist() if W.iter_shard_files(teacher_data) else []
        chosen = draw_ids(ids, n_off, seed, rp.index)
        if not chosen:
            raise DataError(f"no teacher-data rows in {teacher_data} to mix in; run `distray generate` first")
        table = _read(teacher_data)
        table = table.filter(pc.is_in(table.column(F.ID), value_set=pa.array(chosen, pa.string())))
        off = table.select(F.TEACHER_DATA_SCHEMA.names).cast(F.TEACHER_DATA_SCHEMA)
        if len(chosen) < n_off:
            logger.warning(
                "round %d: %d off-policy rows wanted for λ = %.2f, the teacher data has %d",
                rp.index, n_off, lmbda, len(chosen),
            )
    W.clean_tmp(rp.tmp)
    # Two shards, each named by its ids: rewriting the same mix replaces the same files.
    for part in (on, off):
        W.write_shard(part.to_pylist(), rp.mix, rp.tmp, schema=F.TEACHER_DATA_SCHEMA, fence=fence)
    return {
        "on_policy_rows": on.num_rows,
        "off_policy_rows": off.num_rows,
        "on_policy_tokens": _tokens(on),
        "off_policy_tokens": _tokens(off),
    }


def _tokens(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 0
    lengths = pc.list_value_length(table.column(F.RESPONSE_TOKEN_IDS))
    return int(pc.sum(lengths).as_py() or 0)


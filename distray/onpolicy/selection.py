"""Which prompts each round uses: a fresh slice of the training prompts, and fixed eval prompts.

    .venv/bin/python -m pytest tests/unit/test_onpolicy.py -q -k order

The training prompts are put in one fixed order, a hash of (run.seed, id), and round r takes
the next `prompts_per_round` of them (wrapping around when the data runs out), so rounds see
fresh prompts and a rerun picks the same ones. A round's choice is written once to its
`prompts.jsonl`; a resumed round reads it back rather than choosing again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from distray import formats as F
from distray import storage
from distray.config import DistrayConfig
from distray.errors import DataError

__all__ = ["order_key", "round_slice", "read_rows", "select_rows", "write_once"]

logger = logging.getLogger(__name__)


def order_key(seed: int, row_id: str) -> str:
    """The sort key that fixes the prompts' order for a run."""
    return F.content_hash("onpolicy-order", seed, row_id)


def round_slice(ids: list[str], seed: int, index: int, per_round: int) -> list[str]:
    """The ids round `index` uses: the next `per_round` in the run's fixed order.

    Args:
        ids: every training prompt id (any order; duplicates count once).
        seed: `run.seed`.
        index: the round, from 0.
        per_round: `train.on_policy.prompts_per_round`.

    Returns:
        At most `per_round` distinct ids (all of them when there are fewer).
    """
    order = sorted(set(ids), key=lambda i: order_key(seed, i))
    n = len(order)
    if n == 0:
        return []
    take = min(per_round, n)
    start = (index * per_round) % n
    return [order[(start + j) % n] for j in range(take)]


def _keep_ids(batch: Any, ids: list[str]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column(F.ID), value_set=pa.array(ids, pa.string())))


def select_rows(path: str, cfg: DistrayConfig, pick: Any) -> list[dict[str, Any]]:
    """Valid prompt rows of `path` whose ids `pick(all ids)` returns, in that order.

    Raises:
        DataError: `path` holds no valid prompt.
    """
    from distray.teacher import read_prompts

    valid, _ = read_prompts(path, cfg)
    ids: list[str] = []
    batch: Any
    for batch in valid.select_columns([F.ID]).iter_batches(batch_format="pyarrow", batch_size=None):
        ids.extend(batch.column(F.ID).to_pylist())
    if not ids:
        raise DataError(f"`{path}` holds no valid prompt rows for on-policy rounds")
    chosen: list[str] = pick(ids)
    keep: Any = _keep_ids
    rows = valid.map_batches(
        keep, fn_kwargs={"ids": chosen}, batch_format="pyarrow", batch_size=None
    ).take_all()
    by_id = {r[F.ID]: r for r in rows}
    return [_plain(by_id[i]) for i in chosen if i in by_id]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A prompt row as plain JSON values (Ray hands numpy arrays for list columns)."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(row[F.MESSAGES])]
    return {
        F.ID: row[F.ID],
        F.MESSAGES: messages,
        F.PROMPT: row.get(F.PROMPT),
        F.REFERENCE: row.get(F.REFERENCE),
    }


def write_once(path: str, make: Any) -> list[dict[str, Any]]:
    """The rows in `path`; when it does not exist yet, `make()`'s rows, written there first."""
    if storage.exists(path):
        return read_rows(path)
    rows: list[dict[str, Any]] = make()
    storage.write_jsonl(path, rows)
    return rows


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by `write_once`."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]

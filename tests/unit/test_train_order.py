"""The training order: each id once, a seeded global shuffle per epoch, equal disjoint worker lists,
and a resumed stream that starts exactly after the last consumed row.

    .venv/bin/python -m pytest tests/unit/test_train_order.py -q
"""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from distray.formats import ID, RESPONSE
from distray.train.order import (
    SLOT,
    TIE,
    limit_ids,
    micro_tables,
    order_digest,
    select_rows,
    unique_ids,
    worker_ids,
)

IDS = [f"row-{i:03d}" for i in range(50)]


def _blocks(ids: list[str], seed: int, size: int = 7) -> list[pa.Table]:
    """The rows as Ray Data might hand them over: any block sizes, any block order."""
    ids = list(ids)
    random.Random(seed).shuffle(ids)
    return [pa.table({ID: ids[i : i + size], RESPONSE: [f"answer {x}" for x in ids[i : i + size]]})
            for i in range(0, len(ids), size)]


def _read(blocks: list[pa.Table], wanted: pa.Array, start: int, micro: int) -> list[list[str]]:
    """`order.stream` without Ray: select, sort by (SLOT, TIE) as Ray Data's sort does, batch."""
    selected = pa.concat_tables([select_rows(b, wanted, start) for b in blocks])
    ordered = selected.sort_by([(SLOT, "ascending"), (TIE, "ascending")])
    chunks = [ordered.slice(i, 3) for i in range(0, ordered.num_rows, 3)]  # arbitrary block cuts
    return [t.column(ID).to_pylist() for t in micro_tables(chunks, micro)]


def test_two_shards_holding_one_row_train_it_once_and_count_the_copy():
    shard_a, shard_b = pa.array(IDS[:30]), pa.array(IDS[25:] + ["row-003"])
    ids, dropped = unique_ids([shard_b, shard_a])
    assert ids.to_pylist() == IDS and dropped == 6
    # The copies reach the worker as rows too: each id yields one training row.
    blocks = _blocks(IDS, 1) + _blocks(IDS[25:30] + ["row-003"], 2)
    mine = worker_ids(ids, seed=0, epoch=0, world=1, rank=0, rows=len(ids))
    got = [i for batch in _read(blocks, mine, 0, 4) for i in batch]
    assert got == mine.to_pylist() and len(got) == 50


def test_epoch_order_is_a_seeded_global_shuffle_split_equally_between_workers():
    ids, _ = unique_ids([pa.array(IDS)])
    lists = [worker_ids(ids, seed=7, epoch=0, world=3, rank=r, rows=16) for r in range(3)]
    flat = [x for lst in lists for x in lst.to_pylist()]
    assert all(len(lst) == 16 for lst in lists) and len(set(flat)) == 48
    # Fixed by (seed, epoch), whatever order the ids were found in; another epoch, another order.
    again, _ = unique_ids([pa.array(list(reversed(IDS)))])
    assert worker_ids(again, seed=7, epoch=0, world=3, rank=1, rows=16) == lists[1]
    assert worker_ids(ids, seed=7, epoch=1, world=3, rank=1, rows=16) != lists[1]
    assert worker_ids(ids, seed=8, epoch=0, world=3, rank=1, rows=16) != lists[1]
    assert lists[0].to_pylist() != sorted(lists[0].to_pylist())
    # Rows do not stay with one worker from epoch to epoch.
    assert set(worker_ids(ids, seed=7, epoch=1, world=3, rank=0, rows=16).to_pylist()) != set(lists[0].to_pylist())


@pytest.mark.parametrize("consumed", [0, 4, 12, 20])
def test_a_resumed_stream_starts_exactly_after_the_last_consumed_row(consumed):
    ids, _ = unique_ids([pa.array(IDS)])
    mine = worker_ids(ids, seed=3, epoch=2, world=2, rank=1, rows=24)
    whole = [x for b in _read(_blocks(IDS, 0), mine, 0, 4) for x in b]
    assert whole == mine.to_pylist()
    # Another block layout (another cluster, another read) and a restart after `consumed` rows.
    rest = _read(_blocks(IDS, 9, size=5), mine[consumed:], consumed, 4)
    assert [x for b in rest for x in b] == whole[consumed:]
    assert all(len(b) == 4 for b in rest)


def test_limit_and_digest_are_fixed_by_the_data_and_seed():
    ids, _ = unique_ids([pa.array(IDS)])
    assert limit_ids(ids, 10, 0) == limit_ids(ids, 10, 0) and len(limit_ids(ids, 10, 0)) == 10
    assert limit_ids(ids, None, 0) is ids
    d = order_digest(ids, 0, 2)
    assert d == order_digest(unique_ids([pa.array(IDS[::-1])])[0], 0, 2)
    assert d != order_digest(ids, 1, 2) and d != order_digest(ids, 0, 4) and d != order_digest(ids[1:], 0, 2)

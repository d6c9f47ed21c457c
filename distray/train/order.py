"""Which rows each training worker reads, in which order: fixed by the data, `run.seed` and the epoch.

    .venv/bin/python -m pytest tests/unit/test_train_order.py -q

The driver reads the `id` column of the training rows (nothing else) and keeps each id once
(`unique_ids`): a row that two shards hold, e.g. after a crash between writing a shard and
recording it, trains once, and the copies dropped are counted. The sorted unique ids are the
run's row list. Epoch `e` orders it by a permutation seeded with `(run.seed, e)` — a global
shuffle that depends on neither the file layout nor the cluster — and worker `r` of `W` takes
positions `r, r + W, r + 2W, ...` of that order (`worker_ids`), the same number on every
worker. A three-row example, two workers, one row each::

    ids (sorted)          ["a", "b", "c"]
    epoch 0 permutation   [2, 0, 1]  → order ["c", "a", "b"]
    worker 0 / worker 1   ["c"] / ["a"]      ("b", the tail that fills no worker, is skipped)

Each worker then streams its rows (`stream`): the training columns are read, the
rows it wants are kept and numbered by their place in its list (`select_rows`), sorted by that
number, and cut into micro-batches (`micro_tables`, which also drops the second copy of a row
that two shards hold). A checkpoint records how many rows of its list each worker has consumed
(`TrainState.rows_in_epoch`) and the digest of the row list (`order_digest`), so a resumed run
starts exactly after the last consumed row, and refuses data that changed underneath it.

Each worker reads the training columns of the whole data once per epoch and keeps 1/W of it;
up to `LOCAL_SORT_ROWS` rows per worker it reads them with pyarrow in its own process (when the
data is given as files, `FileRows`; else with Ray Data) and sorts them in memory, beyond that
it streams them with Ray Data and sorts with Ray Data's sort, which spills to disk.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distray.formats import ID, RESPONSE

__all__ = [
    "SLOT",
    "TIE",
    "LOCAL_SORT_ROWS",
    "limit_ids",
    "micro_tables",
    "order_digest",
    "select_rows",
    "stream",
    "unique_ids",
    "worker_ids",
]

#: The place of a row in its worker's list (added by `select_rows`, dropped by `micro_tables`).
SLOT = "_distray_slot"
#: Orders the copies of one id (a hash of the answer text), so which copy trains is fixed too.
TIE = "_distray_tie"


def unique_ids(chunks: Iterable[Any]) -> tuple[pa.Array, int]:
    """The sorted unique ids of the rows, and how many rows repeat an id already seen.

    Args:
        chunks: arrays (or chunked arrays) of the `id` column, in any order.
    """
    parts = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in chunks]
    parts = [p.cast(pa.string()) for p in parts if len(p)]
    if not parts:
        return pa.array([], pa.string()), 0
    ids = pa.concat_arrays(parts)
    unique = pc.unique(ids)
    unique = unique.take(pc.sort_indices(unique))
    return unique, len(ids) - len(unique)


def limit_ids(ids: pa.Array, max_rows: int | None, seed: int) -> pa.Array:
    """At most `max_rows` of `ids`, chosen by a permutation seeded with `seed` (sorted again)."""
    if max_rows is None or max_rows >= len(ids):
        return ids
    pick = np.random.default_rng([seed, 2**31 - 1]).permutation(len(ids))[:max_rows]
    return ids.take(pa.array(np.sort(pick)))


def worker_ids(
    ids: pa.Array, *, seed: int, epoch: int | None, world: int, rank: int, rows: int
) -> pa.Array:
    """The ids worker `rank` of `world` reads in `epoch`, in the order it trains on them.

    Args:
        ids: the run's sorted unique ids (`unique_ids`).
        seed: `run.seed`.
        epoch: the epoch (its order is a permutation seeded with `(seed, epoch)`); None keeps
            the sorted order (validation, where order does not matter).
        world: number of workers.
        rank: this worker.
        rows: rows per worker (at most `len(ids) // world`).
    """
    order = np.arange(len(ids)) if epoch is None else np.random.default_rng([seed, epoch]).permutation(len(ids))
    mine = order[rank::world][:rows]
    return ids.take(pa.array(mine, pa.int64()))


def order_digest(ids: pa.Array, seed: int, world: int) -> str:
    """Identifies the run's row list, seed and worker count: what a checkpoint's progress means."""
    h = hashlib.sha256(f"{seed}\0{world}\0{len(ids)}\0".encode())
    for s in ids.to_pylist():
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tie(table: pa.Table) -> pa.Array:
    if RESPONSE not in table.column_names:
        return pa.array(np.zeros(table.num_rows, dtype=np.int64))
    texts = table.column(RESPONSE).to_pylist()
    return pa.array([zlib.crc32((t or "").encode()) for t in texts], pa.int64())


def select_rows(table: pa.Table, wanted: pa.Array, start: int = 0) -> pa.Table:
    """The rows of `table` whose id is in `wanted`, with their place in it (`SLOT`, from `start`).

    Args:
        table: a batch of training rows.
        wanted: the ids a worker still has to read this epoch, in order.
        start: the place of `wanted[0]` in the worker's list (rows already consumed).
    """
    index = pc.index_in(table.column(ID).cast(pa.string()), value_set=wanted)
    keep = pc.is_valid(index)
    table = table.filter(keep)
    slots = pc.add(index.filter(keep).cast(pa.int64()), start)
    return table.append_column(SLOT, slots).append_column(TIE, _tie(table))


def micro_tables(tables: Iterable[pa.Table], micro: int) -> Iterator[pa.Table]:
    """Slot-ordered tables → tables of `micro` rows (the last may be shorter), `SLOT`/`TIE`
    dropped, and every row after the first of one slot (a second copy of an id) left out."""
    buf: list[pa.Table] = []
    n = 0
    last = -1
    for t in tables:
        if t.num_rows == 0:
            continue
        slots = t.column(SLOT).to_numpy()
        prev = np.concatenate([[last], slots[:-1]])
        last = int(slots[-1])
        t = t.filter(pa.array(slots != prev)).drop_columns([SLOT, TIE])
        buf.append(t)
        n += t.num_rows
        while n >= micro:
            whole = pa.concat_tables(buf)
            yield whole.slice(0, micro)
            rest = whole.slice(micro)
            buf, n = [rest], rest.num_rows
    if n:
        yield pa.concat_tables(buf)


#: Rows per worker up to which its rows are sorted in the worker's memory (see `stream`).
LOCAL_SORT_ROWS = 20_000


def stream(ds: Any, wanted: pa.Array, start: int, micro: int) -> Iterator[pa.Table]:
    """A worker's rows, in the order of `wanted`, as micro-batch tables.

    Args:
        ds: the training (or validation) rows: a Ray Dataset, or a
            `distray.train.filerows.FileRows` (read in this process while the worker's rows
            fit in memory, else as a Ray Dataset).
        wanted: the ids still to read, in order (`worker_ids(...)[start:]`).
        start: rows of the list already consumed.
        micro: rows per micro-batch.
    """
    if len(wanted) == 0:
        return
    from distray.train.filerows import FileRows

    local = len(wanted) <= LOCAL_SORT_ROWS
    if isinstance(ds, FileRows):
        if local:
            tables = [t for t in (select_rows(t, wanted, start) for t in ds.tables()) if t.num_rows]
            yield from _sorted_micro_tables(tables, micro)
            return
        ds = ds.dataset()

    def select(batch: pa.Table) -> pa.Table:
        return select_rows(batch, wanted, start)

    selected = ds.map_batches(select, batch_format="pyarrow")
    if not local:
        ordered = selected.sort([SLOT, TIE])
        yield from micro_tables(
            ordered.iter_batches(batch_size=micro, batch_format="pyarrow", prefetch_batches=2), micro
        )
        return
    tables = [t for t in selected.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    yield from _sorted_micro_tables(tables, micro)


def _sorted_micro_tables(tables: list[pa.Table], micro: int) -> Iterator[pa.Table]:
    # Written here rather than with Ray Data's sort: that sort is a distributed shuffle
    # (sampling, then a map and a reduce task per partition), which costs seconds of task
    # start-up per epoch and worker whatever the size; up to LOCAL_SORT_ROWS rows the worker
    # keeps its own rows in memory and pyarrow sorts them in milliseconds, in the same order.
    if not tables:
        return
    mine = pa.concat_tables(tables, promote_options="default")
    mine = mine.sort_by([(SLOT, "ascending"), (TIE, "ascending")])
    yield from micro_tables((mine.slice(i, micro) for i in range(0, mine.num_rows, micro)), micro)

"""Exactly-once output: atomic shards, the set of ids already done, and per-batch stats.

Every batch that reaches the end of the pipeline is written as one data shard (accepted rows,
TEACHER_DATA_SCHEMA Parquet) and one rejects shard, each first to `<run>/generate/.tmp/` and
then renamed into place, so a reader (or a resumed run) never sees half a file. Shard names are
a hash of the ids they hold: a batch Ray retries after a worker crash rewrites the same file
rather than adding a second copy.

On start, `load_done_ids` reads the `id` column of every shard in data/ and rejects/ into a
sorted array of 16-byte digests (16 B per row: 160 MB for 10M rows), which the skip stage
receives; a resumed run therefore sends no finished row to a teacher again.

Transient teacher failures (a request that ran out of retries, an engine error) are rejects too,
but in `retry-<run>-<hash>` shards beside the `rejects-<hash>` ones: `load_done_ids` leaves them
out, so the next run asks the teacher again, and `settle_retry_shards` then drops from older
retry shards every row that run settled (answered, rejected for good, or failed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distray import formats as F
from distray import storage
from distray.errors import DataError
from distray.lease import Fence

logger = logging.getLogger(__name__)

__all__ = [
    "digest",
    "digests",
    "load_done_ids",
    "quarantine_unreadable",
    "keep_not_done",
    "RETRY_PREFIX",
    "is_retry_shard",
    "settle_retry_shards",
    "write_shard",
    "split_writable",
    "clean_tmp",
    "iter_shard_files",
    "STATS_SCHEMA",
]


def digest(row_id: str) -> bytes:
    """16 bytes for an id: the hex id itself when it is a content hash, else its blake2b."""
    if len(row_id) == 32:
        try:
            return bytes.fromhex(row_id)
        except ValueError:
            pass
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def digests(ids: Iterable[str | None]) -> np.ndarray:
    """A `S16` array of `digest(id)` (None ids get an all-zero digest, which never matches)."""
    return np.array([digest(i) if i is not None else b"\0" * 16 for i in ids], dtype="S16")


def iter_shard_files(folder: str) -> list[str]:
    """Data/reject shard files under `folder` (recursively), in the filesystem's own form."""
    if not storage.exists(folder):
        return []
    return storage.list_files(folder, (".parquet", ".jsonl"))


def _shard_ids(fs: pafs.FileSystem, path: str, column: str = F.ID) -> list[str | None]:
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=[column]).column(column).to_pylist()
    out: list[str | None] = []
    with fs.open_input_stream(path) as f:
        for line in f.read().decode("utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line).get(column))
    return out


#: File-name prefix of reject shards holding transient teacher failures (retried on a rerun).
RETRY_PREFIX = "retry"


def is_retry_shard(path: str) -> bool:
    """True for a `retry-*` shard (transient failures, not done)."""
    return os.path.basename(path).startswith(RETRY_PREFIX + "-")


#: What reading a damaged shard raises (pyarrow's errors, bad UTF-8 or JSON, no `id` column).
_UNREADABLE = (pa.ArrowException, OSError, ValueError, KeyError, AttributeError)


def _check_shard(fs: pafs.FileSystem, path: str) -> None:
    """Raise one of `_UNREADABLE` unless the shard reads: a Parquet footer naming an `id`
    column (a truncated file has no footer), or JSONL lines that are all objects."""
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            if F.ID not in pq.read_schema(f).names:
                raise KeyError(F.ID)
        return
    with fs.open_input_stream(path) as f:
        for line in f.read().decode("utf-8").splitlines():
            if line.strip():
                json.loads(line).get(F.ID)


def quarantine_unreadable(folders: list[str], quarantine_dir: str) -> list[str]:
    """Move every shard under `folders` that cannot be read into `quarantine_dir`.

    A zero-byte or truncated shard (a crash on a disk that lost unsynced writes, a partial
    copy) would otherwise stop every rerun at start-up. Once moved, its rows are not done, so
    the run labels them again. Each shard keeps its path below its folder's parent
    (`data/train/part-x.parquet`), for a person to inspect.

    Returns:
        The quarantined paths (where they are now).
    """
    moved: list[str] = []
    for folder in folders:
        fs, root = storage.filesystem_for(folder)
        _, qroot = storage.filesystem_for(quarantine_dir)
        base = os.path.dirname(root.rstrip("/"))
        for path in iter_shard_files(folder):
            try:
                _check_shard(fs, path)
                continue
            except _UNREADABLE as e:
                error = f"{type(e).__name__}: {str(e)[:200]}"
            rel = path[len(base) + 1 :] if path.startswith(base + "/") else os.path.basename(path)
            dest = f"{qroot.rstrip('/')}/{rel}"
            fs.create_dir(os.path.dirname(dest), recursive=True)
            fs.move(path, dest)
            logger.warning(
                "shard %s cannot be read (%s): moved to %s; its rows will be labelled again",
                path, error, dest,
            )
            moved.append(dest)
    return moved


def load_done_ids(folders: list[str], *, include_retry: bool = False) -> np.ndarray:
    """The sorted, unique digests of every id in the shards under `folders`.

    Args:
        folders: data and rejects folders.
        include_retry: count the rows of `retry-*` shards too (for totals); by default they are
            not done, so a rerun asks the teacher again.

    Raises:
        DataError: a shard cannot be read (`quarantine_unreadable` moves such shards aside).
    """
    parts: list[np.ndarray] = []
    for folder in folders:
        fs, _ = storage.filesystem_for(folder)
        for path in iter_shard_files(folder):
            if include_retry or not is_retry_shard(path):
                try:
                    ids = _shard_ids(fs, path)
                except _UNREADABLE as e:
                    raise DataError(
                        f"shard `{path}` cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                        "`distray generate` moves such shards to <run>/generate/quarantine/ and "
                        "labels their rows again: rerun it, or delete the shard"
                    ) from e
                parts.append(digests(ids))
    if not parts:
        return np.array([], dtype="S16")
    return np.unique(np.concatenate(parts))


def _shard_rows(fs: pafs.FileSystem, path: str) -> list[dict[str, Any]]:
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            return pq.read_table(f).to_pylist()
    with fs.open_input_stream(path) as f:
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def settle_retry_shards(
    rejects_dir: str, tmp_dir: str, done_folders: list[str], current_prefix: str,
    fence: Fence | None = None,
) -> int:
    """Drop the rows a run settled from the retry shards older runs left.

    A row of an older retry shard is settled when its id is now done (in `done_folders`: data
    and final rejects) or in a retry shard of this run (`current_prefix`: it failed again). The
    rest (rows this run did not reach) move into a shard under `current_prefix`; the older
    shard is then deleted, so every row is in data or rejects once. Safe to call at any time:
    only rows written elsewhere are dropped.

    Args:
        rejects_dir: the rejects folder.
        tmp_dir: where shards are written before their rename.
        done_folders: data folders and the rejects folder.
        current_prefix: this run's retry-shard prefix, `retry-<run>`.
        fence: the run folder lease's fence, checked before each shard is written.

    Returns:
        The number of older retry shards removed.
    """
    shards = [p for p in iter_shard_files(rejects_dir) if is_retry_shard(p)]
    older = [p for p in shards if not os.path.basename(p).startswith(current_prefix + "-")]
    if not older:
        return 0
    fs, _ = storage.filesystem_for(rejects_dir)
    mine = [digests(_shard_ids(fs, p)) for p in shards if p not in older]
    settled = np.unique(np.concatenate([load_done_ids(done_folders), *mine]))
    for path in older:
        rows = _shard_rows(fs, path)
        left = keep_not_done(pa.table({F.ID: [r.get(F.ID) for r in rows]}), settled)
        keep = set(left.column(F.ID).to_pylist())
        fmt = "parquet" if path.endswith(".parquet") else "jsonl"
        # Written before the delete: a crash in between leaves a row twice among retry shards
        # (both not done, so retried and settled by the next run), never nowhere.
        write_shard(
            [r for r in rows if r.get(F.ID) in keep], rejects_dir, tmp_dir,
            schema=F.REJECT_SCHEMA, fmt=fmt, prefix=current_prefix, fence=fence,
        )
        fs.delete_file(path)
    return len(older)


def keep_not_done(batch: pa.Table, done: np.ndarray) -> pa.Table:
    """The rows of `batch` whose id is not in the sorted digest array `done`."""
    if batch.num_rows == 0 or len(done) == 0:
        return batch
    d = digests(batch.column(F.ID).to_pylist())
    pos = np.searchsorted(done, d)
    pos[pos >= len(done)] = 0
    seen = done[pos] == d
    return batch.filter(pa.array(~seen))


#: What pyarrow raises on a value its schema cannot hold.
_UNSTORABLE = (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError)


def split_writable(
    rows: list[dict[str, Any]], schema: pa.Schema
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """`(rows Arrow can store under schema, [(row, why not), ...])`.

    The whole batch is tried first; only when that fails is each row tried alone, so one bad
    value costs its row, not the batch (and the run).
    """
    try:
        pa.Table.from_pylist(rows, schema=schema)
        return rows, []
    except _UNSTORABLE:
        pass
    ok: list[dict[str, Any]] = []
    bad: list[tuple[dict[str, Any], str]] = []
    for r in rows:
        try:
            pa.Table.from_pylist([r], schema=schema)
            ok.append(r)
        except _UNSTORABLE as e:
            bad.append((r, f"{type(e).__name__}: {str(e)[:200]}"))
    return ok, bad


def clean_tmp(tmp_dir: str) -> None:
    """Remove temp files a killed run left behind (the run folder belongs to one run)."""
    fs, p = storage.filesystem_for(tmp_dir)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir_contents(p, missing_dir_ok=True)


def write_shard(
    rows: list[dict[str, Any]],
    out_dir: str,
    tmp_dir: str,
    *,
    schema: pa.Schema,
    fmt: str = "parquet",
    prefix: str = "part",
    fence: Fence | None = None,
) -> str | None:
    """Write rows as one shard, atomically (temp file in `tmp_dir`, then rename).

    The shard's name is a hash of its ids, so rewriting the same rows replaces the same file.
    With `fence` (the run folder lease's, `distray.lease`), the lease is checked just before the
    rename: a writer of a run that lost the folder publishes nothing.

    Returns:
        The shard path, or None when `rows` is empty.

    Raises:
        StageError: `fence` is no longer the lease's (another run took the folder over).
    """
    if not rows:
        return None
    name = F.content_hash("shard", [r.get(F.ID) for r in rows])
    fs, out_p = storage.filesystem_for(out_dir)
    _, tmp_p = storage.filesystem_for(tmp_dir)
    fs.create_dir(out_p, recursive=True)
    fs.create_dir(tmp_p, recursive=True)
    final = f"{out_p.rstrip('/')}/{prefix}-{name}.{fmt}"
    tmp = f"{tmp_p.rstrip('/')}/{prefix}-{name}.{uuid.uuid4().hex[:8]}.{os.getpid()}"
    try:
        if fmt == "parquet":
            table = pa.Table.from_pylist(rows, schema=schema)
            with fs.open_output_stream(tmp) as f:
                pq.write_table(table, f)
        else:
            data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
            with fs.open_output_stream(tmp) as f:
                f.write(data.encode("utf-8", "backslashreplace"))
        if fence is not None:
            fence.check(f"shard {final}")
        # fsync before the rename: a power cut must not leave a zero-byte shard in data/.
        storage.publish(fs, tmp, final)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    return final


#: One row per written batch, summed on the driver.
STATS_SCHEMA = pa.schema(
    [
        ("rows", pa.int64()),
        ("accepted", pa.int64()),
        ("rejected", pa.int64()),
        ("reasons", pa.string()),  # JSON {reason code: count}
        ("teacher_requests", pa.int64()),
        ("cache_hits", pa.int64()),
        ("http_attempts", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("accepted_completion_tokens", pa.int64()),
        ("valid_inputs", pa.int64()),
        # Wall-clock span the engines worked on this batch's rows (first request in, last
        # token out); min/max over batches give a run's engine-busy time.
        ("engine_t0", pa.float64()),
        ("engine_t1", pa.float64()),
    ]
)

"""A content-addressed answer cache shared between runs (`generate.cache_dir`).

    distray generate --config C generate.cache_dir=s3://bucket/distray-cache

One JSON file per answer at `<cache_dir>/<key[:2]>/<key>.json`, written atomically, keyed by
`rows.cache_key` (prompt turns, teacher model + weights fingerprint, sampling, logprobs k, sample
index). Another run asking the same teacher the same question with the same sampling reads the
answer instead of generating it. The raw answer is cached (before the output filters), so a run
with other filters reuses it too. Entries are never modified, so concurrent runs may share a
cache: at worst both write the same answer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs

from distray import formats as F
from distray import storage
from distray.engines.common import RESULT_COLUMNS
from distray.engines.results import ERROR

__all__ = ["CACHED_COLUMNS", "AnswerCache"]

#: What an entry holds: the engine's answer for one row (its result columns, minus `error`:
#: failed requests are never cached).
CACHED_COLUMNS = tuple(c for c in RESULT_COLUMNS if c != ERROR)


@lru_cache(maxsize=8)
def _fs(root: str) -> tuple[pafs.FileSystem, str]:
    return storage.filesystem_for(root)


class AnswerCache:
    """Reads and writes cache entries under `root` (local path or URI)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached answer columns for `key`, or None."""
        fs, base = _fs(self.root)
        path = f"{base.rstrip('/')}/{key[:2]}/{key}.json"
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except (FileNotFoundError, OSError):
            return None
        try:
            entry = json.loads(data.decode("utf-8"))
        except ValueError:
            return None  # a damaged entry is a miss (bad UTF-8 or JSON); the next answer overwrites it
        if not isinstance(entry, dict) or F.RESPONSE not in entry:
            return None
        return {c: entry.get(c) for c in CACHED_COLUMNS}

    def put(self, key: str, row: dict[str, Any]) -> None:
        """Store the answer columns of `row` under `key`."""
        entry = {c: row.get(c) for c in CACHED_COLUMNS}
        # Not fsynced: a lost or damaged entry is a cache miss, and one fsync per answer is not.
        data = json.dumps(entry, ensure_ascii=False).encode("utf-8", "backslashreplace")
        storage.write_bytes(self._path(key), [data], durable=False)

"""`FileRows`: training rows of Parquet or JSON-lines files, read with pyarrow in this process.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q

Its own module because both sides use it: `train.datasets` builds one per data path, and
`train.order` tells a worker's source by its class (it reads a `FileRows` in process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from distray.errors import DataError
from distray.storage import filesystem_for, list_files

__all__ = ["FileRows"]


@dataclass(frozen=True)
class FileRows:
    """The rows of a folder (or file) of Parquet or JSON-lines files, read with pyarrow in the
    calling process, or the same rows as a lazy Ray Dataset (`dataset()`).

    Written here rather than left to Ray Data because a Ray Data execution starts read tasks
    (and, on a fresh node, their worker processes): seconds of start-up each time, whatever the
    size. The driver reads the run's ids once and each worker its rows once per epoch and once
    for validation, so a short run spent more time starting reads than training. A worker uses
    `tables()` only while its rows fit in memory (`order.LOCAL_SORT_ROWS`); beyond that it
    streams `dataset()`. Both give the same rows.

    Args:
        path: a folder, a file, or an object-store URI.
        suffixes: the files read under a folder; `.parquet` files are read as Parquet, the others
            as text, one table `{"text": [line, ...]}` per file (the first filter parses them).
        read_columns: the Parquet columns read (None: all).
        filters: pyarrow-table functions applied in order (parsing, `holdout_filter`).
        keep: the columns kept after the filters (None: all).
    """

    path: str
    suffixes: tuple[str, ...] = (".parquet",)
    read_columns: list[str] | None = None
    filters: tuple[Callable[[Any], Any], ...] = field(default=())
    keep: list[str] | None = None

    def with_columns(self, keep: list[str]) -> FileRows:
        return replace(self, keep=list(keep))

    def filtered(self, fn: Callable[[Any], Any]) -> FileRows:
        return replace(self, filters=(*self.filters, fn))

    def files(self) -> list[str]:
        files = list_files(self.path, self.suffixes)
        if not files:
            raise DataError(f"no {'/'.join(self.suffixes)} files under `{self.path}`")
        return files

    def tables(self) -> Iterator[Any]:
        """One table per file, filtered, reduced to `keep`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, _ = filesystem_for(self.path)
        for path in self.files():
            with fs.open_input_file(path) as f:
                if path.endswith(".parquet"):
                    table = pq.read_table(f, columns=self.read_columns)
                else:
                    # As Ray Data's read_text: split on "\n", empty lines dropped (bytes that are
                    # not UTF-8 are replaced here, where read_text would fail the run).
                    lines = f.read().decode("utf-8", errors="replace").split("\n")
                    table = pa.table({"text": pa.array([x for x in lines if x], pa.string())})
            for fn in self.filters:
                table = fn(table)
            yield table.select(self.keep) if self.keep is not None else table

    def dataset(self) -> Any:
        """The same rows as a lazy Ray Dataset."""
        import ray.data

        files = self.files()
        fs, _ = filesystem_for(self.path)
        texts = [f for f in files if not f.endswith(".parquet")]
        parquets = [f for f in files if f.endswith(".parquet")]
        parts = []
        if texts:
            parts.append(ray.data.read_text(texts, filesystem=fs))
        if parquets:
            parts.append(ray.data.read_parquet(parquets, filesystem=fs, columns=self.read_columns))
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        for fn in self.filters:
            ds = ds.map_batches(fn, batch_format="pyarrow")
        if self.keep is not None:
            ds = ds.select_columns(self.keep)
        ds.context.enable_progress_bars = False
        return ds

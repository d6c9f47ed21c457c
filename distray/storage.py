"""Local and cloud file I/O: one place for exists, list, and atomic text/bytes/JSON writes.

    from distray.storage import exists, read_text, write_text

Paths are local paths or URIs (s3://, gs://, ...): pyarrow's filesystems first, fsspec for
schemes pyarrow lacks. Every stage reads and writes through these so that a run folder on a
bucket behaves like one on disk.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from distray.errors import DataError

__all__ = [
    "filesystem_for", "exists", "list_files", "fsync_path", "publish", "write_bytes", "write_text", "read_text", "write_jsonl",
    "write_png", "can_append", "append_text",
]


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for local paths and URIs (s3://, gs://, ...).

    pyarrow's own filesystems come first; schemes it lacks (memory://, hf://, az://, ...) go
    through fsspec when that is installed.

    Raises:
        DataError: the scheme is known to neither pyarrow nor fsspec.
    """
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        try:
            import fsspec  # only for schemes pyarrow lacks

            fs, inner = fsspec.core.url_to_fs(path)
        except (ImportError, ValueError) as e:
            raise DataError(
                f"cannot open `{path}`: neither pyarrow nor fsspec knows its scheme ({e}); "
                "use a local path or s3://, gs://, hdfs://, or install the fsspec package for it"
            ) from e
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def exists(path: str) -> bool:
    """True when the file or folder exists."""
    fs, p = filesystem_for(path)
    return bool(fs.get_file_info(p).type != pafs.FileType.NotFound)


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under `path` (a file or a folder, recursively) with one of `suffixes`, sorted.

    A single file is returned whatever its suffix. Hidden files and `_`-prefixed files
    (`_SUCCESS`, `_metadata`) in folders are skipped.

    Returns:
        Paths in the filesystem's own form (no scheme for cloud URIs; absolute locally).

    Raises:
        DataError: `path` does not exist.
    """
    fs, p = filesystem_for(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input `{path}` does not exist")
    if info.type == pafs.FileType.File:
        return [p]
    found = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and f.path.endswith(suffixes)
        and not os.path.basename(f.path).startswith((".", "_"))
    )


def fsync_path(path: str) -> None:
    """fsync a local file or folder (a folder: so a rename or delete in it survives a crash).

    Filesystems that cannot fsync a folder (some network mounts) are let be.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def publish(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    """Rename a fully written temp file into place, durably on a local disk.

    Locally the file is fsynced before the rename (else a crash can leave a zero-byte file
    under the final name) and its folder after (else the rename itself can be lost). An
    object store's PUT is durable when it returns; there it is a plain move.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(os.path.dirname(final) or ".")
    else:
        fs.move(tmp, final)


def write_bytes(path: str, chunks: Iterable[bytes], *, durable: bool = True) -> None:
    """Write a file atomically on any filesystem: readers never see a half-written file.

    A temp name, then a rename (a copy on S3); with `durable`, fsynced (`publish`).
    `durable=False` is for files whose loss costs nothing (a cache entry).
    """
    fs, p = filesystem_for(path)
    parent = os.path.dirname(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    # Unique per writer: two threads of one process may write the same path.
    tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            for chunk in chunks:
                f.write(chunk)
        if durable:
            publish(fs, tmp, p)
        else:
            fs.move(tmp, p)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (temp name, then rename) on any filesystem."""
    write_bytes(path, [text.encode("utf-8")])


def can_append(path: str) -> bool:
    """Whether `append_text` works on `path`'s filesystem: local disks do; object stores
    (s3://, gs://) have no append, so a growing file there is rewritten whole."""
    return "://" not in path or path.startswith("file://")


def append_text(path: str, text: str) -> None:
    """Append `text` to a local file (created with its folder when missing); the cost is the
    text's, not the file's. Lines are whole: a reader never sees half of one that `text` ends
    with a newline (one write call).

    Raises:
        ValueError: `path` is on a filesystem without append (see `can_append`).
    """
    if not can_append(path):
        raise ValueError(f"`{path}` is on an object store, which has no append; use write_text")
    _, p = filesystem_for(path)
    os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(text)


def read_text(path: str) -> str:
    """Read a whole text file from any filesystem."""
    fs, p = filesystem_for(path)
    with fs.open_input_stream(p) as f:
        data: bytes = f.read()
    return data.decode("utf-8")


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL (UTF-8, one object per line) atomically; returns the row count."""
    n = 0

    def lines() -> Iterator[bytes]:
        nonlocal n
        for row in rows:
            n += 1
            yield (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode(
                "utf-8", "backslashreplace"
            )

    write_bytes(path, lines())
    return n


def write_png(path: str, fig: Any, dpi: int = 110) -> str:
    """Save a matplotlib figure as PNG atomically on any filesystem, then close it; returns `path`."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, [buf.getvalue()])
    return path

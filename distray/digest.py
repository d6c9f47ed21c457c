"""Content digests of files and folders, local or in a bucket, cached so a rerun costs a stat.

    from distray.digest import tree_digest
    tree_digest("runs/quickstart/generate/data")   # sha256 hex over every shard's content

- A local file is hashed whole, streamed (`distray.fingerprint.file_sha256`). Its hash is
  cached by path, size, mtime and inode in the fingerprint cache, so an unchanged 10 GB input is
  read once, and a same-size edit (which changes the mtime) is read again.
- An s3:// object is named by its ETag (and checksum), which the store computes from its
  content; pyarrow's FileInfo does not carry one, so a folder's ETags come from one boto3
  listing (`distray.fingerprint.s3_objects`, the same one model fingerprints use). Without boto3,
  and on other stores, size and modification time stand in.
- A folder's digest covers the relative name and the digest of each file under it, sorted,
  leaving out hidden files (leases, temp files) and the names given in `exclude`.
"""

from __future__ import annotations

import hashlib
import logging

from distray.storage import filesystem_for

__all__ = ["tree_digest"]

logger = logging.getLogger(__name__)


class _Cache:
    """The file-hash cache `distray.fingerprint` keeps (one store, one format, its guard
    against same-size rewrites within the timestamp granularity), loaded once per digest."""

    def __init__(self) -> None:
        from distray import fingerprint

        self.entries = fingerprint.load_cache()
        self.before = dict(self.entries)

    def sha256(self, path: str) -> str:
        from distray.fingerprint import file_sha256

        return file_sha256(path, self.entries)

    def save(self) -> None:
        from distray import fingerprint

        if self.entries != self.before:
            fingerprint.save_cache(self.entries)


def _s3_tree(uri: str, exclude: tuple[str, ...]) -> str | None:
    """The digest of an s3:// object or folder from one listing of its ETags; None without
    boto3 (the caller falls back to pyarrow's listing)."""
    from distray.fingerprint import s3_objects

    objects = s3_objects(uri.rstrip("/"), recursive=True)
    if objects is None:
        return None
    h = hashlib.sha256()
    kept = 0
    for name, size, etag, checksum in sorted(objects):
        parts = name.split("/")
        if any(p.startswith(".") for p in parts) or parts[-1] in exclude:
            continue
        kept += 1
        h.update(f"{name}\0{size}\0{etag}\0{checksum}\0".encode())
    return h.hexdigest() if kept else "missing"


def tree_digest(path: str, exclude: tuple[str, ...] = ()) -> str:
    """The digest of a file, or of every file under a folder (names and content); "missing"
    when there is nothing at `path`.

    Args:
        path: a local path or URI.
        exclude: file names (at any depth) left out, e.g. ("stats.json", "lineage.json").
    """
    from pyarrow import fs as pafs

    if path.startswith("s3://"):
        listed = _s3_tree(path, exclude)
        if listed is not None:
            return listed
    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if info.type == pafs.FileType.File:
        if "://" in path:
            return f"stat:{info.size}:{info.mtime_ns}"
        one = _Cache()
        digest = one.sha256(path)
        one.save()
        return digest
    base = path.rstrip("/")
    cache = _Cache() if "://" not in path else None
    h = hashlib.sha256()
    files = sorted(
        (f.path[len(inner.rstrip("/")) + 1:], f)
        for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        if f.type == pafs.FileType.File
    )
    for rel, f in files:
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or parts[-1] in exclude:
            continue
        digest = cache.sha256(f"{base}/{rel}") if cache is not None else f"stat:{f.size}:{f.mtime_ns}"
        h.update(f"{rel}\0{digest}\0".encode())
    if cache is not None:
        cache.save()
    return h.hexdigest()

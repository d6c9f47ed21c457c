"""Content digests of files and folders, local or in a bucket, cached so a rerun costs a stat.

    from distray.digest import tree_digest
    tree_digest("runs/quickstart/generate/data")   # sha256 hex over every shard's content

- A local file is hashed whole, streamed (`distray.fingerprint.file_sha256`). Its hash is
  cached by path, size, mtime and inode in the fingerprint cache, so an unchanged 10 GB input is
  read once, and a same-size edit (which changes the mtime) is read again.
- An object in a bucket is named by its ETag (or checksum), which the store computes from its
  content; pyarrow's FileInfo does not carry one, so it is read with boto3's `head_object`
  when boto3 is installed (the endpoint from `AWS_ENDPOINT_URL`, as pyarrow and Ray read it).
  Without boto3, size and modification time stand in, and the digest says so.
- A folder's digest covers the relative name and the digest of each file under it, sorted,
  leaving out hidden files (leases, temp files) and the names given in `exclude`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from distray.storage import filesystem_for

__all__ = ["file_digest", "tree_digest"]

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


def _object_digest(uri: str, size: int, mtime: Any) -> str:
    """An object's ETag or checksum from the store; size and mtime when boto3 is missing."""
    scheme, _, rest = uri.partition("://")
    if scheme in ("s3", "s3a"):
        try:
            import boto3
        except ImportError:
            boto3 = None
        if boto3 is not None:
            bucket, _, key = rest.partition("/")
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            head = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key=key)
            tag = head.get("ChecksumSHA256") or head.get("ETag") or ""
            return f"etag:{tag.strip(chr(34))}:{head.get('ContentLength', size)}"
    return f"stat:{size}:{mtime}"


def file_digest(path: str, cache: _Cache | None = None) -> str:
    """The digest of one file's content (see the module docstring)."""
    if "://" not in path:
        own = cache or _Cache()
        digest = own.sha256(path)
        if cache is None:
            own.save()
        return digest
    from pyarrow import fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    return _object_digest(path, info.size, info.mtime_ns)


def tree_digest(path: str, exclude: tuple[str, ...] = ()) -> str:
    """The digest of a file, or of every file under a folder (names and content); "missing"
    when there is nothing at `path`.

    Args:
        path: a local path or URI.
        exclude: file names (at any depth) left out, e.g. ("stats.json", "lineage.json").
    """
    from pyarrow import fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if info.type == pafs.FileType.File:
        return file_digest(path)
    base = path.rstrip("/")
    cache = _Cache() if "://" not in path else None
    h = hashlib.sha256()
    files = sorted(
        f.path[len(inner.rstrip("/")) + 1:]
        for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        if f.type == pafs.FileType.File
    )
    for rel in files:
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or parts[-1] in exclude:
            continue
        h.update(f"{rel}\0{file_digest(f'{base}/{rel}', cache)}\0".encode())
    if cache is not None:
        cache.save()
    return h.hexdigest()

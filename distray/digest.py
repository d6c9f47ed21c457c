"""Content digests of files and folders, local or in a bucket, cached so a rerun costs a stat.

    from distray.digest import tree_digest
    tree_digest("runs/quickstart/generate/data")   # sha256 hex over every shard's content

- A local file is hashed whole, streamed in 1 MiB chunks. Its hash is cached by (path, size,
  mtime_ns) in `~/.cache/distray/digests.json`, so an unchanged 10 GB input is read once, and a
  same-size edit (which changes the mtime) is read again.
- An object in a bucket is named by its ETag (or checksum), which the store computes from its
  content; pyarrow's FileInfo does not carry one, so it is read with boto3's `head_object`
  when boto3 is installed (the endpoint from `AWS_ENDPOINT_URL`, as pyarrow and Ray read it).
  Without boto3, size and modification time stand in, and the digest says so.
- A folder's digest covers the relative name and the digest of each file under it, sorted,
  leaving out hidden files (leases, temp files) and the names given in `exclude`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import Any

from distray.storage import filesystem_for

__all__ = ["file_digest", "tree_digest"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_cache_lock = threading.Lock()
_cache: dict[str, list[Any]] | None = None


def _cache_path() -> str:
    root = os.environ.get("DISTRAY_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "distray")
    return os.path.join(root, "digests.json")


def _load_cache() -> dict[str, list[Any]]:
    global _cache
    if _cache is None:
        try:
            with open(_cache_path()) as f:
                data = json.load(f)
            _cache = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _cache = {}
    return _cache


def _save_cache() -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_cache, f)
        os.replace(tmp, path)
    except OSError as e:  # a cache that cannot be written only costs a re-read next time
        logger.debug("digest cache %s not written: %s", path, e)


def _local_digest(path: str) -> str:
    st = os.stat(path)
    key = os.path.abspath(path)
    with _cache_lock:
        hit = _load_cache().get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return str(hit[2])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _cache_lock:
        cache = _load_cache()
        cache[key] = [st.st_size, st.st_mtime_ns, digest]
        if len(cache) > 50_000:  # keep the file small: drop the oldest half
            for k in list(cache)[:25_000]:
                del cache[k]
        _save_cache()
    return digest


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


def file_digest(path: str) -> str:
    """The digest of one file's content (see the module docstring)."""
    if "://" not in path:
        return _local_digest(path)
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
        h.update(f"{rel}\0{file_digest(f'{base}/{rel}')}\0".encode())
    return h.hexdigest()

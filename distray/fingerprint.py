"""Content fingerprints of models: a local folder, a folder in a bucket, or a hub id.

    python -c "from distray.fingerprint import model_fingerprint as f; print(f('runs/q/train/student'))"

A model's fingerprint keys row ids and the answer cache (`teacher.rows`), so it must change
whenever the weights, config or tokenizer change, and stay put when nothing did:

- a local folder: each top-level file's name, size and SHA-256 of its whole content (the
  weights index and every shard included), streamed. A deep change in one tensor changes it; a
  copy of the folder elsewhere, or new mtimes, keep it.
- `s3://` / `gs://`: each object's name, size and ETag or checksum (the store computed it, so
  nothing is downloaded); without a client that reports them, size and modification time.
- a hub id: `name@commit` when the local hub cache knows the commit of its revision (no network
  is asked, so it also works with HF_HUB_OFFLINE=1); else the name. An API model name (an
  OpenAI teacher's `gpt-4o`) is its name.

Hashing a 400 GB teacher takes minutes, so each file's digest is cached by (path, size, mtime,
inode) in `~/.cache/distray/fingerprints.json` (`cache_path`): a second call costs a stat per
file. A file modified less than `RACY_S` before it was hashed is not
cached, since a same-size rewrite within the filesystem's timestamp granularity would keep its
mtime (git's "racy" index entries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

from distray import formats as F

__all__ = [
    "RACY_S", "cache_path", "file_sha256", "load_cache", "model_fingerprint", "s3_objects", "save_cache",
]

logger = logging.getLogger(__name__)

#: Seconds a file must be older than its hashing for the digest to be cached.
RACY_S = 2.0
_CHUNK_BYTES = 8 << 20
_MAX_CACHE_ENTRIES = 50_000  # teacher-data shards are digested through it too


def cache_path() -> str:
    """Where file digests are cached: `$DISTRAY_FINGERPRINT_CACHE`, else `fingerprints.json`
    in `$DISTRAY_CACHE_HOME` (as `distray.digest`), else in `~/.cache/distray`."""
    if os.environ.get("DISTRAY_FINGERPRINT_CACHE"):
        return os.path.expanduser(os.environ["DISTRAY_FINGERPRINT_CACHE"])
    root = os.environ.get("DISTRAY_CACHE_HOME") or "~/.cache/distray"
    return os.path.join(os.path.expanduser(root), "fingerprints.json")


def load_cache() -> dict[str, Any]:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every file is hashed again, nothing is wrong


def save_cache(cache: dict[str, Any]) -> None:
    """Write the cache atomically; a failure (read-only home) only costs rehashing later."""
    path = cache_path()
    if len(cache) > _MAX_CACHE_ENTRIES:
        cache = dict(list(cache.items())[-_MAX_CACHE_ENTRIES:])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fingerprints-", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("fingerprint cache %s not written: %s", path, e)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_sha256(path: str, cache: dict[str, Any] | None = None) -> str:
    """SHA-256 of a local file's whole content, streamed in 8 MiB chunks.

    Args:
        path: a local file.
        cache: a digest cache (`{realpath: {"stat": [size, mtime_ns, ino], "sha256": ...}}`)
            to consult and update; None hashes without one.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    entry = cache.get(real) if cache is not None else None
    if isinstance(entry, dict) and entry.get("stat") == _stat_key(st):
        return str(entry["sha256"])
    started_ns = time.time_ns()
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    after = os.stat(real)
    racy = after.st_mtime_ns > started_ns - int(RACY_S * 1e9)
    if cache is not None and not racy and _stat_key(after) == _stat_key(st):
        cache.pop(real, None)  # re-insert at the end: the cache keeps the newest entries
        cache[real] = {"stat": _stat_key(st), "sha256": digest}
    return digest


def _local_fingerprint(model: str) -> str:
    """Name, size and SHA-256 of each top-level file of a folder (what transformers and vLLM
    load from it), or of the one file a single-file model is."""
    if os.path.isdir(model):
        names = sorted(n for n in os.listdir(model) if not n.startswith("."))
        paths = [(n, os.path.join(model, n)) for n in names]
        paths = [(n, p) for n, p in paths if os.path.isfile(p)]
    else:
        paths = [(os.path.basename(model), model)]
    cache = load_cache()
    before = dict(cache)
    parts = [[n, os.path.getsize(p), file_sha256(p, cache)] for n, p in paths]
    if cache != before:
        save_cache(cache)
    return F.content_hash("model", parts)


def s3_objects(uri: str, *, recursive: bool = False) -> list[list[Any]] | None:
    """[name, size, ETag, checksum] of each object under an s3:// folder (directly under it, or
    at any depth with `recursive`; names relative to it), from one listing (boto3 reads
    AWS_ENDPOINT_URL and credentials as pyarrow does); None without boto3."""
    try:
        import boto3
    except ImportError:
        return None
    bucket, _, key = uri[len("s3://"):].partition("/")
    prefix = key.rstrip("/") + "/" if key else ""
    client = boto3.client("s3")
    out: list[list[Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"})
    ):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix):]
            if name and not name.startswith("."):
                out.append([name, obj["Size"], obj.get("ETag"), obj.get("ChecksumAlgorithm")])
    if not out and key:  # a single object (a .gguf file), not a folder; or nothing there
        from botocore.exceptions import ClientError

        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return out
            raise
        out.append([key.rsplit("/", 1)[-1], head["ContentLength"], head.get("ETag"), None])
    return out


def _listed_objects(uri: str) -> list[list[Any]]:
    """[name, size, mtime] of each file directly under a folder any pyarrow filesystem opens: a
    rewritten object gets a new modification time even where no checksum is reported."""
    import pyarrow.fs as pafs

    from distray.storage import filesystem_for

    fs, inner = filesystem_for(uri)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    return [
        [i.base_name, i.size, i.mtime.isoformat() if i.mtime else None]
        for i in sorted(infos, key=lambda i: i.base_name)
        if i.type == pafs.FileType.File and not i.base_name.startswith(".")
    ]


def _remote_fingerprint(uri: str) -> str:
    objects: list[list[Any]] | None = None
    if uri.startswith("s3://"):
        try:
            objects = s3_objects(uri)
        except Exception as e:  # noqa: BLE001 - any client error: the listing below still works
            logger.warning("no ETags for %s (%s); fingerprinting by size and mtime", uri, e)
    if objects is None:
        objects = _listed_objects(uri)
    if not objects:
        return uri  # nothing there (yet): the name is all there is to key by
    return F.content_hash("model-remote", sorted(objects))


def _hub_fingerprint(model: str) -> str:
    """`name@commit` from the local hub cache's refs/ (no network), else the name."""
    name, _, revision = model.partition("@")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return model  # not `org/name`: an API model name, or a path that does not exist
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return f"{name}@{revision}"  # a pinned commit is its own fingerprint
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return model
    ref = os.path.join(HF_HUB_CACHE, "models--" + name.replace("/", "--"), "refs", revision or "main")
    try:
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    except OSError:
        return model
    return f"{name}@{commit}" if commit else model


def model_fingerprint(model: str) -> str:
    """A content fingerprint of a model (see the module docstring).

    Args:
        model: a local folder, an `s3://` / `gs://` (or other URI) folder, a hub id
            (`org/name`, optionally `@revision`), or an API model name.

    Returns:
        A 32-hex-char content hash for folders, `name@commit` for hub ids the local cache
        resolves, else `model` itself.
    """
    if "://" in model:
        return _remote_fingerprint(model)
    if os.path.exists(model):
        return _local_fingerprint(model)
    return _hub_fingerprint(model)

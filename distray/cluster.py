"""Multi-node facts a run depends on: shared storage for the run folder, node-local model copies.

    from distray.cluster import check_shared_output, localize_model

- `check_shared_output(cfg)`: on a Ray cluster of more than one alive node, a run folder on one
  machine's disk cannot work (a training worker on another node writes its checkpoints where
  the driver never looks; an engine reads a model folder that is not there). The run is refused
  before any work starts unless `run.output_dir` is a URI (s3://, gs://) or
  `resources.shared_filesystem` says the path is mounted on every node.
- `localize_model(path)`: vLLM and transformers load from a local folder; a model exported to
  `s3://` is first copied into a node-local cache (`~/.cache/distray/models/<digest>/`) on every
  alive node, under one path that is the same everywhere, and that path is returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

from distray.config import DistrayConfig
from distray.errors import ConfigError, StageError

__all__ = ["EXPORT_MARKER", "alive_nodes", "check_shared_output", "localize_model", "node_local_copy"]

logger = logging.getLogger(__name__)

#: The file an export writes last into a model folder: the folder is complete when it exists.
#: `_`-prefixed so shard listers skip it; it names the files and sizes the export wrote.
EXPORT_MARKER = "_distray_export.json"

#: Where node-local copies of remote models live (one sub-folder per model version).
CACHE_DIR = os.path.expanduser("~/.cache/distray/models")


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster ([] without Ray)."""
    import ray

    if not ray.is_initialized():
        return []
    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_output(cfg: DistrayConfig) -> None:
    """Refuse a node-local `run.output_dir` on a cluster of more than one alive node.

    Call it before anything is written. Without a connected Ray it joins the configured
    cluster (`resources.ray_address` or RAY_ADDRESS) to count its nodes; with neither, the run
    would start a one-node local Ray, which needs no check.

    Raises:
        ConfigError: naming the folder, the node count, and the two ways out.
    """
    import ray

    out = cfg.run.output_dir
    if "://" in out or cfg.resources.shared_filesystem:
        return
    if not ray.is_initialized():
        if (cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")) in (None, "", "local"):
            return
        from distray.ray_utils import init_ray

        init_ray(cfg)
    n = len(alive_nodes())
    if n <= 1:
        return
    raise ConfigError(
        f"`run.output_dir` ({out}) is a local folder, but the Ray cluster has {n} nodes: "
        "training workers, engines and the driver on other nodes would each see their own "
        "disk. Use shared storage: run.output_dir=s3://BUCKET/runs (or gs://...), or, when "
        "this path is one filesystem mounted on every node (NFS), set "
        "resources.shared_filesystem=true"
    )


def _version(path: str) -> str:
    """A digest of a remote model folder's version: its export marker, else its listing."""
    from pyarrow import fs as pafs

    from distray.storage import exists, filesystem_for, read_text

    h = hashlib.sha256(path.rstrip("/").encode())
    marker = f"{path.rstrip('/')}/{EXPORT_MARKER}"
    if exists(marker):
        h.update(read_text(marker).encode())
    else:
        fs, inner = filesystem_for(path)
        for f in sorted(fs.get_file_info(pafs.FileSelector(inner, recursive=True)), key=lambda f: f.path):
            if f.type == pafs.FileType.File:
                h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def node_local_copy(path: str, version: str, cache_dir: str = CACHE_DIR) -> str:
    """Copy the model folder `path` (a URI) into `<cache_dir>/<version>/` on this node, once.

    Concurrent copies (two nodes sharing a disk, two processes) are safe: each copies into its
    own temp folder and renames it into place; the loser drops its copy.

    Returns:
        The local folder.
    """
    from pyarrow import fs as pafs

    from distray.storage import filesystem_for

    target = os.path.join(cache_dir, version)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}-{uuid.uuid4().hex[:6]}-", dir=cache_dir)
    try:
        fs, inner = filesystem_for(path)
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if not os.path.isfile(os.path.join(tmp, "config.json")):
            raise StageError(f"`{path}` is not a model folder (no config.json)")
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def localize_model(path: str) -> str:
    """A local folder holding the model at `path`, on every alive node; `path` itself if local.

    A URI (s3://, gs://) is copied into the node-local cache on each alive Ray node (a task
    pinned to each node), and on this machine without Ray. The copy is keyed by the model's
    version (its export marker), so a re-exported model is copied again and an unchanged one
    never is. A node that joins later has no copy: deploy again after scaling up.

    Raises:
        StageError: the folder could not be copied.
    """
    if "://" not in path:
        return path
    from distray.storage import exists

    if path.rstrip("/").endswith("/train/student") and not exists(f"{path.rstrip('/')}/{EXPORT_MARKER}"):
        # A run's student is uploaded file by file and its marker written last: without the
        # marker it is being exported (or the export died), and a copy could be half of it.
        raise StageError(
            f"`{path}` has no {EXPORT_MARKER}: the student is being exported now, or its export "
            "did not finish; wait for `distray train` to end (or rerun it), then serve again"
        )
    version = _version(path)
    nodes = alive_nodes()
    if not nodes:
        local = node_local_copy(path, version)
    else:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        copy: Any = ray.remote(num_cpus=0, max_retries=2)(node_local_copy)
        refs = [
            copy.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(path, version)
            for n in nodes
        ]
        try:
            locals_ = set(ray.get(refs))
        except Exception as e:
            raise StageError(f"could not copy the model `{path}` to the nodes' local cache: {e}") from e
        if len(locals_) != 1:
            raise StageError(f"nodes disagree on the local copy of `{path}`: {sorted(locals_)}")
        local = locals_.pop()
    logger.info("model %s → node-local copy %s (%d node(s))", path, local, max(1, len(nodes)))
    return local

"""Rows the teacher has answered so far, for the progress line, before any shard is published.

    cat runs/quickstart/generate/.progress/*.count

Shards are published a batch of `generate.rows_per_shard` rows at a time, so counting rows in
shards leaves the progress line still for minutes on a big batch. Each Ray Data task that
carries the teacher's answers to the writer adds its batch's size to a counter file of its own
(`<host>-<pid>.count`: one writer per file, no lock), and the progress line
(`distray.stage_facts.generate_progress`) sums them. The folder is hidden, so digests and
readers skip it; generate clears it when it starts.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from distray import storage

__all__ = ["PROGRESS_DIR", "clear_progress", "count_answered"]

PROGRESS_DIR = ".progress"

_counts: dict[str, int] = {}  # per counter file, in this process


def count_answered(batch: Any, folder: str) -> Any:
    """Add `batch`'s rows to this process's counter under `folder`; return the batch unchanged."""
    path = f"{folder}/{socket.gethostname()}-{os.getpid()}.count"
    _counts[path] = _counts.get(path, 0) + batch.num_rows
    try:
        storage.write_text(path, str(_counts[path]))
    except OSError:
        pass  # progress is never worth failing a batch for
    return batch


def clear_progress(generate_dir: str) -> None:
    """Remove the counters a previous run left."""
    folder = f"{generate_dir}/{PROGRESS_DIR}"
    if storage.exists(folder):
        fs, inner = storage.filesystem_for(folder)
        fs.delete_dir(inner)

"""The per-config facts of the built-in stages that `distray.stages.REGISTRY` names.

    python -c "from distray.stage_facts import generate_files; help(generate_files)"

Each function is named in a `Stage` as "distray.stage_facts:<name>" and takes the config (and
for progress, the run folder and a state dict the console keeps between calls). They import
nothing heavy, so lineage and the progress line can call them on the driver at any time.
"""

from __future__ import annotations

import json
import time
from typing import Any

from distray.paths import RunPaths
from distray.storage import exists, read_text

__all__ = [
    "bench_files", "evaluate_covers", "generate_cost", "generate_on_skip", "generate_covers", "generate_files",
    "generate_progress", "train_cost", "train_covers",
]


def generate_covers(cfg: Any) -> tuple[str, ...]:
    """The test split when generate labels it; the demo's settings when the demo trains the
    teacher generate asks."""
    more: tuple[str, ...] = ()
    if "test" in cfg.generate.splits:
        more += ("data.test",)
    if cfg.demo.train_teacher:
        more += ("demo",)
    return more


def generate_files(cfg: Any) -> list[str]:
    """The input files generate reads: one `data.<split>` per split it labels."""
    return [f"data.{s}" for s in cfg.generate.splits]


def generate_on_skip(cfg: Any) -> None:
    """Say so when a finished generate left transient teacher failures behind (`retry-*`)."""
    import logging

    from distray.teacher.writer import is_retry_shard, iter_shard_files

    folder = RunPaths(cfg.run_dir).generate_rejects
    shards = [p for p in iter_shard_files(folder) if is_retry_shard(p)]
    if shards:
        logging.getLogger("distray.pipeline").warning(
            "stage generate: %d shard(s) of transient teacher failures in %s (rejects/retry-*); "
            "`distray generate --config ...` retries just those rows (the stages after it then "
            "rerun on the new rows)", len(shards), folder,
        )


def train_covers(cfg: Any) -> tuple[str, ...]:
    """On-policy rounds ask the teacher to score each round's rollouts."""
    if getattr(cfg.train, "mode", "off_policy") == "on_policy":
        return ("teacher", "teachers", "generate.logprobs")
    return ()


def evaluate_covers(cfg: Any) -> tuple[str, ...]:
    """The demo baseline is trained from the demo's settings."""
    return ("demo",) if cfg.demo.train_teacher else ()


def bench_files(cfg: Any) -> list[str]:
    """bench's prompts: `bench.prompts`, else the test data."""
    return ["bench.prompts"] if cfg.bench.prompts else ["data.test"]


def _shard_rows_tokens(folder: str) -> tuple[int, int]:
    """Rows and teacher completion tokens in the Parquet shards under `folder` (footers and one
    column only)."""
    import pyarrow.parquet as pq

    from distray import formats as F
    from distray.storage import filesystem_for, list_files

    if not exists(folder):
        return 0, 0
    fs, _ = filesystem_for(folder)
    rows = tokens = 0
    for path in list_files(folder, (".parquet",)):
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                rows += pf.metadata.num_rows
                if F.COMPLETION_TOKENS in pf.schema_arrow.names:
                    col = pf.read(columns=[F.COMPLETION_TOKENS]).column(0)
                    tokens += int(sum(v for v in col.to_pylist() if v))
        except OSError:
            continue
    return rows, tokens


def generate_cost(cfg: Any) -> str:
    """`N rows (T teacher tokens, H GPU-hours, $C)` of the teacher data a `--force` deletes."""
    p = RunPaths(cfg.run_dir)
    rows, tokens = _shard_rows_tokens(p.generate_data)
    rejects, _ = _shard_rows_tokens(p.generate_rejects)
    parts = [f"{rows} teacher rows and {rejects} rejects", f"{tokens:,} teacher completion tokens"]
    if exists(p.generate_stats):
        try:
            stats = json.loads(read_text(p.generate_stats))
        except ValueError:
            stats = {}
        if stats.get("gpu_hours"):
            parts.append(f"{float(stats['gpu_hours']):.2f} GPU-hours in its last run")
        if stats.get("cost_usd"):
            parts.append(f"${float(stats['cost_usd']):.2f} in its last run")
    return ", ".join(parts)


def train_cost(cfg: Any) -> str:
    """`the student and N checkpoints (S steps)` that a `--force` of train deletes."""
    from distray.storage import filesystem_for

    p = RunPaths(cfg.run_dir)
    steps = 0
    if exists(p.train_metrics):
        for line in read_text(p.train_metrics).splitlines():
            try:
                steps = max(steps, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    n_ckpt = 0
    if exists(p.checkpoints):
        from pyarrow import fs as pafs

        fs, inner = filesystem_for(p.checkpoints)
        n_ckpt = sum(1 for f in fs.get_file_info(pafs.FileSelector(inner))
                     if f.type == pafs.FileType.Directory)
    student = "the exported student, " if exists(f"{p.student}/model.safetensors") else ""
    return f"{student}{n_ckpt} checkpoint(s), {steps} training steps"


def _rows_in(folder: str, known: dict[str, int]) -> int:
    """Rows in the Parquet and JSONL shards under `folder` (Parquet from metadata only).

    Shards are published whole and never change (a rename, or a retry shard settled into a new
    one), so `known` keeps each one's count between polls: a poll lists the folder and reads
    only the shards published since the last one.
    """
    from distray.storage import filesystem_for, list_files

    if not exists(folder):
        return 0
    fs, _ = filesystem_for(folder)
    n = 0
    for path in list_files(folder, (".parquet", ".jsonl")):
        if path not in known:
            try:
                if path.endswith(".parquet"):
                    import pyarrow.parquet as pq

                    with fs.open_input_file(path) as f:
                        known[path] = pq.ParquetFile(f).metadata.num_rows
                else:
                    with fs.open_input_stream(path) as f:
                        known[path] = f.read().count(b"\n")
            except OSError:
                continue  # a shard being written or moved
        n += known[path]
    return n


def _input_rows(cfg: Any) -> int | None:
    """Input rows generate labels (lines of local JSONL inputs × teachers × samples), if cheap."""
    import os

    total = 0
    builtin = cfg.data.builtin
    for split in cfg.generate.splits:
        path = getattr(cfg.data, split, None)
        if path is None and builtin is not None:
            total += int(getattr(builtin, f"n_{split}", 0) or 0)
            continue
        if not path or "://" in path or not os.path.isfile(path) or not path.endswith(".jsonl"):
            return None if split == "train" else total or None
        with open(path, "rb") as f:
            total += sum(1 for ln in f if ln.strip())
    if cfg.data.max_rows:
        total = min(total, cfg.data.max_rows * len(cfg.generate.splits))
    return total * max(len(cfg.all_teachers), 1) * cfg.generate.sampling.n


def answered_rows(run_dir: str) -> int:
    """Rows the teacher answered so far in the running generate: the counters its engine
    batches write under `generate/.progress/` (see `distray.teacher.progress`), else 0."""
    from distray.storage import filesystem_for, list_files

    folder = f"{RunPaths(run_dir).generate}/.progress"
    if not exists(folder):
        return 0
    fs, _ = filesystem_for(folder)
    n = 0
    for path in list_files(folder, (".count",)):
        try:
            with fs.open_input_stream(path) as f:
                n += int(f.read().decode() or 0)
        except (OSError, ValueError):
            continue
    return n


def generate_progress(cfg: Any, run_dir: str, state: dict[str, Any]) -> str | None:
    """`generate: 1200/4200 rows | 35.2 rows/s | ETA 1m25s` while generate runs.

    Rows count once answered by the teacher (the engines' counters), or once in a published
    shard, whichever is more, so the line moves between shard publishes.
    """
    p = RunPaths(run_dir)
    if not exists(f"{p.generate}/lineage.json") or exists(p.generate_stats):
        return None
    known = state.setdefault("shards", {})
    done, rejects = _rows_in(p.generate_data, known), _rows_in(p.generate_rejects, known)
    answered = answered_rows(run_dir)
    now = time.monotonic()
    if "published0" not in state:
        state.update(published0=done + rejects, answered0=answered)
    seen = max(done + rejects, state["published0"] + answered - state["answered0"])
    if "total" not in state:
        state["total"] = _input_rows(cfg) if cfg is not None else None
    total = state["total"]
    head = f"generate: {seen}" + (f"/{total} rows" if total else " rows")
    if seen == state["published0"] and "t0" not in state:
        state["idle"] = now
        return f"{head} | waiting for the teacher's first answers (engines starting)"
    # The rate counts from the first answers, not from the engines' start (minutes of weight
    # loading on a big teacher would make every early rate and ETA wrong).
    if "t0" not in state:
        state.update(t0=state.get("idle", now), seen0=state["published0"])
    rate = (seen - state["seen0"]) / max(now - state["t0"], 1e-6)
    parts = [head, f"{rate:.1f} rows/s"]
    if rejects:
        parts.append(f"{rejects} rejects")
    if total and rate > 0:
        left = max(total - seen, 0) / rate
        parts.append(f"ETA {int(left // 60)}m{int(left % 60):02d}s")
    return " | ".join(parts)

"""Teacher rows whose prompt left the input: moved aside, so train never reads them.

    distray generate --config X.yaml      # after removing prompts from data.train

Generate keys its rows by content, so a rerun after prompts were edited or removed labels the
new ones and keeps the rest. The rows of prompts that are gone must not stay where train reads
them (removing contaminated prompts has to change the student). When the input files changed
since generate last looked (`generate/.inputs.json` holds their digests and the teachers'),
every row in `generate/data/` whose id the current input no longer yields is moved to

    <run>/generate/removed/<split>/part-<hash>.parquet

and the count is logged. A move writes the removed rows first, then the kept rows over their
shard (same rename as every shard publish), so a kill in between leaves the removed rows in both
places at worst, and the next run moves them again (same shard name: content-hashed). Rejects
are left where they are: train never reads them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distray import formats as F
from distray import storage
from distray.teacher import writer as W
from distray.teacher.rows import expand_rows, model_fingerprint

__all__ = ["move_removed_rows"]

logger = logging.getLogger(__name__)


def _ids(batch: pa.Table, **kwargs: Any) -> pa.Table:
    rows = expand_rows(batch.to_pylist(), **kwargs)
    return pa.table({F.ID: pa.array([r[F.ID] for r in rows], pa.string())})


def _current_ids(cfg: Any, inputs: dict[str, str], max_rows: Any) -> np.ndarray:
    """Sorted digests of every teacher-row id the current input yields (all splits, teachers)."""
    from distray.teacher.reader import read_raw, valid_rows

    gen = cfg.generate
    parts = [np.empty((0,), dtype=W.digests([]).dtype)]
    for split, src in inputs.items():
        for teacher in cfg.all_teachers:
            kwargs = {"teacher": teacher, "sampling": gen.sampling, "logprobs": gen.logprobs,
                      "split": split, "fingerprint": model_fingerprint(teacher.model)}
            ds = valid_rows(read_raw(src, cfg, max_rows=max_rows(split))).map_batches(
                _ids, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None)
            batch: Any
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
                parts.append(W.digests(batch.column(F.ID).to_pylist()))
    return np.unique(np.concatenate(parts))


def _state(cfg: Any, inputs: dict[str, str]) -> dict[str, Any]:
    from distray.digest import tree_digest
    from distray.teacher.rows import teacher_ident

    return {
        "inputs": {split: tree_digest(src) for split, src in sorted(inputs.items())},
        "max_rows": cfg.data.max_rows,
        "teachers": [json.dumps(teacher_ident(t), sort_keys=True, default=str)
                     for t in cfg.all_teachers],
        "sampling": cfg.generate.sampling.model_dump(mode="json"),
        "logprobs": cfg.generate.logprobs,
    }


def move_removed_rows(cfg: Any, inputs: dict[str, str], *, data_dir: str, generate_dir: str,
                      max_rows: Any, fence: Any = None) -> int:
    """Move the rows of `data_dir` whose id the current input no longer yields (see the module
    docstring); returns how many moved.

    Args:
        cfg: the run config.
        inputs: split → input path, as generate labels them.
        data_dir: `generate/data`.
        generate_dir: `generate/`.
        max_rows: split → the row cap generate applies.
        fence: the run folder lease's fence, checked before each shard is rewritten.
    """
    marker = f"{generate_dir}/.inputs.json"
    state = _state(cfg, inputs)
    if storage.exists(marker):
        try:
            if json.loads(storage.read_text(marker)) == state:
                return 0
        except ValueError:
            pass
    shards = [p for p in W.iter_shard_files(data_dir) if p.endswith(".parquet")]
    moved = 0
    if shards:
        current = _current_ids(cfg, inputs, max_rows)
        fs, root = storage.filesystem_for(data_dir)
        for path in shards:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f)
            d = W.digests(table.column(F.ID).to_pylist())
            pos = np.searchsorted(current, d)
            pos[pos >= len(current)] = 0
            keep = current[pos] == d if len(current) else np.zeros(len(d), dtype=bool)
            if keep.all():
                continue
            rel = path[len(root.rstrip("/")) + 1:]
            split = rel.split("/")[0] if "/" in rel else "train"
            gone = table.filter(pa.array(~keep))
            W.write_shard(gone.to_pylist(), f"{generate_dir}/removed/{split}", f"{generate_dir}/.tmp",
                          schema=table.schema, fence=fence)
            if fence is not None:
                fence.check(f"shard {path}")
            if keep.any():
                tmp = f"{path}.pruned"
                with fs.open_output_stream(tmp) as f:
                    pq.write_table(table.filter(pa.array(keep)), f)
                storage.publish(fs, tmp, path)
            else:
                fs.delete_file(path)
            moved += gone.num_rows
    if moved:
        logger.warning(
            "generate: %d teacher row(s) belong to prompts no longer in the input; moved to %s/removed "
            "(train does not read them)", moved, generate_dir)
    storage.write_text(marker, json.dumps(state, sort_keys=True))
    return moved

"""Generate's exactly-once invariant (`distray.teacher.publish`), property-tested on the real
publishing code: random kill points, random shard outcomes, reruns until a run finishes.

    .venv/bin/python -m pytest tests/unit/test_exactly_once_property.py -q

Each run does what `generate.run` does around its engines: clean `.tmp/`, load the done ids of
data/ and rejects/, ask only for the rest, hand answered batches to the real `Sink` (which
writes each row to data, rejects or a `retry-*` shard), and settle older retry shards when it
ends. The teacher's answer to each row on each run is drawn at random (accepted, rejected for
good, or a transient failure a rerun retries); a run may be killed at any shard publish. Once a
run ends without a kill, every input id must be in data/ or rejects/ exactly once, counted from
the files with pyarrow and json, not with distray's readers.
"""

from __future__ import annotations

import json
import random
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from distray import formats as F
from distray import storage
from distray.config import FilterConfig
from distray.teacher import writer as W
from distray.teacher.publish import Sink


class Killed(BaseException):
    """A kill at a shard publish (BaseException: nothing in distray may swallow it)."""


def _row(i: str, outcome: str) -> dict[str, Any]:
    error = {"ok": None, "final": "bad_answer: unusable", "transient": "request_failed: HTTP 503"}[outcome]
    return {
        F.ID: i, F.INPUT_ID: i, F.MESSAGES: [{"role": "user", "content": f"q {i}"}],
        F.RESPONSE: None if error else f"answer {i}", F.FINISH_REASON: None if error else "stop",
        F.TEACHER: "t", F.SAMPLE_INDEX: 0, "_split": "train", "error": error,
    }


def _one_run(root: Path, ids: list[str], rng: random.Random, kill_at: int | None, batch: int) -> None:
    data, rejects, tmp = str(root / "data"), str(root / "rejects"), str(root / ".tmp")
    W.clean_tmp(tmp)
    prefix = f"{W.RETRY_PREFIX}-{uuid.uuid4().hex[:8]}"
    sink = Sink(out_dirs={"train": f"{data}/train"}, rejects_dir=rejects, tmp_dir=tmp,
                rejects_format="jsonl", retry_prefix=prefix,
                filters=FilterConfig(drop_empty=True, truncated="keep"), labels=None,
                cache_dir=None, store_cache=False, tracker=None)
    done = W.load_done_ids([data, rejects])
    todo = W.keep_not_done(pa.table({F.ID: ids}), done).column(F.ID).to_pylist()
    publishes = [0]
    real_publish = storage.publish

    def publish(fs: Any, tmp_path: str, final: str) -> None:
        publishes[0] += 1
        if kill_at is not None and publishes[0] == kill_at:
            raise Killed
        real_publish(fs, tmp_path, final)

    storage.publish = publish  # type: ignore[assignment]
    try:
        for start in range(0, len(todo), batch):
            outcomes = [rng.choice(["ok", "ok", "final", "transient"]) for _ in todo[start:start + batch]]
            sink(pa.Table.from_pylist([_row(i, o) for i, o in zip(todo[start:start + batch], outcomes, strict=True)]))
        W.settle_retry_shards(rejects, tmp, [data, rejects], prefix)
    finally:
        storage.publish = real_publish  # type: ignore[assignment]


def _placed(root: Path) -> list[str]:
    ids: list[str] = []
    for f in (root / "data").rglob("*.parquet"):
        ids += pq.read_table(f, columns=[F.ID]).column(F.ID).to_pylist()
    for f in (root / "rejects").rglob("*.jsonl"):
        ids += [json.loads(line)[F.ID] for line in f.read_text().splitlines() if line.strip()]
    return ids


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 7),
       kills=st.lists(st.integers(1, 12), max_size=4))
def test_every_id_lands_once_whatever_the_kill_points(n: int, seed: int, batch: int, kills: list[int]) -> None:
    rng = random.Random(seed)
    ids = [f"row-{k}" for k in range(n)]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for kill_at in kills:  # killed runs, each at its k-th publish (if it gets that far)
            try:
                _one_run(root, ids, rng, kill_at, batch)
            except Killed:
                pass
        _one_run(root, ids, rng, None, batch)  # then one run that ends
        placed = _placed(root)
        assert sorted(placed) == sorted(ids), "an id is missing, or in data/rejects twice"

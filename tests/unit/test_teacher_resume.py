"""Resuming generate after transient teacher failures: what a rerun sends again, and that every
row still ends in data or rejects once (no Ray: the per-batch sink and the shard files).

    pytest tests/unit/test_teacher_resume.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distray import formats as F
from distray.config import FilterConfig
from distray.teacher import writer as W
from distray.teacher.publish import Sink

ERRORS = {
    "ok": None,
    "http500": "request_failed: HTTP 500 after 7 attempts: boom",
    "http400": "request_failed: HTTP 400 after 1 attempts: prompt too long",
    "engine": "engine_error: RuntimeError: CUDA error",
    "long": "prompt_too_long: 9000 tokens > generate.max_prompt_tokens (8192)",
}


def _row(name: str, error: str | None) -> dict[str, Any]:
    return {
        F.ID: F.content_hash("row", name), F.INPUT_ID: name,
        F.MESSAGES: [{"role": "user", "content": name}], F.PROMPT: name, F.REFERENCE: None,
        F.TEACHER: "t", F.SAMPLE_INDEX: 0, "_split": "train",
        F.RESPONSE: None if error else f"answer to {name}", F.RESPONSE_TOKEN_IDS: None,
        F.TOPK_TOKEN_IDS: None, F.TOPK_LOGPROBS: None,
        F.FINISH_REASON: None if error else "stop", F.PROMPT_TOKENS: 3, F.COMPLETION_TOKENS: None,
        "error": error,
        # What engines/openai.py marks: a plain 4xx is final.
        "_retryable": None if error is None else not error.startswith("request_failed: HTTP 400"),
    }


def _sink(run_dir: Path, prefix: str) -> Sink:
    return Sink(
        out_dirs={"train": str(run_dir / "data" / "train")}, rejects_dir=str(run_dir / "rejects"),
        tmp_dir=str(run_dir / ".tmp"), rejects_format="jsonl", retry_prefix=prefix,
        filters=FilterConfig(), labels=None, cache_dir=None, store_cache=False, tracker=None,
    )


def _answer(run_dir: Path, prefix: str, errors: dict[str, str | None]) -> dict[str, Any]:
    batch = pa.Table.from_pylist([_row(name, err) for name, err in errors.items()])
    return _sink(run_dir, prefix)(batch).to_pylist()[0]


def _rejects(run_dir: Path) -> dict[str, list[str]]:
    """{shard file name prefix ('rejects' or 'retry'): [input ids]}."""
    out: dict[str, list[str]] = {}
    for f in sorted((run_dir / "rejects").glob("*.jsonl")):
        ids = [json.loads(line)["input_id"] for line in f.read_text().splitlines()]
        out.setdefault(f.name.split("-")[0], []).extend(ids)
    return {k: sorted(v) for k, v in out.items()}


def _done(run_dir: Path) -> set[str]:
    done = W.load_done_ids([str(run_dir / "data"), str(run_dir / "rejects")])
    return {name for name in ERRORS if W.digest(F.content_hash("row", name)) in set(done.tolist())}


def _settle(run_dir: Path, prefix: str) -> int:
    folders = [str(run_dir / "data"), str(run_dir / "rejects")]
    return W.settle_retry_shards(str(run_dir / "rejects"), str(run_dir / ".tmp"), folders, prefix)


def test_transient_failures_are_rejects_but_not_done(tmp_path: Path) -> None:
    stats = _answer(tmp_path, "retry-run1", ERRORS)
    assert stats["accepted"] == 1 and stats["rejected"] == 4
    assert _rejects(tmp_path) == {"rejects": ["http400", "long"], "retry": ["engine", "http500"]}
    # A rerun skips the answered row and the final rejects, and asks again for the rest.
    assert _done(tmp_path) == {"ok", "http400", "long"}
    assert len(W.load_done_ids([str(tmp_path / "rejects")], include_retry=True)) == 4


def test_rerun_settles_retried_rows_exactly_once(tmp_path: Path) -> None:
    _answer(tmp_path, "retry-run1", ERRORS)
    # Run 2 retries the two transient rows: one is answered, one fails again.
    _answer(tmp_path, "retry-run2", {"http500": None, "engine": ERRORS["engine"]})
    # Before settling (a run killed here), the answered row is in data and an old retry shard.
    assert _rejects(tmp_path)["retry"] == ["engine", "engine", "http500"]
    assert _settle(tmp_path, "retry-run2") == 1
    assert _rejects(tmp_path) == {"rejects": ["http400", "long"], "retry": ["engine"]}
    shards = sorted(p.name for p in (tmp_path / "rejects").glob("retry-*"))
    assert len(shards) == 1 and shards[0].startswith("retry-run2-")
    data = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "data").rglob("*.parquet"))
    ).column(F.INPUT_ID).to_pylist()
    assert sorted(data) == ["http500", "ok"]
    # Settling again changes nothing; run 3 answers the last one and leaves no retry shard.
    assert _settle(tmp_path, "retry-run2") == 0
    _answer(tmp_path, "retry-run3", {"engine": None})
    assert _settle(tmp_path, "retry-run3") == 1
    assert _rejects(tmp_path) == {"rejects": ["http400", "long"]}
    assert _done(tmp_path) == set(ERRORS)


def test_settle_keeps_rows_the_rerun_did_not_reach(tmp_path: Path) -> None:
    _answer(tmp_path, "retry-run1", {"http500": ERRORS["http500"], "engine": ERRORS["engine"]})
    # Run 2 stopped early (or no longer asks for `engine`): only `http500` was settled.
    _answer(tmp_path, "retry-run2", {"http500": None})
    assert _settle(tmp_path, "retry-run2") == 1
    assert _rejects(tmp_path) == {"retry": ["engine"]}
    assert "engine" not in _done(tmp_path)

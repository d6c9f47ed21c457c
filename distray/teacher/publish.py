"""Publishing teacher rows exactly once: the per-batch end of the generate pipeline.

    .venv/bin/python -m pytest tests/unit/test_exactly_once_property.py tests/unit/test_teacher_resume.py -q

**The invariant.** Every input row (× teachers × samples) ends in `generate/data/` or
`generate/rejects/` exactly once, whatever moment a run is killed at and however often it is
run again. It rests on four rules, each kept in one place:

1. Ids are content hashes (`teacher.rows.row_id`): a rerun computes the same id for the same
   question, so "done" is a set of ids, not a position in a file.
2. A shard is published whole or not at all (`teacher.writer.write_shard`: written under
   `.tmp/`, then renamed, under the run folder's lease fence), so a kill leaves either the
   shard or nothing; an unreadable one is set aside and its rows labelled again.
3. A run asks only for ids in neither folder (`writer.load_done_ids` + `keep_not_done`,
   applied by `generate` before the cache and the teacher), and `Sink` below writes each
   answered row to exactly one of data, rejects or retry.
4. Transient teacher failures (`TRANSIENT_REASONS`: `request_failed` after the retries,
   `engine_error`) go to a `retry-<run>-<hash>` shard in rejects/, which the done set leaves
   out, so the next run asks again. When that run ends (or stops on `min_success_ratio`) it
   removes from older retry shards every row it settled (`writer.settle_retry_shards`), so
   rejects/ keeps the latest outcome of each row. Only a run killed outright can leave a
   retried row in data/ and in an older retry shard until the next run settles it.

`tests/unit/test_exactly_once_property.py` checks the invariant on this code with random kill
points and random outcomes. Answers the teacher gave are never asked for twice: rows answered but not yet published are
the only ones a killed run asks again. Rejected answers are final: delete their rejects shard
to retry them.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from distray import formats as F
from distray.config import FilterConfig
from distray.engines.common import is_prepare_error
from distray.engines.results import ERROR, reject_row
from distray.lease import Fence
from distray.teacher import writer as W
from distray.teacher.cache import AnswerCache
from distray.teacher.filters import check_response, response_digest

__all__ = [
    "TRANSIENT_REASONS", "Sink", "cache_lookup", "input_rejects_sink", "is_transient",
    "reason_code", "sum_stats",
]


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


#: Teacher failures a rerun retries (see the module docstring).
TRANSIENT_REASONS = frozenset({"request_failed", "engine_error"})


def is_transient(row: dict[str, Any]) -> bool:
    """True when a row failed at the teacher in a way a rerun may fix.

    The openai engine marks a failure it would not retry (a plain 4xx) `_retryable: False`.
    """
    code = reason_code(str(row.get(ERROR) or ""))
    return code in TRANSIENT_REASONS and row.get("_retryable") is not False


class Sink:
    """Filter, cache and write one batch, each row to its split's folder (`_split`); return the
    batch's stats (runs in Ray Data tasks)."""

    def __init__(
        self,
        *,
        out_dirs: dict[str, str],
        rejects_dir: str,
        tmp_dir: str,
        rejects_format: str,
        retry_prefix: str,
        filters: FilterConfig,
        labels: list[str] | None,
        cache_dir: str | None,
        store_cache: bool,
        tracker: Any,
        fence: Fence | None = None,
    ) -> None:
        self.fence = fence  # the run folder lease's: checked before each shard is published
        self.out_dirs = out_dirs
        self.rejects_dir = rejects_dir
        self.tmp_dir = tmp_dir
        self.rejects_format = rejects_format
        self.retry_prefix = retry_prefix
        self.filters = filters
        self.labels = labels
        self.cache_dir = cache_dir
        self.store_cache = store_cache
        self.tracker = tracker

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        accepted: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        retries: list[dict[str, Any]] = []
        reasons: Counter[str] = Counter()
        answered = [r for r in rows if not r.get("_from_cache")]
        if self.store_cache and self.cache_dir:
            cache = AnswerCache(self.cache_dir)
            for r in answered:
                if not r.get(ERROR) and r.get("_cache_key"):
                    cache.put(r["_cache_key"], r)
        for r in rows:
            rej = check_response(r, self.filters, self.labels)
            if rej is None:
                accepted.append(r)
            else:
                stage = "teacher" if r.get(ERROR) else "filter"
                out = retries if is_transient(r) else rejects
                out.append(reject_row(r, stage, rej.reason, rej.detail))
                reasons[rej.reason] += 1
        if self.filters.dedupe_responses and accepted and self.tracker is not None:
            import ray

            pairs = [(response_digest(r[F.RESPONSE]), r[F.INPUT_ID]) for r in accepted]
            firsts = ray.get(self.tracker.check.remote(pairs))
            kept = []
            for r, first in zip(accepted, firsts, strict=True):
                if first is None:
                    kept.append(r)
                else:
                    detail = f"the same answer was given to input {first!r}"
                    rejects.append(reject_row(r, "filter", "duplicate_response", detail))
                    reasons["duplicate_response"] += 1
            accepted = kept
        stored: list[dict[str, Any]] = []
        by_split: dict[str, list[dict[str, Any]]] = {}
        for r in accepted:
            by_split.setdefault(r["_split"], []).append(r)
        for split, mine in by_split.items():
            out_dir = self.out_dirs[split]
            data_rows = [{f.name: r.get(f.name) for f in F.TEACHER_DATA_SCHEMA} for r in mine]
            # A value the schema cannot hold (an engine quirk) costs its row, not the batch.
            data_rows, unstorable = W.split_writable(data_rows, F.TEACHER_DATA_SCHEMA)
            for r, why in unstorable:
                rejects.append(reject_row(r, "write", "bad_answer", f"cannot be stored: {why}"))
                reasons["bad_answer"] += 1
            kept_ids = {d[F.ID] for d in data_rows}
            stored += [r for r in mine if r[F.ID] in kept_ids]
            W.write_shard(data_rows, out_dir, self.tmp_dir, schema=F.TEACHER_DATA_SCHEMA, fence=self.fence)
        accepted = stored
        W.write_shard(
            rejects, self.rejects_dir, self.tmp_dir,
            schema=F.REJECT_SCHEMA, fmt=self.rejects_format, prefix="rejects", fence=self.fence,
        )
        W.write_shard(
            retries, self.rejects_dir, self.tmp_dir,
            schema=F.REJECT_SCHEMA, fmt=self.rejects_format, prefix=self.retry_prefix,
            fence=self.fence,
        )
        # Rows stopped before the engine (too long for it, refused by its template) cost no request.
        asked = [r for r in answered if not is_prepare_error(r.get(ERROR))]
        stats = {
            "rows": len(rows),
            "accepted": len(accepted),
            "rejected": len(rejects) + len(retries),
            "reasons": json.dumps(dict(reasons)),
            "teacher_requests": len(asked),
            "cache_hits": len(rows) - len(answered),
            "http_attempts": sum(int(r.get("_attempts") or 0) for r in answered),
            "prompt_tokens": sum(int(r.get(F.PROMPT_TOKENS) or 0) for r in answered),
            "completion_tokens": sum(int(r.get(F.COMPLETION_TOKENS) or 0) for r in answered),
            "accepted_completion_tokens": sum(int(r.get(F.COMPLETION_TOKENS) or 0) for r in accepted),
            "valid_inputs": 0,
            "engine_t0": min((r["_t0"] for r in answered if r.get("_t0") and r.get("_t1")), default=None),
            "engine_t1": max((r["_t1"] for r in answered if r.get("_t0") and r.get("_t1")), default=None),
        }
        return pa.Table.from_pylist([stats], schema=W.STATS_SCHEMA)


def input_rejects_sink(
    rejects_dir: str, tmp_dir: str, fmt: str, done: np.ndarray, fence: Fence | None = None
) -> Any:
    """Write the read/validate rejects of one raw read batch; count the valid rows."""

    def fn(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        from distray.teacher.reader import rejects_table

        valid = int(pc.sum(pc.is_null(batch["_reject_reason"])).as_py() or 0)
        rej = W.keep_not_done(rejects_table(batch), done)
        rows = rej.to_pylist()
        W.write_shard(rows, rejects_dir, tmp_dir, schema=F.REJECT_SCHEMA, fmt=fmt, prefix="rejects", fence=fence)
        reasons = Counter(reason_code(r["reason"]) for r in rows)
        stats: dict[str, Any] = {k: 0 for k in W.STATS_SCHEMA.names}
        stats["engine_t0"] = stats["engine_t1"] = None
        # `rows` counts every input row read; `rejected` only the rejects new to this run.
        stats.update(
            rows=batch.num_rows, rejected=len(rows), reasons=json.dumps(dict(reasons)),
            valid_inputs=valid,
        )
        return pa.Table.from_pylist([stats], schema=W.STATS_SCHEMA)

    return fn


def sum_stats(ds: Any) -> dict[str, Any]:
    """Consume a stats dataset (this runs the pipeline) and add up its rows."""
    spans = ("engine_t0", "engine_t1")
    total: dict[str, Any] = {k: 0 for k in W.STATS_SCHEMA.names if k != "reasons" and k not in spans}
    reasons: Counter[str] = Counter()
    t0s: list[float] = []
    t1s: list[float] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            for k in total:
                total[k] += int(row[k] or 0)
            counts: dict[str, int] = json.loads(row["reasons"] or "{}")
            reasons.update(counts)
            if row.get("engine_t0") is not None and row.get("engine_t1") is not None:
                t0s.append(row["engine_t0"])
                t1s.append(row["engine_t1"])
    total["reasons"] = dict(reasons)
    total["engine_busy_s"] = round(max(t1s) - min(t0s), 3) if t0s else 0.0
    return total


def cache_lookup(batch: pa.Table, cache_dir: str) -> pa.Table:
    """Keep only rows with a cached answer, filled in and marked `_from_cache`."""
    cache = AnswerCache(cache_dir)
    out = []
    for r in batch.to_pylist():
        hit = cache.get(r["_cache_key"])
        if hit is not None:
            r.update(hit)
            r[ERROR] = None
            r["_from_cache"] = True
            out.append(r)
    if not out:
        return batch.slice(0, 0)
    return pa.Table.from_pylist(out)

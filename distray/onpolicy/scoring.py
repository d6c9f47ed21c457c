"""Phase (b): a model scores the student's exact tokens (prompt logprobs over prompt + answer).

    (run by distray.onpolicy.rounds; rows land in <run>/onpolicy/round-XXX/scored/ and self/)

Each rollout row becomes one scoring request: the scorer's own rendering of the prompt turns
(its chat template, as generate renders them) followed by the student's `response_token_ids`,
sent as token ids with `max_tokens: 1` and `prompt_logprobs: k`. For answer token j at
position n_prompt + j, vLLM returns the scorer's logprob of that token and its top k, given
the prompt and the answer's first j tokens; these are exactly the teacher's top-k that
training reads at that answer position::

    prompt ids            answer ids (the student's)
    <s> <|user|> rev abc <|assistant|> │ c   b   a   </s>
    prompt_logprobs[n_prompt + j] ─────┘ top-k over the vocabulary before c, b, a, </s>

The teacher and the student share one tokenizer (checked before any round), so the ids mean
the same tokens. With `teacher.kind: hf` the same numbers come from one transformers forward
pass per row. The student scores its own eval samples the same way (its logprobs there give
the reverse KL of the metrics). This module prepares the rows and writes the scores; the
engine layer asks the model (`Engine.score`, `distray.engines.scoring`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa

from distray import formats as F
from distray.config import DistrayConfig, HFTeacher, VLLMTeacher
from distray.engines.results import ERROR
from distray.engines.scoring import ROW
from distray.onpolicy import layout
from distray.onpolicy.layout import (
    ROLLOUT_SCHEMA,
    SCORED_SCHEMA,
    SELF_SCHEMA,
    STUDENT_TOKEN_LOGPROBS,
    TEACHER_TOKEN_LOGPROBS,
)
from distray.teacher import writer as W

__all__ = ["score_dataset", "ScoreSink"]

logger = logging.getLogger(__name__)

_ROW = ROW
_ERROR = ERROR


def _prepare(scorer: VLLMTeacher | HFTeacher, max_model_len: int | None) -> Any:
    """Rows → `_ids` (prompt + answer), `_n_prompt`, or `error` (too long, template refused)."""
    apply_template = getattr(scorer, "apply_chat_template", True)

    def fn(batch: pa.Table) -> pa.Table:
        from distray.prompts import load_tokenizer

        tok = load_tokenizer(scorer.model, scorer.trust_remote_code)
        out = []
        for r in batch.to_pylist():
            row = json.loads(r[_ROW])
            _, ids, error = F.render_row(tok, row[F.MESSAGES], apply_template)
            answer = [int(t) for t in row[F.RESPONSE_TOKEN_IDS]]
            full = list(ids) + answer
            if error is None and max_model_len is not None and len(full) > max_model_len:
                error = f"too_long: {len(full)} tokens > the scorer's max_model_len ({max_model_len})"
            out.append({_ROW: r[_ROW], "_ids": full, "_n_prompt": len(ids), _ERROR: error})
        return pa.Table.from_pylist(
            out,
            schema=pa.schema(
                [(_ROW, pa.string()), ("_ids", pa.list_(pa.int64())), ("_n_prompt", pa.int64()),
                 (_ERROR, pa.string())]
            ),
        )

    return fn


def _as_row_json(batch: pa.Table) -> pa.Table:
    return pa.table({_ROW: [json.dumps(r, default=str) for r in batch.to_pylist()]})


def score_dataset(ds: Any, scorer: VLLMTeacher | HFTeacher, cfg: DistrayConfig, k: int) -> Any:
    """Score rollout rows (ROLLOUT_SCHEMA) with `scorer`; lazy.

    Returns:
        Rows `{_row: the rollout row as JSON, error, _scores: JSON [top-k ids, top-k
        logprobs, own logprobs] or null}`.
    """
    from distray.engines import engine_for

    engine = engine_for(scorer)
    limit = engine.engine_kwargs().get("max_model_len")
    rows = ds.map_batches(_as_row_json, batch_format="pyarrow", batch_size=None)
    prepared = rows.map_batches(_prepare(scorer, int(limit) if limit else None), batch_format="pyarrow", batch_size=None)
    return engine.score(prepared, k)


class ScoreSink:
    """Write one batch of scores: teacher scores as SCORED_SCHEMA rows, self scores as
    SELF_SCHEMA rows, failures as rejects; return `{kind, rows, tokens}` of what was written.

    Args:
        out_dir: scored/ (teacher) or self/ (student).
        rejects_dir, tmp_dir: the round's rejects/ and .tmp/.
        whose: `teacher` or `self`: whose scores the batch holds.
        retry_prefix: names the shard of this batch's engine errors, which a rerun retries
            (`distray.onpolicy.settle`); None: a pass of its own.
        fence: the run folder lease's fence, checked before each shard is published.
    """

    def __init__(
        self, out_dir: str, rejects_dir: str, tmp_dir: str, whose: str, retry_prefix: str | None = None,
        fence: Any = None,
    ) -> None:
        self.fence = fence
        self.out_dir = out_dir
        self.rejects_dir = rejects_dir
        self.tmp_dir = tmp_dir
        self.whose = whose
        stage = layout.TEACHER_SCORE if whose == "teacher" else layout.SELF_SCORE
        self.retry_prefix = retry_prefix or layout.retry_prefix(stage, "sink")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distray.engines.results import reject_row

        good: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        retries: list[dict[str, Any]] = []
        stage = "scoring" if self.whose == "teacher" else "self_scoring"
        for r in batch.to_pylist():
            row = json.loads(r[_ROW])
            if r.get(_ERROR) or not r.get("_scores"):
                error = str(r.get(_ERROR) or "engine_error: no scores")
                reason, _, detail = error.partition(":")
                transient = error.startswith("engine_error")
                if transient:
                    logger.warning("scoring of %s failed (%s); a rerun retries it", row[F.ID], error[:200])
                # A final self-score failure settles the row too: it only costs a metric.
                (retries if transient else rejects).append(reject_row(row, stage, reason.strip(), detail.strip()))
                continue
            top_ids, top_lps, own = json.loads(r["_scores"])
            if self.whose == "self":
                good.append({F.ID: row[F.ID], F.INPUT_ID: row[F.INPUT_ID], STUDENT_TOKEN_LOGPROBS: own})
                continue
            out = {f.name: row.get(f.name) for f in ROLLOUT_SCHEMA}
            out.update({F.TOPK_TOKEN_IDS: top_ids, F.TOPK_LOGPROBS: top_lps, TEACHER_TOKEN_LOGPROBS: own})
            good.append(out)
        schema = SELF_SCHEMA if self.whose == "self" else SCORED_SCHEMA
        W.write_shard(good, self.out_dir, self.tmp_dir, schema=schema, fence=self.fence)
        for rows, prefix in ((rejects, "rejects"), (retries, self.retry_prefix)):
            W.write_shard(rows, self.rejects_dir, self.tmp_dir, schema=F.REJECT_SCHEMA, fmt="jsonl",
                          prefix=prefix, fence=self.fence)
        tokens = sum(len(g.get(F.RESPONSE_TOKEN_IDS) or g.get(STUDENT_TOKEN_LOGPROBS) or []) for g in good)
        return pa.table({"kind": [self.whose], "rows": [len(good)], "tokens": [tokens]})

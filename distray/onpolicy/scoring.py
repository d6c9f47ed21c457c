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
the reverse KL of the metrics).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pyarrow as pa

from distray import formats as F
from distray.config import DistrayConfig, HFTeacher, VLLMTeacher
from distray.onpolicy import layout
from distray.onpolicy.layout import (
    ROLLOUT_SCHEMA,
    SCORED_SCHEMA,
    SELF_SCHEMA,
    STUDENT_TOKEN_LOGPROBS,
    TEACHER_TOKEN_LOGPROBS,
)
from distray.teacher import writer as W

__all__ = ["answer_scores", "score_dataset", "ScoreSink"]

logger = logging.getLogger(__name__)

#: The row travelling through an engine stage as JSON text (one column, any content).
_ROW = "_row"
_ERROR = "error"


def answer_scores(
    positions: list[dict[Any, Any] | None], answer: list[int], k: int
) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """vLLM `prompt_logprobs` at the answer's positions → (top-k ids, top-k logprobs, the
    answer token's own logprob), best first.

    Args:
        positions: `prompt_logprobs[n_prompt:]`, one `{token_id: {logprob, rank, ...}}` per
            answer token (vLLM adds the token itself when it is outside the top k).
        answer: the answer's token ids.
        k: top-k kept per position.
    """
    ids_out: list[list[int]] = []
    lps_out: list[list[float]] = []
    own: list[float] = []
    for pos, tok in zip(positions, answer, strict=True):
        items = []
        mine = None
        for tid, info in (pos or {}).items():
            if info is None:
                continue  # a key Arrow filled in for another position
            lp = float(info["logprob"] if isinstance(info, dict) else info)
            rank = info.get("rank") if isinstance(info, dict) else None
            lp = lp if math.isfinite(lp) else -1e30
            if int(tid) == int(tok):
                mine = lp
            items.append((rank if rank is not None else math.inf, -lp, int(tid), lp))
        items.sort()
        best = [it for it in items if it[0] <= k][:k] or items[:k]
        ids_out.append([it[2] for it in best])
        lps_out.append([it[3] for it in best])
        own.append(mine if mine is not None else -1e30)
    return ids_out, lps_out, own


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


def _vllm_scores(ds: Any, scorer: VLLMTeacher, cfg: DistrayConfig, k: int) -> Any:
    from ray.data.llm import build_processor

    from distray.engines.vllm import processor_config
    from distray.ray_utils import cluster_has_gpu

    kw = scorer.engine_kwargs.get("max_model_len")
    prepared = ds.map_batches(_prepare(scorer, int(kw) if kw else None), batch_format="pyarrow", batch_size=None)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        if row.get(_ERROR):
            return {"__inference_error__": row[_ERROR]}
        return {
            "__inference_error__": "",
            "tokenized_prompt": [int(t) for t in row["_ids"]],
            "sampling_params": {
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "detokenize": False,
            },
        }

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {_ROW: row[_ROW], _ERROR: row.get(_ERROR) or None}
        err = row.get("__inference_error__")
        if err or out[_ERROR]:
            out[_ERROR] = out[_ERROR] or f"engine_error: {str(err)[:500]}"
            return {**out, "_scores": None}
        n = int(row["_n_prompt"])
        answer = [int(t) for t in row["_ids"]][n:]
        positions = list(row.get("prompt_logprobs") or [])[n : n + len(answer)]
        if len(positions) != len(answer):
            return {**out, _ERROR: "engine_error: prompt_logprobs shorter than the answer", "_scores": None}
        return {**out, "_scores": json.dumps(answer_scores(positions, answer, k))}

    processor = build_processor(
        processor_config(scorer, k, cluster_has_gpu()), preprocess=preprocess, postprocess=postprocess
    )
    return processor(prepared)


class _HFScorer:
    """One transformers forward per row: the same numbers as vLLM's prompt logprobs."""

    def __init__(self, model: str, trust_remote_code: bool, k: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.k = k
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        out = []
        for r in batch.to_pylist():
            if r.get(_ERROR):
                out.append({_ROW: r[_ROW], _ERROR: r[_ERROR], "_scores": None})
                continue
            ids, n = [int(t) for t in r["_ids"]], int(r["_n_prompt"])
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[n - 1 : len(ids) - 1], -1)
            top_lp, top_ids = lp.topk(self.k, -1)
            own = lp.gather(-1, torch.tensor(ids[n:]).unsqueeze(-1)).squeeze(-1)
            scores = (top_ids.tolist(), top_lp.tolist(), own.tolist())
            out.append({_ROW: r[_ROW], _ERROR: None, "_scores": json.dumps(scores)})
        return pa.Table.from_pylist(
            out, schema=pa.schema([(_ROW, pa.string()), (_ERROR, pa.string()), ("_scores", pa.string())])
        )


def _hf_scores(ds: Any, scorer: HFTeacher, k: int) -> Any:
    prepared = ds.map_batches(_prepare(scorer, None), batch_format="pyarrow", batch_size=None)
    return prepared.map_batches(
        _HFScorer,
        fn_constructor_kwargs={"model": scorer.model, "trust_remote_code": scorer.trust_remote_code, "k": k},
        batch_format="pyarrow",
        batch_size=scorer.batch_size,
        concurrency=scorer.concurrency,
        num_gpus=scorer.num_gpus_per_replica or None,
    )


def _as_row_json(batch: pa.Table) -> pa.Table:
    return pa.table({_ROW: [json.dumps(r, default=str) for r in batch.to_pylist()]})


def score_dataset(ds: Any, scorer: VLLMTeacher | HFTeacher, cfg: DistrayConfig, k: int) -> Any:
    """Score rollout rows (ROLLOUT_SCHEMA) with `scorer`; lazy.

    Returns:
        Rows `{_row: the rollout row as JSON, error, _scores: JSON [top-k ids, top-k
        logprobs, own logprobs] or null}`.
    """
    rows = ds.map_batches(_as_row_json, batch_format="pyarrow", batch_size=None)
    if isinstance(scorer, HFTeacher):
        return _hf_scores(rows, scorer, k)
    return _vllm_scores(rows, scorer, cfg, k)


class ScoreSink:
    """Write one batch of scores: teacher scores as SCORED_SCHEMA rows, self scores as
    SELF_SCHEMA rows, failures as rejects; return `{kind, rows, tokens}` of what was written.

    Args:
        out_dir: scored/ (teacher) or self/ (student).
        rejects_dir, tmp_dir: the round's rejects/ and .tmp/.
        whose: `teacher` or `self`: whose scores the batch holds.
        retry_prefix: names the shard of this batch's engine errors, which a rerun retries
            (`distray.onpolicy.settle`); None: a pass of its own.
    """

    def __init__(
        self, out_dir: str, rejects_dir: str, tmp_dir: str, whose: str, retry_prefix: str | None = None
    ) -> None:
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
        W.write_shard(good, self.out_dir, self.tmp_dir, schema=schema)
        for rows, prefix in ((rejects, "rejects"), (retries, self.retry_prefix)):
            W.write_shard(rows, self.rejects_dir, self.tmp_dir, schema=F.REJECT_SCHEMA, fmt="jsonl", prefix=prefix)
        tokens = sum(len(g.get(F.RESPONSE_TOKEN_IDS) or g.get(STUDENT_TOKEN_LOGPROBS) or []) for g in good)
        return pa.table({"kind": [self.whose], "rows": [len(good)], "tokens": [tokens]})

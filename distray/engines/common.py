"""Pieces every local engine shares: chat template + tokenization with a length check, and
turning an engine's raw output (token ids, per-position top-k) into teacher-data columns.

Rows are plain dicts here; the Ray Data stages in vllm.py / hf.py call these per batch.
"""

from __future__ import annotations

import math
from typing import Any

from distray import formats as F
from distray.config import SamplingConfig
from distray.engines.results import ERROR
from distray.prompts import load_tokenizer

__all__ = [
    "RESULT_COLUMNS",
    "PREPARE_ERRORS",
    "is_prepare_error",
    "prepare_rows",
    "finish_reason",
    "topk_from_vllm",
    "empty_result",
    "engine_span",
    "sample_seed",
]

#: Columns an engine stage fills (beside the row's own); `error` is null when it went well.
RESULT_COLUMNS = (
    F.RESPONSE,
    F.RESPONSE_TOKEN_IDS,
    F.TOPK_TOKEN_IDS,
    F.TOPK_LOGPROBS,
    F.FINISH_REASON,
    F.PROMPT_TOKENS,
    F.COMPLETION_TOKENS,
    ERROR,
)


def prepare_rows(
    rows: list[dict[str, Any]],
    *,
    model: str,
    trust_remote_code: bool,
    apply_chat_template: bool,
    max_prompt_tokens: int | None,
    max_model_len: int | None,
) -> list[dict[str, Any]]:
    """Render and tokenize each row's prompt into `_prompt_token_ids` and `prompt_tokens`;
    set `error` to `prompt_too_long: ...` when it exceeds the limits, or `chat_template: ...`
    when the template refuses the turns (the engine then skips the row; it ends in rejects).

    The row's own `prompt` column moves to `_orig_prompt`: vLLM's stage uses `prompt` for the
    rendered text.
    """
    tok = load_tokenizer(model, trust_remote_code)
    for r in rows:
        r["_orig_prompt"] = r.pop(F.PROMPT, None)
        r.setdefault(ERROR, None)
        text, ids, error = F.render_row(tok, r[F.MESSAGES], apply_chat_template)
        r["_prompt_text"] = text
        r["_prompt_token_ids"] = ids
        r[F.PROMPT_TOKENS] = len(ids) if error is None else None
        if error is not None:
            r[ERROR] = error
        elif max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            r[ERROR] = (
                f"prompt_too_long: {len(ids)} tokens > generate.max_prompt_tokens "
                f"({max_prompt_tokens})"
            )
        elif max_model_len is not None and len(ids) >= max_model_len:
            r[ERROR] = (
                f"prompt_too_long: {len(ids)} tokens leave no room to answer within the "
                f"engine's max_model_len ({max_model_len})"
            )
    return rows


#: Reason codes `prepare_rows` sets: final rejects, decided before any engine saw the row.
PREPARE_ERRORS = frozenset({"prompt_too_long", "chat_template"})


def is_prepare_error(error: str | None) -> bool:
    """True when `error` (`code: detail`) was set by `prepare_rows`, not by an engine."""
    return bool(error) and str(error).split(":", 1)[0].strip() in PREPARE_ERRORS


def finish_reason(
    token_ids: list[int],
    *,
    max_tokens: int,
    eos: frozenset[int],
    prompt_tokens: int,
    max_model_len: int | None,
) -> str:
    """`length` when the answer was cut (max_tokens or the context window), else `stop`.

    Engines that do not report it (ray.data.llm's vLLM stage, HF generate) are judged by the
    ids: an answer that ends in eos stopped; one that used every allowed token did not.
    """
    n = len(token_ids)
    if n and token_ids[-1] in eos:
        return "stop"
    if n >= max_tokens:
        return "length"
    if max_model_len is not None and prompt_tokens + n >= max_model_len:
        return "length"
    return "stop"


def topk_from_vllm(
    logprobs: list[dict[Any, Any]] | None, k: int
) -> tuple[list[list[int]], list[list[float]]] | None:
    """vLLM's per-position `{token_id: {logprob, rank, ...}}` → top-k ids and logprobs, best first.

    vLLM also returns the sampled token when it is outside the top k (its rank > k); it is
    dropped so every position has exactly the k best.
    """
    if logprobs is None:
        return None
    ids_out: list[list[int]] = []
    lps_out: list[list[float]] = []
    for pos in logprobs:
        items = []
        for tid, info in (pos or {}).items():
            lp = info["logprob"] if isinstance(info, dict) else float(info)
            rank = info.get("rank") if isinstance(info, dict) else None
            items.append((rank if rank is not None else math.inf, -lp, int(tid), float(lp)))
        items.sort()
        best = [it for it in items if it[0] <= k][:k] or items[:k]
        ids_out.append([it[2] for it in best])
        lps_out.append([it[3] if math.isfinite(it[3]) else -1e30 for it in best])
    return ids_out, lps_out


def engine_span(metrics: dict[str, Any] | None) -> dict[str, float]:
    """`{"_t0", "_t1"}`: wall-clock time a request reached a vLLM engine and got its last token.

    vLLM's request stats mix a frontend wall-clock arrival time with engine-core monotonic
    stamps; the last token's wall time is arrival + first-token latency + (last − first token).
    Summed over a run, these give how long the engines were busy (stats `engine_busy_s`).
    """
    if not metrics or not metrics.get("arrival_time"):
        return {}
    t0 = float(metrics["arrival_time"])
    first, last = metrics.get("first_token_ts") or 0.0, metrics.get("last_token_ts") or 0.0
    t1 = t0 + float(metrics.get("first_token_latency") or 0.0) + max(0.0, float(last) - float(first))
    return {"_t0": t0, "_t1": t1}


def empty_result(row: dict[str, Any], error: str) -> dict[str, Any]:
    """Fill the result columns of a row that got no answer."""
    row[F.RESPONSE] = None
    row[F.RESPONSE_TOKEN_IDS] = None
    row[F.TOPK_TOKEN_IDS] = None
    row[F.TOPK_LOGPROBS] = None
    row[F.FINISH_REASON] = None
    row.setdefault(F.PROMPT_TOKENS, None)
    row[F.COMPLETION_TOKENS] = None
    row[ERROR] = error
    return row


def sample_seed(sampling: SamplingConfig, sample_index: int) -> int | None:
    """The engine seed of one sample: `seed + sample_index`, so n samples differ but reruns
    repeat; None when sampling is unseeded."""
    return None if sampling.seed is None else sampling.seed + sample_index

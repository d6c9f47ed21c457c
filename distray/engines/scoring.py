"""Teacher-forced scoring: a model's logprobs of tokens it is given (prompt logprobs over
prompt + answer), for on-policy distillation's teacher scores and the student's self scores.

    python -c "from distray.engines.scoring import answer_scores; help(answer_scores)"

Input rows are prepared by the caller: `_ids` (the scorer's rendering of the prompt, then the
answer's ids), `_n_prompt` (how many of `_ids` are prompt), `error` (set: the row is not sent),
and `_row` (the caller's row as JSON text, passed through). Output rows: `_row`, `error`,
`_scores` (JSON `[top-k ids, top-k logprobs, own logprobs]` per answer position, or null)::

    prompt ids            answer ids
    <s> <|user|> rev abc <|assistant|> │ c   b   a   </s>
    prompt_logprobs[n_prompt + j] ─────┘ top-k over the vocabulary before c, b, a, </s>

vLLM gives them as `prompt_logprobs: k` of a `max_tokens: 1` request on the token ids; HF as one
forward pass per row (log-softmax at T=1, as vLLM reports them): `Engine.score` of each kind
(`engines.vllm.vllm_scores`, `engines.hf.hf_scores`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ROW", "answer_scores"]

#: The caller's row, travelling through an engine stage as JSON text (one column, any content).
ROW = "_row"


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

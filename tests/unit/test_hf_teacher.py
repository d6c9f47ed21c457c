"""The `hf` teacher kind without Ray: top-k logprobs per step and stop strings, on a tiny model."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from distray import formats as F
from distray.engines.hf import HFGenerator
from distray.hf_engine import topk_per_step

PROMPTS = ["hello there", "what is 2+2?", "x"]


def _rows() -> pa.Table:
    return pa.Table.from_pylist(
        [
            {F.ID: str(i), F.MESSAGES: [{"role": "user", "content": c}], F.SAMPLE_INDEX: 0}
            for i, c in enumerate(PROMPTS)
        ]
    )


def _generator(model: str, **sampling: Any) -> HFGenerator:
    return HFGenerator(model, "float32", False, {"max_tokens": 24, **sampling}, 3, None)


def _full_topk(logits: tuple[Any, ...], k: int) -> tuple[list[Any], list[Any]]:
    """The former computation: log-softmax and top-k over the whole [B, T, V] stack."""
    import torch

    lp = torch.log_softmax(torch.stack(logits, dim=1).float(), dim=-1)
    vals, idx = torch.topk(lp, k=k, dim=-1)
    return idx.tolist(), vals.tolist()


def test_topk_per_step_equals_full_tensor_on_sampled_answers(tiny_model: str, monkeypatch) -> None:
    # Sampling at T=0.8 with top_p: the logprobs must still be the raw logits' at T=1.
    g = _generator(tiny_model, temperature=0.8, top_p=0.9, seed=3)
    seen: list[Any] = []
    generate = g.engine.model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(g.engine.model, "generate", spy)
    rows = g(_rows()).to_pylist()
    (out,) = seen
    assert len(out.logits) > 1
    full_ids, full_lps = _full_topk(out.logits, 3)
    assert topk_per_step(out.logits, 3) == (full_ids, full_lps)
    for i, r in enumerate(rows):
        n = len(r[F.RESPONSE_TOKEN_IDS])
        assert n > 0 and r[F.TOPK_TOKEN_IDS] == full_ids[i][:n]
        assert r[F.TOPK_LOGPROBS] == full_lps[i][:n]


def test_stop_string_cuts_text_ids_and_topk_like_vllm(tiny_model: str) -> None:
    g = _generator(tiny_model)
    free = g(_rows()).to_pylist()
    ids0 = free[0][F.RESPONSE_TOKEN_IDS]
    # A printable one-token character that first shows up a few tokens into row 0's greedy answer.
    j, stop = next(
        (j, c)
        for j, t in enumerate(ids0)
        if j >= 3
        and len(c := g.engine.tok.decode([t])) == 1
        and c.isprintable()
        and not c.isspace()
        and c not in g.engine.tok.decode(ids0[:j], skip_special_tokens=True)
    )
    g = _generator(tiny_model, stop=[stop])
    stopped = g(_rows()).to_pylist()

    r0 = stopped[0]
    assert r0[F.RESPONSE_TOKEN_IDS] == ids0[: j + 1]  # the completing token is kept, as in vLLM
    assert r0[F.RESPONSE] == g.engine.tok.decode(ids0[:j], skip_special_tokens=True)
    assert stop not in r0[F.RESPONSE]
    assert r0[F.FINISH_REASON] == "stop"
    assert r0[F.COMPLETION_TOKENS] == j + 1
    for r, f in zip(stopped, free, strict=True):
        n = len(r[F.RESPONSE_TOKEN_IDS])
        assert stop not in r[F.RESPONSE]
        assert g.engine.pad_id not in r[F.RESPONSE_TOKEN_IDS]
        assert r[F.RESPONSE_TOKEN_IDS] == f[F.RESPONSE_TOKEN_IDS][:n]
        assert r[F.TOPK_TOKEN_IDS] == f[F.TOPK_TOKEN_IDS][:n]
        assert r[F.TOPK_LOGPROBS] == f[F.TOPK_LOGPROBS][:n]
        if stop not in f[F.RESPONSE]:
            assert r[F.RESPONSE] == f[F.RESPONSE] and r[F.FINISH_REASON] == f[F.FINISH_REASON]


def test_unmatched_stop_string_keeps_the_whole_answer(tiny_model: str) -> None:
    free = _generator(tiny_model)(_rows()).to_pylist()
    got = _generator(tiny_model, stop=["zz-not-there"])(_rows()).to_pylist()
    keys = (F.RESPONSE, F.RESPONSE_TOKEN_IDS, F.FINISH_REASON, F.TOPK_TOKEN_IDS)
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in free]

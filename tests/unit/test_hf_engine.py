"""The one transformers engine (`distray.hf_engine`) shared by the hf teacher, serve and evaluate.

    .venv/bin/python -m pytest tests/unit/test_hf_engine.py -q
"""

from __future__ import annotations

import pytest

from distray.hf_engine import HFEngine, IncrementalText
from distray.prompts import render_prompt


@pytest.fixture(scope="module")
def engine(tiny_model: str) -> HFEngine:
    return HFEngine(tiny_model)


def _prompts(engine: HFEngine) -> list[list[int]]:
    turns = ["hello there", "what is 2+2?", "x"]
    return [render_prompt(engine.tok, [{"role": "user", "content": t}], True)[1] for t in turns]


def test_greedy_stream_matches_batched_generate(engine: HFEngine) -> None:
    """Serve's token-by-token path and the teacher's batched path give the same answer."""
    prompts = _prompts(engine)[1:]
    batch = engine.generate(prompts, max_tokens=8, logprobs=2)
    for ids, answer in zip(prompts, batch, strict=True):
        streamed = list(engine.stream(ids, max_tokens=8))
        # The batch keeps the eos that ended an answer (as vLLM does); the stream never sends it.
        assert answer.token_ids[: len(streamed)] == streamed
        rest = answer.token_ids[len(streamed):]
        assert rest == [] or (len(rest) == 1 and rest[0] in engine.eos)
        assert answer.topk_token_ids is not None and answer.topk_logprobs is not None
        assert len(answer.topk_token_ids) == len(answer.token_ids)
        assert all(len(k) == 2 for k in answer.topk_token_ids)


def test_stream_text_equals_generate_text(engine: HFEngine) -> None:
    ids = _prompts(engine)[0]
    (answer,) = engine.generate([ids], max_tokens=12)
    text = IncrementalText(engine.tok, [])
    pieces = [text.push(t) for t in engine.stream(ids, max_tokens=12)]
    assert "".join(pieces) + text.flush() == answer.text


def test_seeded_sampling_repeats(engine: HFEngine) -> None:
    ids = _prompts(engine)[:2]
    first = engine.generate(ids, max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    again = engine.generate(ids, max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    s1 = list(engine.stream(ids[0], max_tokens=8, temperature=0.9, seed=7))
    assert s1 == list(engine.stream(ids[0], max_tokens=8, temperature=0.9, seed=7))


def test_evaluate_hf_backend_counts_answer_tokens(tiny_model: str) -> None:
    from distray.evaluate.efficiency import measure_local

    msgs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question"}]]
    eff = measure_local(tiny_model, msgs, backend="hf", max_tokens=6, latency_samples=1)
    assert eff.latency_ms is not None and eff.throughput_rows == 2
    assert eff.output_tokens_per_s is not None and eff.output_tokens_per_s > 0

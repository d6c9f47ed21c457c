"""White-box fidelity scorers (teacher_nll, token_agreement, rouge_l_vs_teacher) and the
equal-length latency figures, on small in-memory models.

    .venv/bin/python -m pytest tests/unit/test_fidelity.py -q
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from distray.evaluate import fidelity
from distray.evaluate.efficiency import measure_local, tpot_ms
from distray.evaluate.scorers import score
from distray.hf_engine import ForcedScores, teacher_forced

VOCAB = 64


def _llama(seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def teacher() -> Any:
    return _llama(0)


PROMPTS = [[5, 9, 3], [7, 1, 4, 4, 8, 2, 11], [12]]


@pytest.fixture(scope="module")
def greedy(teacher: Any) -> list[list[int]]:
    """The teacher's greedy answers (8 tokens, no eos) to PROMPTS."""
    import torch

    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.inference_mode():
            seq = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False, pad_token_id=0)
        out.append(seq[0, len(p):].tolist())
    return out


def test_a_model_agrees_with_its_own_greedy_answers(teacher: Any, greedy: list[list[int]]) -> None:
    scored = teacher_forced(teacher, PROMPTS, greedy, batch_size=2)
    assert [len(s.nll) for s in scored] == [8, 8, 8]
    assert all(all(s.top1_match) for s in scored)
    summary = fidelity.summarize_forced(scored)
    assert summary["token_agreement"].value == 100.0
    nll = summary["teacher_nll"].value
    assert nll is not None and 0 < nll < math.log(VOCAB)  # greedy tokens beat a uniform guess


def test_identical_weights_give_the_teachers_own_nll(teacher: Any, greedy: list[list[int]]) -> None:
    twin = copy.deepcopy(teacher)
    a = fidelity.summarize_forced(teacher_forced(teacher, PROMPTS, greedy))
    b = fidelity.summarize_forced(teacher_forced(twin, PROMPTS, greedy))
    assert b["teacher_nll"].value == pytest.approx(a["teacher_nll"].value, abs=1e-6)
    assert b["token_agreement"].value == 100.0


def test_a_perturbed_model_agrees_less_and_finds_the_answers_less_likely(
    teacher: Any, greedy: list[list[int]]
) -> None:
    import torch

    other = copy.deepcopy(teacher)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    t = fidelity.summarize_forced(teacher_forced(teacher, PROMPTS, greedy))
    o = fidelity.summarize_forced(teacher_forced(other, PROMPTS, greedy))
    assert o["token_agreement"].value < t["token_agreement"].value
    assert o["teacher_nll"].value > t["teacher_nll"].value


def test_forced_nll_is_the_sequence_log_likelihood_whatever_the_batch(
    teacher: Any, greedy: list[list[int]]
) -> None:
    """Right padding leaves a row's figures as they are alone; they equal a plain forward pass."""
    import torch

    alone = [teacher_forced(teacher, [p], [t])[0] for p, t in zip(PROMPTS, greedy, strict=True)]
    batched = teacher_forced(teacher, PROMPTS, greedy, batch_size=3)
    for a, b in zip(alone, batched, strict=True):
        assert b.nll == pytest.approx(a.nll, abs=1e-5) and a.top1_match == b.top1_match
    p, t = PROMPTS[1], greedy[1]
    with torch.inference_mode():
        lp = torch.log_softmax(teacher(torch.tensor([p + t])).logits[0].float(), -1)
    want = [-lp[len(p) - 1 + j, tok].item() for j, tok in enumerate(t)]
    assert alone[1].nll == pytest.approx(want, abs=1e-5)


def test_forced_targets_are_cut_to_the_context(teacher: Any) -> None:
    scored = teacher_forced(teacher, [[1] * 60, [1] * 70], [[2] * 10, [2] * 3])
    assert len(scored[0].nll) == 4  # 64 positions: the prompt is kept, the answer's tail goes
    assert scored[1].nll == []
    with pytest.raises(ValueError, match="at least one token"):
        teacher_forced(teacher, [[]], [[1]])


def test_summary_is_token_weighted_and_skips_unscored_rows() -> None:
    rows = [
        ForcedScores([1.0, 3.0], [True, False]),
        None,
        ForcedScores([], []),
        ForcedScores([2.0, 2.0, 2.0, 2.0], [True, True, True, True]),
    ]
    s = fidelity.summarize_forced(rows)
    assert s["teacher_nll"].value == pytest.approx(12.0 / 6)  # not the mean of row means
    assert s["token_agreement"].value == pytest.approx(100 * 5 / 6)
    assert s["teacher_nll"].per_row == [2.0, None, None, 2.0]
    assert s["token_agreement"].per_row == [0.5, None, None, 1.0]
    assert s["teacher_nll"].n == 2
    assert s["teacher_nll"].extra["teacher_ppl"] == pytest.approx(math.exp(2.0))
    empty = fidelity.summarize_forced([None])
    assert empty["teacher_nll"].value is None and empty["token_agreement"].value is None


def test_rouge_l_vs_teacher_compares_with_the_teachers_answer() -> None:
    r = score("rouge_l_vs_teacher", ["the cat sat", "a dog"], [None, None],
              teacher_preds=["the cat sat", "the cat sat"])
    assert r.per_row[0] == pytest.approx(1.0) and r.per_row[1] == 0.0
    assert r.value == pytest.approx(50.0)
    assert score("rouge_l_vs_teacher", ["x"], [None]).value is None  # no teacher
    with pytest.raises(ValueError, match="fidelity"):
        score("teacher_nll", ["x"], [None])


def test_fidelity_scorers_default_on_or_as_listed() -> None:
    assert fidelity.fidelity_scorers(["exact_match"], auto=True) == list(fidelity.FIDELITY_SCORERS)
    assert fidelity.fidelity_scorers(["exact_match", "token_agreement"], auto=False) == ["token_agreement"]
    assert fidelity.fidelity_scorers(["exact_match"], auto=False) == []


class _Tok:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.get(c, 0) for c in text]}


def test_vocab_mismatch_names_the_difference() -> None:
    a = _Tok({"a": 0, "b": 1, "c": 2})
    assert fidelity.vocab_mismatch(_Tok({"a": 0, "b": 1, "c": 2}), a) is None
    assert "(2 tokens) differs from the teacher's (3)" in (fidelity.vocab_mismatch(_Tok({"a": 0, "b": 1}), a) or "")
    assert "2 of 3" in (fidelity.vocab_mismatch(_Tok({"a": 0, "b": 2, "c": 1}), a) or "")


def _model(role: str, path: str | None) -> Any:
    return SimpleNamespace(role=role, path=path, engine=SimpleNamespace(model=path or "gpt-x"))


def _outputs(*roles: str) -> dict[str, list[dict[str, Any] | None]]:
    return {r: [{"response": "ab", "response_token_ids": [0, 1]}, None] for r in roles}


def test_models_with_another_vocabulary_are_skipped_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    toks = {"/t": _Tok({"a": 0, "b": 1}), "/s": _Tok({"a": 0, "b": 1, "z": 2})}
    monkeypatch.setattr("distray.prompts.load_tokenizer", lambda path, trust=False: toks[path])
    calls: list[list[str]] = []
    monkeypatch.setattr(fidelity, "_forced_remote", lambda jobs, *a: calls.append(list(jobs)) or {})
    models = [_model("teacher", "/t"), _model("student", "/s")]
    with caplog.at_level("INFO"):
        res = fidelity.measure(fidelity.FIDELITY_SCORERS, models, _outputs("teacher", "student"),
                               [[{"role": "user", "content": "q"}]] * 2)
    assert calls == [["teacher"]]  # only the teacher shares its own vocabulary
    assert "vocabulary (3 tokens) differs from the teacher's (2)" in res.skipped["student"]
    assert "differs from the teacher's" in caplog.text
    # rouge_l_vs_teacher compares text, so the student still gets it
    assert res.scores["student"]["rouge_l_vs_teacher"].value == 100.0


def test_an_api_teacher_skips_the_forced_scorers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fidelity, "_forced_remote", lambda jobs, *a: pytest.fail("nothing to score"))
    res = fidelity.measure(fidelity.FIDELITY_SCORERS, [_model("teacher", None), _model("student", "/s")],
                           _outputs("teacher", "student"), [[{"role": "user", "content": "q"}]] * 2)
    assert "API model" in res.skipped["student"]
    assert {k: r.value is not None for k, r in res.scores["student"].items()} == {
        "teacher_nll": False, "token_agreement": False, "rouge_l_vs_teacher": True}


def test_without_teacher_answers_everything_is_skipped() -> None:
    res = fidelity.measure(fidelity.FIDELITY_SCORERS, [_model("student", "/s")], _outputs("student"),
                           [[{"role": "user", "content": "q"}]] * 2)
    assert all(r.value is None for r in res.scores["student"].values())
    assert "no teacher" in res.skipped["student"]


def test_teacher_targets_prefer_the_generated_ids() -> None:
    tok = _Tok({"a": 5, "b": 6})
    outs = [{"response": "ab", "response_token_ids": [1, 2, 3]}, {"response": "ab"}, {"response": None}, None]
    assert fidelity.teacher_targets(outs, tok) == [[1, 2, 3], [5, 6], None, None]


# ---- equal-length latency ------------------------------------------------------------------


def test_tpot_is_decode_time_per_token_after_the_first() -> None:
    assert tpot_ms(100.0, 20.0, 9) == pytest.approx(10.0)
    assert tpot_ms(100.0, 20.0, 1) is None
    assert tpot_ms(10.0, 20.0, 5) == 0.0  # noise, not negative time


@pytest.fixture(scope="module")
def stops_at_once(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model whose every greedy answer is one end-of-answer token: its final norm is
    zero, so all logits tie and argmax is token 0, which its generation config calls eos."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("stops") / "m"
    shutil.copytree(tiny_model, out)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(str(out))
    gen = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").exists() else {}
    gen["eos_token_id"] = [0]
    (out / "generation_config.json").write_text(json.dumps(gen))
    return str(out)


def test_equal_length_requests_write_exactly_n_tokens(stops_at_once: str) -> None:
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "abc"}]]
    eff = measure_local(stops_at_once, prompts, backend="hf", max_tokens=8, latency_samples=2,
                        throughput_rows=1, equal_length_tokens=6)
    assert eff.latency_output_tokens == 1.0  # free-running: eos at once
    assert eff.tpot_ms is None  # one token: no per-token time to measure
    assert eff.equal_length_tokens == 6
    assert eff.equal_length_latency_ms is not None and eff.equal_length_latency_ms > eff.ttft_ms
    assert eff.equal_length_tpot_ms is not None and eff.equal_length_tpot_ms > 0
    off = measure_local(stops_at_once, prompts[:1], backend="hf", max_tokens=4, latency_samples=1,
                        equal_length_tokens=0)
    assert off.equal_length_tokens is None and off.equal_length_tpot_ms is None
    assert Path(stops_at_once, "config.json").exists()

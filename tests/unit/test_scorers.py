"""Scorers on known cases and messy outputs; task-type presets' validation and scoring."""

from __future__ import annotations

import pytest

from distray.errors import ConfigError
from distray.evaluate.scorers import SCORERS, score, score_all


def test_exact_match_ignores_case_punctuation_and_spacing() -> None:
    r = score("exact_match", ["March 15, 2024", " march 15 2024.", "March 16, 2024"], ["March 15, 2024"] * 3)
    assert r.per_row == [1.0, 1.0, 0.0]
    assert r.value == pytest.approx(200 / 3)
    assert r.n == 3


def test_numeric_reads_messy_outputs() -> None:
    preds = ["The answer is 42.", "#### 1,234", "I think it is 7", None, "forty-two"]
    refs = ["42", "1234", "8", "5", "42"]
    r = score("numeric", preds, refs)
    assert r.per_row == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert r.value == pytest.approx(40.0)


def test_numeric_reference_may_be_a_worked_solution() -> None:
    r = score("numeric", ["The answer is 72"], ["48/2 = 24 clips in May.\n#### 72"])
    assert r.value == 100.0


def test_rows_without_reference_are_skipped_not_wrong() -> None:
    r = score("exact_match", ["a", "b"], ["a", None])
    assert r.n == 1 and r.value == 100.0 and r.per_row == [1.0, None]
    r = score("exact_match", ["a"], [None])
    assert r.value is None and r.n == 0


def test_choice_with_labels_and_letters() -> None:
    labels = ["entailment", "neutral", "contradiction"]
    preds = ["Answer: (C)", "I'd say neutral.", "Entailment", "no idea"]
    refs = ["contradiction", "neutral", "contradiction", "neutral"]
    r = score("choice", preds, refs, labels=labels)
    assert r.per_row == [1.0, 1.0, 0.0, 0.0]
    r = score("choice", ["The answer is (b)", "A"], ["B", "C"])
    assert r.per_row == [1.0, 0.0]


def test_regex_extracts_a_group_or_checks_format() -> None:
    r = score("regex", ["result=42 done", "result=7", "nothing"], ["42", "8", "1"], regex=r"result=(\d+)")
    assert r.per_row == [1.0, 0.0, 0.0]
    r = score("regex", ['{"a": 1}', "plain"], [None, None], regex=r"^\{.*\}$")
    assert r.value == 50.0 and r.n == 2
    with pytest.raises(ConfigError, match="evaluate.regex"):
        score("regex", ["x"], ["x"])
    with pytest.raises(ConfigError, match="not a valid regex"):
        score("regex", ["x"], ["x"], regex="(")


def test_rouge_l_of_identical_text_is_100_even_without_words() -> None:
    for name in ("rouge_l", "rouge_l_vs_teacher"):
        r = score(name, ["=?!", "abc"], ["=?!", "=?!"], teacher_preds=["=?!", "=?!"])
        assert r.per_row == [1.0, 0.0], name


def test_bleu_and_rouge_l_rank_closer_answers_higher() -> None:
    ref = ["the cat sat on the mat today"]
    exact = score("bleu", ref, ref).value
    close = score("bleu", ["the cat sat on a mat today"], ref).value
    far = score("bleu", ["dogs run in parks"], ref).value
    assert exact == pytest.approx(100.0)
    assert exact > close > far >= 0.0
    rl_close = score("rouge_l", ["the cat sat on a mat"], ref).value
    rl_far = score("rouge_l", ["the dogs run"], ref).value
    assert 0 < rl_far < rl_close < 100


def test_f1_partial_credit() -> None:
    r = score("f1", ["the cat sat", "Paris"], ["a cat sat down", "paris"])
    assert r.per_row[0] == pytest.approx(0.8)
    assert r.value == pytest.approx(90.0)


def test_teacher_agreement_compares_with_the_teacher_not_the_reference() -> None:
    r = score("teacher_agreement", ["cba", "xyz"], ["zzz", "zzz"], teacher_preds=["cba", "xyw"])
    assert r.per_row == [1.0, 0.0]
    assert r.value == 50.0
    assert r.extra["teacher_bleu"] is not None
    r = score("teacher_agreement", ["a"], ["a"])  # the teacher itself: nothing to agree with
    assert r.value is None


def test_unknown_scorer_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="exact_match"):
        score("accuracy", ["a"], ["a"])


def test_score_all_runs_every_scorer_the_config_allows() -> None:
    from distray.config import EvaluateConfig

    allowed = set(EvaluateConfig.model_fields["scorers"].annotation.__args__[0].__args__)
    assert allowed == set(SCORERS)
    from distray.evaluate.fidelity import FORCED_SCORERS
    from distray.evaluate.scorers import DIAGNOSTIC_SCORERS

    text_scorers = [s for s in SCORERS if s != "regex" and s not in FORCED_SCORERS + DIAGNOSTIC_SCORERS]
    out = score_all(text_scorers, ["42"], ["42"], teacher_preds=["42"])
    assert all(v.value == pytest.approx(100.0) for v in out.values())
    # a diagnostic describes the answer, lower is better: a right short answer repeats nothing
    assert all(score(n, ["42"], ["42"]).value == 0.0 for n in DIAGNOSTIC_SCORERS)
    for name in FORCED_SCORERS:  # logits, not text: distray.evaluate.fidelity measures them
        with pytest.raises(ValueError, match="fidelity"):
            score(name, ["42"], ["42"])


# ---- task types: each preset's validation and scoring on hand-written cases -------------------


def _cfg(task_type: str, **extra: object):
    from distray.config import config_from_dict

    return config_from_dict({"task": {"type": task_type}, **extra})


def _reason(cfg, response: str, reference: str | None) -> str | None:
    """The generate stage's verdict on one teacher answer under `cfg`'s filters."""
    from distray.teacher.filters import check_response

    row = {"response": response, "reference": reference, "finish_reason": "stop"}
    rej = check_response(row, cfg.generate.filters, cfg.task.labels)
    return rej.reason if rej else None


def test_math_preset_numeric_verifier_and_scorer() -> None:
    cfg = _cfg("math")
    assert cfg.generate.filters.verifier == "numeric"
    assert _reason(cfg, "Half of 48 is 24, so 48+24 = 72.\nThe answer is: 72", "72") is None
    assert _reason(cfg, "The answer is 70", "72") == "verifier_mismatch"
    assert _reason(cfg, "no number at all", "72") == "verifier_no_number"
    # no reference: any final number passes
    assert _reason(cfg, "The answer is 70", None) is None
    r = score_all(cfg.evaluate.scorers, ["So the total is 72.", "#### 70"], ["72", "72"])
    assert r["numeric"].value == 50.0


def test_nli_preset_label_verifier_and_choice_scorer() -> None:
    cfg = _cfg("nli")
    labels = cfg.task.labels
    assert cfg.generate.filters.verifier == "label"
    assert labels == ["entailment", "neutral", "contradiction"]
    assert _reason(cfg, "Entailment.", "entailment") is None
    assert _reason(cfg, "neutral", "entailment") == "verifier_mismatch"
    assert _reason(cfg, "maybe?", None) == "verifier_label"
    assert _reason(cfg, "contradiction", None) is None
    assert "choice" in cfg.evaluate.scorers
    r = score("choice", ["Label: contradiction", "(A)"], ["contradiction", "neutral"], labels=labels)
    assert r.per_row == [1.0, 0.0]


def test_qa_preset_non_empty_by_default_and_optional_exact_or_f1() -> None:
    cfg = _cfg("qa")
    f = cfg.generate.filters
    assert f.drop_empty and f.verifier == "none"
    assert _reason(cfg, "Paris", "London") is None  # no answer check unless asked
    assert _reason(cfg, "   ", "Paris") == "empty"
    cfg = _cfg("qa", generate={"filters": {"verifier": "f1", "min_f1": 0.5}})
    assert _reason(cfg, "the city of Paris", "Paris") is None  # F1 0.67
    assert _reason(cfg, "London", "Paris") == "verifier_mismatch"
    cfg = _cfg("qa", generate={"filters": {"verifier": "exact"}})
    assert _reason(cfg, "paris.", "Paris") is None
    assert _reason(cfg, "the city of Paris", "Paris") == "verifier_mismatch"
    r = score_all(["exact_match", "f1"], ["Paris", "the city of Paris"], ["Paris", "Paris"])
    assert r["exact_match"].value == 50.0
    assert r["f1"].value == pytest.approx(100 * (1 + 0.5) / 2)


def test_summarization_preset_scores_rouge_l_and_bleu() -> None:
    cfg = _cfg("summarization")
    assert cfg.evaluate.scorers[0] == "rouge_l"
    ref = "the council approved the new park budget on monday"
    r = score_all(cfg.evaluate.scorers, ["the council approved the park budget"], [ref])
    assert 50 < r["rouge_l"].value < 100


def test_conversation_preset_scores_bleu_and_teacher_agreement() -> None:
    cfg = _cfg("conversation")
    assert {"bleu", "teacher_agreement"} <= set(cfg.evaluate.scorers)
    r = score("teacher_agreement", ["Hello! How can I help?"], [None], teacher_preds=["hello how can i help"])
    assert r.value == 100.0


# ---- chain of thought: answers are judged by their "The answer is:" line ---------------------


def test_chain_of_thought_nli_answer_scores_its_final_label() -> None:
    """The reasoning names another label first; the answer line decides."""
    from distray.tasks import NLI_LABELS

    cot = (
        "The premise does not make the hypothesis neutral: it states it outright, "
        "so there is no contradiction either.\nThe answer is: entailment"
    )
    r = score("choice", [cot, cot], ["entailment", "neutral"], labels=NLI_LABELS)
    assert r.per_row == [1.0, 0.0]
    # Letters work the same way after the marker.
    r = score("choice", ["Option A looks tempting, but (A) ignores the date. The answer is: (C)"], ["C"])
    assert r.per_row == [1.0]


def test_chain_of_thought_exact_match_and_f1_compare_only_the_final_answer() -> None:
    cot = "Lyon is large, but the seat of government is Paris.\nThe answer is: Paris."
    assert score("exact_match", [cot], ["Paris"]).per_row == [1.0]
    assert score("exact_match", [cot], ["Lyon"]).per_row == [0.0]
    assert score("f1", [cot], ["paris"]).per_row == [1.0]
    r = score("teacher_agreement", ["The answer is: paris"], [None], teacher_preds=[cot])
    assert r.value == 100.0


def test_without_the_marker_scoring_is_unchanged() -> None:
    assert score("exact_match", ["Paris, I think"], ["Paris"]).per_row == [0.0]
    r = score("choice", ["neutral, not entailment"], ["neutral"], labels=["entailment", "neutral"])
    assert r.per_row == [1.0]
    assert score("f1", ["the cat sat"], ["a cat sat down"]).per_row[0] == pytest.approx(0.8)


# ---- efficiency: the API latency probe -------------------------------------------------------


def _api_probe(responses: list[int], retry_after: str = "0", **kw: object):
    """measure_api against a mock endpoint answering `responses` (status codes) in order."""
    import httpx

    from distray.evaluate.efficiency import measure_api

    codes = iter(responses)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        code = next(codes)
        if code == 0:
            raise httpx.ConnectTimeout("timed out", request=request)
        if code == 200:
            return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})
        return httpx.Response(code, headers={"Retry-After": retry_after}, text="busy")

    eff = measure_api(
        "http://api.test/v1/", "m", [[{"role": "user", "content": "hi"}]],
        latency_samples=2, backoff_base_s=0.001, transport=httpx.MockTransport(handler), **kw,
    )
    return eff, seen


def test_measure_api_retries_busy_and_timed_out_requests() -> None:
    eff, seen = _api_probe([429, 200, 503, 0, 200, 200], max_retries=2)
    assert len(seen) == 6 and seen[0] == "http://api.test/v1/chat/completions"
    assert eff.latency_ms is not None and eff.latency_samples == 2
    assert eff.backend == "openai"


def test_measure_api_waits_at_least_retry_after_up_to_backoff_max(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    _api_probe([429, 200, 200, 200], retry_after="2")
    assert waits == [2.0]
    waits.clear()
    _api_probe([429, 200, 200, 200], retry_after="3600", backoff_max_s=5.0)
    assert waits == [5.0]


def test_measure_api_gives_up_with_a_warning_and_no_latency(caplog: pytest.LogCaptureFixture) -> None:
    eff, seen = _api_probe([200, 500, 500, 500], max_retries=2)
    assert len(seen) == 4  # warm-up, then one request tried 3 times
    assert eff.latency_ms is None and eff.latency_p90_ms is None and eff.latency_samples == 0
    assert "HTTP 500" in eff.method["latency_ms"]
    assert "http://api.test/v1/chat/completions" in caplog.text and "HTTP 500" in caplog.text
    # A client error is not retried, and does not fail the stage either.
    eff, seen = _api_probe([401], max_retries=5)
    assert len(seen) == 1 and eff.latency_ms is None

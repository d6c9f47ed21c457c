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
    out = score_all([s for s in SCORERS if s != "regex"], ["42"], ["42"], teacher_preds=["42"])
    assert all(v.value == pytest.approx(100.0) for v in out.values())


# ---- task types: each preset's validation and scoring on hand-written cases -------------------


def _cfg(task_type: str, **extra: object):
    from distray.config import config_from_dict

    return config_from_dict({"task": {"type": task_type}, **extra})


def test_math_preset_numeric_verifier_and_scorer() -> None:
    from distray.answers import verify_answer

    cfg = _cfg("math")
    f = cfg.generate.filters
    assert f.verifier == "numeric"
    assert verify_answer("Half of 48 is 24, so 48+24 = 72.\nThe answer is: 72", "72", f) is None
    assert verify_answer("The answer is 70", "72", f) == "verifier_mismatch"
    assert verify_answer("no number at all", "72", f) == "verifier_no_number"
    # no reference: any final number passes
    assert verify_answer("The answer is 70", None, f) is None
    r = score_all(cfg.evaluate.scorers, ["So the total is 72.", "#### 70"], ["72", "72"])
    assert r["numeric"].value == 50.0


def test_nli_preset_label_verifier_and_choice_scorer() -> None:
    from distray.answers import verify_answer

    cfg = _cfg("nli")
    f, labels = cfg.generate.filters, cfg.task.labels
    assert labels == ["entailment", "neutral", "contradiction"]
    assert verify_answer("Entailment.", "entailment", f, labels=labels) is None
    assert verify_answer("neutral", "entailment", f, labels=labels) == "verifier_mismatch"
    assert verify_answer("maybe?", None, f, labels=labels) == "verifier_label"
    assert verify_answer("contradiction", None, f, labels=labels) is None
    assert "choice" in cfg.evaluate.scorers
    r = score("choice", ["Label: contradiction", "(A)"], ["contradiction", "neutral"], labels=labels)
    assert r.per_row == [1.0, 0.0]


def test_qa_preset_non_empty_by_default_and_optional_exact_or_f1() -> None:
    from distray.answers import verify_answer

    cfg = _cfg("qa")
    f = cfg.generate.filters
    assert f.drop_empty and f.verifier == "none"
    assert verify_answer("Paris", "London", f) is None  # no answer check unless asked
    assert verify_answer("   ", "Paris", f) == "empty"
    cfg = _cfg("qa", generate={"filters": {"verifier": "f1", "min_f1": 0.5}})
    f = cfg.generate.filters
    assert verify_answer("the city of Paris", "Paris", f) is None  # F1 0.67
    assert verify_answer("London", "Paris", f) == "verifier_mismatch"
    cfg = _cfg("qa", generate={"filters": {"verifier": "exact"}})
    assert verify_answer("paris.", "Paris", cfg.generate.filters) is None
    assert verify_answer("the city of Paris", "Paris", cfg.generate.filters) == "verifier_mismatch"
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


@pytest.mark.parametrize(
    ("task_type", "response", "reference"),
    [
        ("math", "The answer is: 72", "72"),
        ("math", "The answer is 70", "72"),
        ("math", "no number", "72"),
        ("nli", "Neutral.", "neutral"),
        ("nli", "entailment", "neutral"),
        ("nli", "who knows", None),
        ("qa", "", "Paris"),
        ("qa", "London", "Paris"),
    ],
)
def test_generate_filters_apply_the_presets_validation(
    task_type: str, response: str, reference: str | None
) -> None:
    """The generate stage's filter gives the same verdict as `verify_answer` for each preset."""
    from distray.answers import verify_answer
    from distray.teacher.filters import check_response

    cfg = _cfg(task_type)
    row = {"response": response, "reference": reference, "finish_reason": "stop"}
    got = check_response(row, cfg.generate.filters, cfg.task.labels)
    want = verify_answer(response, reference, cfg.generate.filters, labels=cfg.task.labels)
    assert (got.reason if got else None) == want

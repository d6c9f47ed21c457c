"""Teacher-output validation rules, one by one (no Ray)."""

from __future__ import annotations

import pytest

from distray.config import FilterConfig
from distray.teacher.filters import DuplicateTracker, check_response, response_digest, verify


def row(response: str | None, **kw: object) -> dict[str, object]:
    return {"response": response, "finish_reason": "stop", "completion_tokens": 3, **kw}


def test_clean_answer_passes_defaults() -> None:
    assert check_response(row("The answer is 4."), FilterConfig()) is None


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_answers_rejected(text: str) -> None:
    rej = check_response(row(text), FilterConfig())
    assert rej is not None and rej.reason == "empty"
    assert check_response(row(text), FilterConfig(drop_empty=False)) is None


def test_missing_answer_is_empty() -> None:
    assert check_response(row(None), FilterConfig(drop_empty=False)).reason == "empty"


def test_engine_error_becomes_its_code() -> None:
    rej = check_response(row(None, error="prompt_too_long: 9000 tokens > 4096"), FilterConfig())
    assert rej.reason == "prompt_too_long" and "9000" in rej.detail
    rej = check_response(row(None, error="request_failed: HTTP 500 after 7 attempts"), FilterConfig())
    assert rej.reason == "request_failed"


def test_truncated_dropped_or_kept() -> None:
    cut = row("a long answer that", finish_reason="length", completion_tokens=256)
    rej = check_response(cut, FilterConfig())
    assert rej.reason == "truncated" and "256" in rej.detail and "max_tokens" in rej.detail
    assert check_response(cut, FilterConfig(truncated="keep")) is None


def test_length_bounds() -> None:
    assert check_response(row("abc"), FilterConfig(min_chars=5)).reason == "too_short"
    assert check_response(row("abcdefgh"), FilterConfig(max_chars=5)).reason == "too_long"
    assert check_response(row("abcde"), FilterConfig(min_chars=5, max_chars=5)) is None


def test_regex_must_match() -> None:
    f = FilterConfig(regex=r"^The answer is: \d+$")
    assert check_response(row("The answer is: 12"), f) is None
    rej = check_response(row("twelve"), f)
    assert rej.reason == "regex" and "twelve" in rej.detail


def test_json_must_parse() -> None:
    f = FilterConfig(require_json=True)
    assert check_response(row('{"a": 1}'), f) is None
    rej = check_response(row("{a: 1}"), f)
    assert rej.reason == "not_json" and "char" in rej.detail


def test_numeric_verifier() -> None:
    f = FilterConfig(verifier="numeric")
    assert check_response(row("so 3+4 = 7. The answer is: 7", reference="#### 7"), f) is None
    assert check_response(row("The answer is 1,234.0", reference="1234"), f) is None
    rej = check_response(row("The answer is 8", reference="7"), f)
    assert rej.reason == "verifier_mismatch" and "8" in rej.detail and "7" in rej.detail
    assert check_response(row("no idea", reference="7"), f).reason == "verifier_no_number"
    # Without a reference there is nothing to check against.
    assert check_response(row("The answer is 8"), f) is None


def test_label_verifier() -> None:
    labels = ["entailment", "neutral", "contradiction"]
    f = FilterConfig(verifier="label")
    assert check_response(row("Neutral."), f, labels) is None
    assert check_response(row("Neutral.", reference="neutral"), f, labels) is None
    assert check_response(row("maybe?"), f, labels).reason == "verifier_label"
    rej = check_response(row("contradiction", reference="entailment"), f, labels)
    assert rej.reason == "verifier_mismatch"


def test_exact_and_contains_verifiers() -> None:
    assert verify("The Eiffel Tower!", "eiffel tower", "exact") is None
    assert verify("Paris, France", "Paris", "exact").reason == "verifier_mismatch"
    assert verify("It is Paris, France", "paris", "contains") is None
    assert verify("London", "paris", "contains").reason == "verifier_mismatch"


def test_contains_verifier_needs_whole_words() -> None:
    assert verify("The answer is 4.", "4", "contains") is None
    assert verify("14", "4", "contains").reason == "verifier_mismatch"
    assert verify("I know", "no", "contains").reason == "verifier_mismatch"
    f = FilterConfig(verifier="contains")
    assert check_response(row("14", reference="4"), f).reason == "verifier_mismatch"


def test_verifiers_judge_a_chain_of_thought_answer_by_its_last_line() -> None:
    labels = ["entailment", "neutral", "contradiction"]
    cot = "The premise rules out neutral and contradiction.\nThe answer is: entailment"
    f = FilterConfig(verifier="label")
    assert check_response(row(cot, reference="entailment"), f, labels) is None
    rej = check_response(row(cot, reference="neutral"), f, labels)
    assert rej.reason == "verifier_mismatch" and "'entailment'" in rej.detail
    qa = "Lyon is big, but the capital is Paris.\nThe answer is: Paris."
    assert verify(qa, "paris", "exact") is None
    assert verify(qa, "lyon", "contains").reason == "verifier_mismatch"
    assert verify(qa, "Paris", "f1", min_f1=1.0) is None
    # No marker: the whole answer, as before.
    assert verify("Paris, I think", "paris", "exact").reason == "verifier_mismatch"
    assert check_response(row("neutral, not entailment"), f, labels) is None


def test_rules_run_in_order_first_failure_wins() -> None:
    f = FilterConfig(min_chars=100, regex="x", require_json=True)
    assert check_response(row("  "), f).reason == "empty"
    assert check_response(row("abc"), f).reason == "too_short"


def test_duplicate_tracker_across_inputs_only() -> None:
    t = DuplicateTracker()
    d = response_digest("same answer")
    assert response_digest("  same answer\n") == d
    assert t.check([(d, "q1"), (d, "q1"), (d, "q2")]) == [None, None, "q1"]
    t2 = DuplicateTracker()
    t2.seed([(d, "old")])
    assert t2.check([(d, "q9")]) == ["old"]
    assert len(t2) == 1


def test_f1_verifier_uses_min_f1():
    assert verify("the tower in paris", "the eiffel tower in paris", "f1") is None
    assert verify("london bridge", "the eiffel tower in paris", "f1").reason == "verifier_mismatch"
    assert verify("the tower", "the eiffel tower in paris", "f1", min_f1=0.9) is not None

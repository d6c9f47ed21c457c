"""Answer extraction on messy model outputs (what the verifier and the scorers both read)."""

from __future__ import annotations

import pytest

from distray.answers import (
    contains_answer,
    extract_choice,
    extract_final_number,
    final_answer,
    normalize_answer,
    normalize_number,
    numbers_equal,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("#### 1,234", "1234"),
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("Step 1: 2+2=4. Step 2: 4*3=12", "12"),
        ("Answer: -7", "-7"),
        ("It costs $1,200.00 in total", "1200"),
        ("The answer is 5, not 6", "5"),
        ("\\boxed{17}", "17"),
        ("I got 12 apples, then 15. The answer is: 27", "27"),
        ("x = 3.50 dollars", "3.5"),
        ("about 0.5", "0.5"),
        ("−3 degrees", "-3"),
        ("50%", "50"),
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_number_reads_what_a_person_would(text: str | None, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_normalize_number_canonical_forms() -> None:
    assert normalize_number("1,234.50") == "1234.5"
    assert normalize_number("-3.0") == "-3"
    assert normalize_number("+007") == "7"
    assert normalize_number(".5") == "0.5"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("twelve") is None


def test_numbers_equal_tolerates_float_forms_only() -> None:
    assert numbers_equal("3", "3.0")
    assert numbers_equal("0.1", "0.10000000001")
    assert not numbers_equal("3", "4")
    assert not numbers_equal(None, "4")


def test_normalize_answer_squad_style() -> None:
    assert normalize_answer("  The  Eiffel Tower! ") == "eiffel tower"
    assert normalize_answer("March 15, 2024") == "march 15 2024"
    assert normalize_answer(None) == ""


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("The answer is (b).", None, "B"),
        ("Answer: C", None, "C"),
        ("**D**", None, "D"),
        ("A", None, "A"),
        ("B. because the premise says so", None, "B"),
        ("I am not sure", None, None),
        ("I think it's Neutral.", ["entailment", "neutral", "contradiction"], "neutral"),
        ("Contradiction", ["entailment", "neutral", "contradiction"], "contradiction"),
        ("B", ["positive", "negative"], "negative"),
        ("(E)", ["positive", "negative"], None),
        ("it is not_entailment", ["entailment", "not_entailment"], "not_entailment"),
        ("not positive, so negative", ["positive", "negative"], "negative"),
        ("", ["positive", "negative"], None),
    ],
)
def test_extract_choice(text: str, labels: list[str] | None, expected: str | None) -> None:
    assert extract_choice(text, labels) == expected


def test_token_f1_partial_and_edge_cases() -> None:
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("x", "") == 0.0
    assert token_f1("dog", "cat") == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The CoT line wins over labels named in the reasoning; the last marker counts.
        ("It is not neutral, and no contradiction.\nThe answer is: entailment", "entailment"),
        ("First I thought the answer is neutral. The answer is: Entailment.", "Entailment."),
        ("the ANSWER IS contradiction", "contradiction"),
        ("The answer is:\n\n  Paris\nBecause it is the capital.", "Paris"),
        ("The answer is:", ""),
        # No marker: the text, unchanged.
        ("I'd say neutral.", "I'd say neutral."),
        ("Answer: C", "Answer: C"),
        ("", ""),
    ],
)
def test_final_answer_cuts_to_the_last_answer_line(text: str, expected: str) -> None:
    assert final_answer(text) == expected


def test_contains_answer_matches_whole_words_only() -> None:
    assert contains_answer("The answer is 4.", "4")
    assert contains_answer("It is Paris, France", "paris")
    assert not contains_answer("14", "4")
    assert not contains_answer("I know", "no")
    assert not contains_answer("anything", "")

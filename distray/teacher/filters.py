"""Teacher-output validation: each rule from `generate.filters`, applied to one answer at a time.

    python -c "from distray.teacher.filters import check_response; help(check_response)"

Pure functions, no Ray: the generate stage calls `check_response` on every row a teacher
answered, and writes the row to `rejects/` with the returned reason when it fails. Rules run in
a fixed order and the first failure is the reason:

    engine error → empty → invalid UTF-8 → truncated → min/max chars → regex → JSON → verifier

Duplicate answers (`dedupe_responses`) need state across rows and are checked by the pipeline
with `DuplicateTracker` after these rules, so only answers that passed everything else count.
Answer extraction (final number, choice label, normalisation) comes from `distray.answers`, the
same helpers the evaluate scorers use, so a verifier and a scorer agree on what a model said.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from distray.answers import (
    contains_answer,
    extract_choice,
    extract_final_number,
    final_answer,
    normalize_answer,
    numbers_equal,
    token_f1,
)
from distray.config import FilterConfig

__all__ = ["Rejection", "check_response", "verify", "response_digest", "DuplicateTracker"]


@dataclass(frozen=True)
class Rejection:
    """Why one answer was rejected: a short code (stats key) and a detail naming the value."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def verify(
    response: str,
    reference: str | None,
    verifier: str,
    labels: Sequence[str] | None = None,
    min_f1: float = 0.5,
) -> Rejection | None:
    """Check an answer against its reference with one verifier.

    Args:
        response: the teacher's answer.
        reference: the ground truth, or None.
        verifier: none, numeric (final numbers equal), exact (normalised text equal), label
            (one of `labels`, and equal to the reference when there is one), contains
            (normalised reference appears in the answer as whole words: "4" is not in "14"),
            f1 (token F1 ≥ `min_f1`).
        labels: allowed answers for `label`.
        min_f1: the least token F1 against the reference for `f1`.

    Returns:
        None when the answer passes (rows without a reference pass every verifier except
        `label`, which still requires one of the labels), else the rejection.

    A chain-of-thought answer ending "The answer is: X" is judged on X alone
    (`distray.answers.final_answer`) by every verifier; `numeric` reads the final number itself.
    """
    if verifier == "none":
        return None
    # Reasoning before the answer line may name other labels or words; judge the answer only.
    answer = final_answer(response)
    ref = None if reference is None else final_answer(reference)
    if verifier == "label":
        got = extract_choice(answer, list(labels or []))
        if got is None:
            return Rejection(
                "verifier_label",
                f"answer names none of the labels {list(labels or [])}: {_short(answer)!r}",
            )
        if ref is not None:
            want = extract_choice(ref, list(labels or [])) or ref
            if normalize_answer(got) != normalize_answer(want):
                return Rejection("verifier_mismatch", f"label {got!r} ≠ reference {want!r}")
        return None
    if ref is None:
        return None
    if verifier == "numeric":
        got_n = extract_final_number(response)
        want_n = extract_final_number(reference)
        if got_n is None:
            return Rejection("verifier_no_number", f"no number in answer: {_short(response)!r}")
        if not numbers_equal(got_n, want_n):
            return Rejection("verifier_mismatch", f"final number {got_n} ≠ reference {want_n}")
        return None
    if verifier == "exact":
        if normalize_answer(answer) != normalize_answer(ref):
            return Rejection(
                "verifier_mismatch", f"{_short(answer)!r} ≠ reference {_short(ref)!r}"
            )
        return None
    if verifier == "contains":
        if not contains_answer(answer, ref):
            return Rejection(
                "verifier_mismatch", f"answer does not contain reference {_short(ref)!r}"
            )
        return None
    if verifier == "f1":
        f1 = token_f1(answer, ref)
        if f1 < min_f1:
            return Rejection("verifier_mismatch", f"token F1 {f1:.2f} < {min_f1} against the reference")
        return None
    raise ValueError(f"unknown verifier {verifier!r}; use none, numeric, exact, label, contains, f1")


def check_response(
    row: dict[str, Any], filters: FilterConfig, labels: Sequence[str] | None = None
) -> Rejection | None:
    """Apply every per-row rule of `generate.filters` to one teacher answer.

    Args:
        row: a teacher-data row: `response`, `finish_reason`, `reference`, and `error` (set
            when the engine or the request failed).
        filters: the rules.
        labels: `task.labels`, for the `label` verifier.

    Returns:
        None when the answer is kept, else the first rule it broke.

    Examples:
        >>> from distray.config import FilterConfig
        >>> check_response({"response": "  "}, FilterConfig()).reason
        'empty'
        >>> check_response({"response": "4", "finish_reason": "stop"}, FilterConfig()) is None
        True
    """
    error = row.get("error")
    if error:
        code, _, detail = str(error).partition(": ")
        return Rejection(code or "engine_error", detail)
    response = row.get("response")
    if response is None:
        return Rejection("empty", "the teacher returned no answer")
    try:
        response.encode("utf-8")
    except UnicodeEncodeError as e:
        # An API may send a lone surrogate escape ("\ud800"); no Parquet writer takes it.
        return Rejection(
            "invalid_utf8", f"the answer holds a lone surrogate (U+{ord(response[e.start]):04X}) at char {e.start}"
        )
    if filters.drop_empty and not response.strip():
        return Rejection("empty", "the answer is empty or whitespace only")
    if filters.truncated == "drop" and row.get("finish_reason") == "length":
        n = row.get("completion_tokens")
        return Rejection(
            "truncated",
            f"cut at max_tokens ({n} tokens); raise generate.sampling.max_tokens or set "
            "generate.filters.truncated: keep",
        )
    n_chars = len(response)
    if n_chars < filters.min_chars:
        return Rejection(
            "too_short", f"{n_chars} chars < generate.filters.min_chars ({filters.min_chars})"
        )
    if filters.max_chars is not None and n_chars > filters.max_chars:
        return Rejection(
            "too_long", f"{n_chars} chars > generate.filters.max_chars ({filters.max_chars})"
        )
    if filters.regex is not None and not _compiled(filters.regex).search(response):
        return Rejection("regex", f"answer does not match {filters.regex!r}: {_short(response)!r}")
    if filters.require_json:
        try:
            json.loads(response)
        except json.JSONDecodeError as e:
            return Rejection("not_json", f"answer is not JSON ({e.msg} at char {e.pos})")
        except RecursionError:
            return Rejection("not_json", "answer nests too deeply to parse as JSON")
        except ValueError:
            # Python's int-digits limit: valid JSON no reader downstream could load either.
            return Rejection("not_json", _long_int_detail(response))
    return verify(response, row.get("reference"), filters.verifier, labels, filters.min_f1)


def _long_int_detail(response: str) -> str:
    longest = max((len(m) for m in re.findall(r"\d+", response)), default=0)
    return (
        f"answer holds an integer of {longest} digits, more than Python reads "
        f"({sys.get_int_max_str_digits()})"
    )


def response_digest(response: str) -> bytes:
    """A 16-byte digest of an answer, whitespace-trimmed, for duplicate detection."""
    return hashlib.blake2b(response.strip().encode("utf-8", "surrogatepass"), digest_size=16).digest()


class DuplicateTracker:
    """Remembers which input first gave each answer; later identical answers to other inputs
    are duplicates.

    Holds 16-byte digests, not texts. The generate stage keeps one tracker in a Ray actor so
    all write tasks share it, seeded with the answers already in the data folder on a resume.
    """

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._first)

    def seed(self, pairs: Sequence[tuple[bytes, str]]) -> None:
        """Record answers already accepted: `(digest, input_id)` pairs."""
        for digest, input_id in pairs:
            self._first.setdefault(digest, input_id)

    def check(self, pairs: Sequence[tuple[bytes, str]]) -> list[str | None]:
        """For each `(digest, input_id)`: None if new (and now recorded), else the input id
        that gave the same answer first. An identical answer to the same input (another
        sample) is not a duplicate."""
        out: list[str | None] = []
        for digest, input_id in pairs:
            first = self._first.setdefault(digest, input_id)
            out.append(None if first == input_id else first)
        return out

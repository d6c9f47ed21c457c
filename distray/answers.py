"""Answer extraction and normalisation shared by the output verifier (generate) and the scorers.

    python -c "from distray.answers import extract_final_number as f; print(f('The answer is 42.'))"

Model outputs are messy: "The answer is 42.", "#### 1,234", "**B**", "Answer: (c) neutral".
These helpers pull the answer a person would read out of such text, so that a verifier and a
scorer agree on what a model said.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = [
    "extract_final_number",
    "normalize_number",
    "normalize_answer",
    "extract_choice",
    "token_f1",
    "numbers_equal",
    "verify_answer",
]

# A number as people write it: optional sign, thousands separators, decimals, a trailing %.
_NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])({_NUMBER})(?![\d])")
# Markers after which the final answer follows, strongest first.
_ANSWER_MARKERS = (
    re.compile(r"####\s*"),
    re.compile(r"\\boxed\{\s*"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*", re.IGNORECASE),
)


def normalize_number(text: str) -> str | None:
    """Canonical form of one written number: `"1,234.50"` → `"1234.5"`, `"-3.0"` → `"-3"`.

    Returns None when `text` is not a number.
    """
    s = text.strip().replace("−", "-").replace(",", "").rstrip("%").strip()
    if s.startswith("+"):
        s = s[1:]
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
        if s.startswith("-."):
            s = "-0" + s[1:]
        elif s.startswith("."):
            s = "0" + s
    neg = s.startswith("-")
    digits = s[1:] if neg else s
    intpart, _, frac = digits.partition(".")
    intpart = intpart.lstrip("0") or "0"
    out = intpart + (f".{frac}" if frac else "")
    if out == "0":
        return "0"
    return f"-{out}" if neg else out


def extract_final_number(text: str | None) -> str | None:
    """The final numeric answer of a GSM8K-style output, normalised.

    Looks after an answer marker first (`#### 42`, `\\boxed{42}`, `The answer is 42`), else takes
    the last number in the text.

    Examples:
        >>> extract_final_number("The answer is 42.")
        '42'
        >>> extract_final_number("so 3 + 4 = 7\\n#### 1,234")
        '1234'
        >>> extract_final_number("no digits here") is None
        True

    Returns:
        The number as a canonical string (no separators, no trailing zeros), or None.
    """
    if not text:
        return None
    for marker in _ANSWER_MARKERS:
        hits = list(marker.finditer(text))
        if not hits:
            continue
        # The last marker wins: chain-of-thought text may say "answer" earlier.
        tail = text[hits[-1].end():]
        m = _NUMBER_RE.search(tail.replace("$", ""))
        if m and m.start() <= 3:
            return normalize_number(m.group(1))
    nums = _NUMBER_RE.findall(text.replace("$", ""))
    return normalize_number(nums[-1]) if nums else None


def numbers_equal(pred: str | None, ref: str | None, rel_tol: float = 1e-6) -> bool:
    """True when two extracted numbers are equal (exactly, or within `rel_tol` as floats)."""
    if pred is None or ref is None:
        return False
    if pred == ref:
        return True
    try:
        a, b = float(pred), float(ref)
    except ValueError:
        return False
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "…", "–", "—"}


def normalize_answer(text: str | None) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces.

    Examples:
        >>> normalize_answer("  The  Eiffel Tower! ")
        'eiffel tower'
    """
    if not text:
        return ""
    s = unicodedata.normalize("NFKC", text).lower()
    s = "".join(" " if ch in _PUNCT else ch for ch in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


_LETTER_PATTERNS = (
    # "Answer: B", "answer is (c)", "Option D"
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?\**([A-Ea-e])\b", re.IGNORECASE),
    # "(B)", "[C]", "**D**"
    re.compile(r"[\(\[]\s*([A-Ea-e])\s*[\)\]]"),
    re.compile(r"\*\*\s*([A-E])\s*\*\*"),
    # "B." / "B)" / "B:" at the start of the output or a line
    re.compile(r"(?:^|\n)\s*([A-E])\s*[\.\):](?:\s|$)"),
    # a lone capital letter as the whole answer
    re.compile(r"^\s*([A-E])\s*$"),
)


def extract_choice(text: str | None, labels: Sequence[str] | None = None) -> str | None:
    """The choice an output names: one of `labels` (returned as written in `labels`), or a
    letter A–E.

    With labels, a label named in the text wins (the first one that appears, whole words,
    case-insensitive); a letter is mapped to the label at that position (A → labels[0]).
    Without labels, the letter is returned upper-case.

    Examples:
        >>> extract_choice("The answer is (b).")
        'B'
        >>> extract_choice("I think it's Neutral.", ["entailment", "neutral", "contradiction"])
        'neutral'
        >>> extract_choice("B", ["positive", "negative"])
        'negative'
    """
    if not text:
        return None
    if labels:
        norm_text = f" {normalize_answer(text)} "
        found: list[tuple[int, int, str]] = []
        for label in labels:
            nl = normalize_answer(label)
            if not nl:
                continue
            pos = norm_text.find(f" {nl} ")
            if pos >= 0:
                # Earliest mention wins; among equal starts, the longer label ("not entailment").
                found.append((pos, -len(nl), label))
        if found:
            # A negated mention ("not positive") names the label after the negation; prefer a
            # label whose mention is not preceded by "not".
            found.sort()
            for pos, _, label in found:
                before = norm_text[:pos].split()[-1:] if pos else []
                if before != ["not"]:
                    return label
            return found[0][2]
    letter = None
    for pat in _LETTER_PATTERNS:
        m = pat.search(text.strip())
        if m:
            letter = m.group(1).upper()
            break
    if letter is None:
        return None
    if labels:
        idx = ord(letter) - ord("A")
        return labels[idx] if idx < len(labels) else None
    return letter


def token_f1(pred: str | None, ref: str | None) -> float:
    """SQuAD token F1 between two answers after `normalize_answer` (1.0 when both are empty).

    Examples:
        >>> round(token_f1("the cat sat", "a cat sat down"), 3)
        0.8
    """
    p = normalize_answer(pred).split()
    r = normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(p)
    recall = same / len(r)
    return 2 * precision * recall / (precision + recall)


def verify_answer(
    response: str | None,
    reference: str | None,
    filters: Any,
    *,
    labels: Sequence[str] | None = None,
) -> str | None:
    """Check a teacher answer the way `generate.filters` asks; the reject reason, or None.

    Only the answer checks live here (emptiness and `verifier`); length, regex, JSON and
    truncation are the generate stage's own filters (`distray.teacher.filters`). Reason codes
    match that module's.

    Args:
        response: the teacher's answer.
        reference: the row's ground truth, or None.
        filters: a `FilterConfig` (reads drop_empty, verifier, min_f1), or a verifier name.
        labels: `task.labels`, for the `label` verifier.

    Returns:
        None when the answer passes; else `empty`, `verifier_label` (names none of the labels),
        `verifier_no_number` (numeric: no final number) or `verifier_mismatch` (differs from
        the reference).

    Verifiers (rows without a reference pass every verifier except `label`, which still needs
    one of the labels):
        numeric: the final number must exist and equal the reference's.
        exact: normalize_answer(response) == normalize_answer(reference).
        label: the answer names one of `labels`, the reference's label when there is one.
        contains: the normalised reference appears in the normalised response.
        f1: token F1 against the reference ≥ filters.min_f1 (0.5 when given a name).
    """
    if isinstance(filters, str):
        verifier, drop_empty, min_f1 = filters, True, 0.5
    else:
        verifier = getattr(filters, "verifier", "none")
        drop_empty = getattr(filters, "drop_empty", True)
        raw_f1 = getattr(filters, "min_f1", None)
        min_f1 = 0.5 if raw_f1 is None else float(raw_f1)
    text = response or ""
    if drop_empty and not text.strip():
        return "empty"
    if verifier in ("none", None):
        return None
    if verifier == "label":
        choice = extract_choice(text, labels)
        if choice is None or (labels and choice not in labels):
            return "verifier_label"
        if reference is None:
            return None
        ref_choice = extract_choice(reference, labels) or reference
        return None if normalize_answer(choice) == normalize_answer(ref_choice) else "verifier_mismatch"
    if reference is None:
        return None
    if verifier == "numeric":
        got = extract_final_number(text)
        if got is None:
            return "verifier_no_number"
        ref = normalize_number(reference) or extract_final_number(reference)
        return None if numbers_equal(got, ref) else "verifier_mismatch"
    if verifier == "exact":
        same = normalize_answer(text) == normalize_answer(reference)
        return None if same else "verifier_mismatch"
    if verifier == "contains":
        ref_n = normalize_answer(reference)
        found = bool(ref_n) and f" {ref_n} " in f" {normalize_answer(text)} "
        return None if found else "verifier_mismatch"
    if verifier == "f1":
        return None if token_f1(text, reference) >= min_f1 else "verifier_mismatch"
    raise ValueError(f"unknown verifier {verifier!r}; use none, numeric, exact, label, contains, f1")

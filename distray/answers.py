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
from decimal import MAX_EMAX, MIN_EMIN, Decimal, InvalidOperation, localcontext

__all__ = [
    "final_answer",
    "extract_final_number",
    "normalize_number",
    "normalize_answer",
    "extract_choice",
    "token_f1",
    "numbers_equal",
    "contains_answer",
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
# The last line `distray.tasks.COT_INSTRUCTION` (and the math preset) ask for: "The answer is: X".
# Stricter than the numeric markers above: a bare "answer" is common inside free-text reasoning.
_FINAL_ANSWER_RE = re.compile(r"\bthe answer is\b\s*:?", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The answer after the last "The answer is:" of an output; the whole text when the output
    has no such marker.

    Chain-of-thought outputs reason first and end with the answer line the CoT instruction asks
    for; the reasoning often names other labels or numbers, so scorers and verifiers compare
    only the answer. The marker is case-insensitive and its colon optional; the answer is the
    rest of the marker's line (the next non-empty line when the marker ends its line).

    Examples:
        >>> final_answer("Not neutral: it follows.\\nThe answer is: entailment")
        'entailment'
        >>> final_answer("Paris")
        'Paris'
    """
    hits = list(_FINAL_ANSWER_RE.finditer(text))
    if not hits:
        return text
    lines = [ln.strip() for ln in text[hits[-1].end():].splitlines()]
    return next((ln for ln in lines if ln), "")


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

    Looks after the last answer marker first (`#### 42`, `\\boxed{42}`, `The answer is 42`, a
    looser set than `final_answer`'s), else takes the last number in the text.

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
    # Decimal, not float: "1" followed by 400 zeros overflows a float to inf, and inf == inf.
    try:
        a, b = Decimal(pred.strip()), Decimal(ref.strip())
    except InvalidOperation:
        return False
    if not (a.is_finite() and b.is_finite()):
        return False
    with localcontext() as ctx:
        ctx.prec = 50  # the tolerance test needs a few significant digits, not all of them
        ctx.Emax, ctx.Emin = MAX_EMAX, MIN_EMIN  # "1e9999999" is a number, not an overflow
        return abs(a - b) <= Decimal(rel_tol) * max(Decimal(1), abs(a), abs(b))


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


def contains_answer(response: str | None, reference: str | None) -> bool:
    """True when the normalised reference appears in the normalised response as whole words.

    Examples:
        >>> contains_answer("The answer is 4.", "4"), contains_answer("14", "4")
        (True, False)
        >>> contains_answer("I know", "no")
        False
    """
    ref_n = normalize_answer(reference)
    return bool(ref_n) and f" {ref_n} " in f" {normalize_answer(response)} "

"""Task scorers: one number per model and scorer, plus per-row scores where a row has one.

    python -c "from distray.evaluate.scorers import score; print(score('numeric', ['The answer is 42.'], ['42']))"

Every scorer returns a percentage (0-100): accuracy for exact_match/numeric/choice/regex/f1,
and BLEU / ROUGE-L F-measure × 100 as papers quote them. Rows without a reference are skipped
by the reference-based scorers (`n` says how many were scored); a scorer with nothing to score
returns None rather than 0.

Chain-of-thought answers end with "The answer is: X" (`distray.tasks.COT_INSTRUCTION`); the
answer-level scorers (exact_match, choice, f1, teacher_agreement's match) compare X, as cut by
`final_answer`, on both sides, so labels and words in the reasoning do not count. Text without
that marker is compared whole; bleu and rouge_l always compare whole texts.

| scorer | compares | per row |
|---|---|---|
| exact_match | normalize_answer(final_answer(pred)) == same of ref | 0/1 |
| numeric | final number of pred == final number of ref | 0/1 |
| choice | extract_choice(final_answer(pred), labels) == choice of ref | 0/1 |
| regex | group 1 of the pattern == ref (pattern with a group), else "pred matches" | 0/1 |
| bleu | sacrebleu corpus BLEU (effective order) of preds against refs | sentence BLEU |
| rouge_l | rouge-score ROUGE-L F-measure, mean | F-measure |
| f1 | SQuAD token F1 of the final answers, mean | F1 |
| teacher_agreement | exact_match against the teacher's answer (and BLEU vs its text) | 0/1 |
| rouge_l_vs_teacher | rouge_l against the teacher's answer instead of the reference | F-measure |
| repetition | 1 − distinct 4-grams / 4-grams of the answer's words, mean over answers; extra `max_tokens_hit_pct`: answers cut at the cap (finish_reason "length") | share |

`repetition` flags degenerate output ("the citation, and the citation, and the citation, …"):
it needs no reference, lower is better, and evaluate runs it on every model whatever
`evaluate.scorers` says. An answer with fewer than 4 words repeats nothing (0).

`teacher_nll` and `token_agreement` need each model's logits, not its text: they are measured by
`distray.evaluate.fidelity` (with rouge_l_vs_teacher, the white-box fidelity scorers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from distray.answers import (
    extract_choice,
    extract_final_number,
    final_answer,
    normalize_answer,
    normalize_number,
    numbers_equal,
    token_f1,
)
from distray.config import ScorerName
from distray.errors import ConfigError

__all__ = ["ScoreResult", "SCORERS", "DIAGNOSTIC_SCORERS", "REPETITION_N", "repeated_ngram_share",
           "score", "score_all"]

#: The scorer names, as the config spells them (`evaluate.scorers`).
SCORERS: tuple[str, ...] = get_args(ScorerName)
#: Scorers that describe the output rather than grade it (lower is better, no retention).
DIAGNOSTIC_SCORERS: tuple[str, ...] = ("repetition",)
#: n of the repetition scorer: 4-grams of words, the n degeneration studies quote (rep-4).
REPETITION_N = 4
_WORD = re.compile(r"\w+")


@dataclass
class ScoreResult:
    """One scorer's result for one model.

    Attributes:
        value: the score in % (0-100), or None when no row could be scored.
        n: rows scored.
        per_row: one score per input row (None where the row was not scored, or the scorer is
            corpus-level only).
        extra: further figures of the scorer (teacher_agreement adds `teacher_bleu`).
    """

    value: float | None
    n: int
    per_row: list[float | None] = field(default_factory=list)
    extra: dict[str, float | None] = field(default_factory=dict)


def _mean_pct(per_row: list[float | None]) -> tuple[float | None, int]:
    vals = [v for v in per_row if v is not None]
    if not vals:
        return None, 0
    return 100.0 * sum(vals) / len(vals), len(vals)


def _pairwise(
    preds: Sequence[str | None], refs: Sequence[str | None], fn: Any
) -> ScoreResult:
    per_row: list[float | None] = [
        None if r is None else float(fn(p or "", r)) for p, r in zip(preds, refs, strict=True)
    ]
    value, n = _mean_pct(per_row)
    return ScoreResult(value, n, per_row)


def _exact(p: str, r: str) -> bool:
    return normalize_answer(final_answer(p)) == normalize_answer(final_answer(r))


def _f1(p: str, r: str) -> float:
    return token_f1(final_answer(p), final_answer(r))


def _numeric(p: str, r: str) -> bool:
    # A reference is usually a bare number; a worked solution ("... #### 72") also works.
    ref = normalize_number(r) or extract_final_number(r)
    return numbers_equal(extract_final_number(p), ref)


def _bleu(preds: list[str], refs: list[str]) -> tuple[float | None, list[float | None]]:
    import sacrebleu

    if not preds:
        return None, []
    # effective_order: answers shorter than 4 tokens would otherwise score 0 even when exact
    # (plain corpus BLEU has no 4-grams to match); on longer text it changes nothing.
    bleu = sacrebleu.BLEU(effective_order=True)
    corpus = bleu.corpus_score(preds, [refs]).score
    per_row: list[float | None] = [bleu.sentence_score(p, [r]).score / 100.0 for p, r in zip(preds, refs, strict=True)]
    return float(corpus), per_row


def _refs_only(
    preds: Sequence[str | None], refs: Sequence[str | None]
) -> tuple[list[int], list[str], list[str]]:
    idx = [i for i, r in enumerate(refs) if r is not None]
    return idx, [preds[i] or "" for i in idx], [str(refs[i]) for i in idx]


def _scatter(n: int, idx: list[int], vals: list[float | None]) -> list[float | None]:
    out: list[float | None] = [None] * n
    for i, v in zip(idx, vals, strict=True):
        out[i] = v
    return out


def repeated_ngram_share(text: str | None, n: int = REPETITION_N) -> float:
    """1 − distinct n-grams / n-grams of `text`'s lowercased words (0 when it has fewer than n).

    >>> repeated_ngram_share("the cat and the cat and the cat and the cat")  # 3 of 8 distinct
    0.625
    >>> repeated_ngram_share("The capital of France is Paris.")
    0.0
    """
    words = _WORD.findall((text or "").lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _repetition(preds: Sequence[str | None], finish_reasons: Sequence[str | None] | None) -> ScoreResult:
    # A row without an answer (an engine error) is neither repetitive nor cut: not counted.
    per_row: list[float | None] = [None if p is None else repeated_ngram_share(p) for p in preds]
    value, n = _mean_pct(per_row)
    hit: float | None = None
    if finish_reasons is not None:
        if len(finish_reasons) != len(preds):
            raise ValueError(f"{len(preds)} predictions but {len(finish_reasons)} finish reasons")
        reasons = [f for p, f in zip(preds, finish_reasons, strict=True) if p is not None and f is not None]
        hit = 100.0 * sum(f == "length" for f in reasons) / len(reasons) if reasons else None
    return ScoreResult(value, n, per_row, {"max_tokens_hit_pct": hit})


def score(
    name: str,
    preds: Sequence[str | None],
    refs: Sequence[str | None],
    *,
    teacher_preds: Sequence[str | None] | None = None,
    labels: Sequence[str] | None = None,
    regex: str | None = None,
    finish_reasons: Sequence[str | None] | None = None,
) -> ScoreResult:
    """Score one model's predictions with one scorer.

    Args:
        name: one of `SCORERS`.
        preds: the model's answers, one per test row (None counts as an empty answer).
        refs: references, one per row (None: the row has no reference).
        teacher_preds: the teacher's answers on the same rows (teacher_agreement,
            rouge_l_vs_teacher).
        labels: allowed answers for `choice`; without them letters A-E are compared.
        regex: the pattern of the `regex` scorer.
        finish_reasons: the engine's finish_reason per row (`repetition`: "length" is an
            answer cut at max_tokens or the context window).

    Returns:
        A `ScoreResult` (value in %, or None when nothing could be scored).

    Raises:
        ConfigError: an unknown scorer, or `regex` without a pattern.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if name == "exact_match":
        return _pairwise(preds, refs, _exact)
    if name == "numeric":
        return _pairwise(preds, refs, _numeric)
    if name == "choice":

        def _choice(p: str, r: str) -> bool:
            p, r = final_answer(p), final_answer(r)
            ref_choice = extract_choice(r, labels) or normalize_answer(r)
            got = extract_choice(p, labels)
            if got is None and not labels:
                # No labels and no letter: a free-form class name, compared as text.
                got = normalize_answer(p)
            return got == ref_choice

        return _pairwise(preds, refs, _choice)
    if name == "regex":
        if not regex:
            raise ConfigError("the `regex` scorer needs a pattern; set evaluate.regex")
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ConfigError(f"`evaluate.regex` ({regex!r}) is not a valid regex: {e}") from e
        if pattern.groups:

            def _grp(p: str, r: str) -> bool:
                m = pattern.search(p)
                if not m:
                    return False
                mr = pattern.search(r)
                ref = mr.group(1) if mr else r
                return normalize_answer(m.group(1)) == normalize_answer(ref)

            return _pairwise(preds, refs, _grp)
        # Without a group the pattern is a format check, so rows need no reference.
        per_row: list[float | None] = [float(bool(pattern.search(p or ""))) for p in preds]
        value, n = _mean_pct(per_row)
        return ScoreResult(value, n, per_row)
    if name == "bleu":
        idx, p, r = _refs_only(preds, refs)
        corpus, rows = _bleu(p, r)
        return ScoreResult(corpus, len(idx), _scatter(len(preds), idx, rows))
    if name in ("rouge_l", "rouge_l_vs_teacher"):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

        def _rl(p: str, r: str) -> float:
            # rouge-score keeps only [a-z0-9] tokens, so two identical answers of symbols would
            # score 0 (nothing to match); the same text is a perfect match.
            if p.strip() == r.strip():
                return 1.0
            return scorer.score(r, p)["rougeL"].fmeasure

        if name == "rouge_l":
            return _pairwise(preds, refs, _rl)
        if teacher_preds is None:
            return ScoreResult(None, 0, [None] * len(preds))
        if len(teacher_preds) != len(preds):
            raise ValueError(f"{len(preds)} predictions but {len(teacher_preds)} teacher answers")
        return _pairwise(preds, teacher_preds, _rl)
    if name == "f1":
        return _pairwise(preds, refs, _f1)
    if name == "repetition":
        return _repetition(preds, finish_reasons)
    if name == "teacher_agreement":
        if teacher_preds is None:
            return ScoreResult(None, 0, [None] * len(preds), {"teacher_bleu": None})
        if len(teacher_preds) != len(preds):
            raise ValueError(f"{len(preds)} predictions but {len(teacher_preds)} teacher answers")
        res = _pairwise(preds, teacher_preds, _exact)
        idx, p, t = _refs_only(preds, teacher_preds)
        res.extra["teacher_bleu"] = _bleu(p, t)[0]
        return res
    if name in ("teacher_nll", "token_agreement"):
        raise ValueError(
            f"`{name}` scores a model's logits, not its text; distray.evaluate.fidelity measures it"
        )
    raise ConfigError(f"unknown scorer `{name}`; choose from: {', '.join(SCORERS)}")


def score_all(
    names: Sequence[str],
    preds: Sequence[str | None],
    refs: Sequence[str | None],
    **kwargs: Any,
) -> dict[str, ScoreResult]:
    """Run several scorers on one model's predictions (`kwargs` go to `score`)."""
    return {n: score(n, preds, refs, **kwargs) for n in names}

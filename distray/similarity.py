"""Near-duplicate text: ROUGE-L F1 over word tokens, with an index that skips hopeless pairs.

    python -c "from distray.similarity import SimilarityIndex; help(SimilarityIndex)"

`distray data synthesize` refuses a new prompt that repeats a seed or a prompt it already kept,
as self-instruct does (ROUGE-L F1 ≥ 0.7). rouge_score would do the scoring, one pair at a time
in Python; the index here scores only the pairs whose shared tokens can reach the threshold,
so checking a prompt against thousands costs about its few real candidates.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["SIMILARITY", "SimilarityIndex", "rouge_l", "words"]

#: self-instruct's near-duplicate threshold (ROUGE-L F1 against every task already in the pool).
SIMILARITY = 0.7


def words(text: str) -> list[str]:
    """Lowercase word tokens (`\\w+`): on ASCII text, rouge_score's tokens without stemming."""
    return re.findall(r"\w+", text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists: 2·LCS / (len(a) + len(b))."""
    if not a or not b:
        return 0.0
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return 2 * prev[-1] / (len(a) + len(b))


class SimilarityIndex:
    """Exact and near-duplicate lookups against every text added.

    Exact: the same `words`. Near: ROUGE-L F1 ≥ `threshold`. The LCS runs only on texts that
    share enough tokens for the score to reach the threshold (LCS ≤ the multiset overlap), found
    through an index of (token, occurrence) pairs, so a lookup costs about its candidates.
    """

    def __init__(self, threshold: float = SIMILARITY) -> None:
        self.threshold = threshold
        self._exact: dict[str, str] = {}
        self._tokens: list[list[str]] = []
        self._keys: list[str] = []
        self._postings: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def _pairs(tokens: list[str]) -> list[tuple[str, int]]:
        seen: Counter[str] = Counter()
        out = []
        for t in tokens:
            seen[t] += 1
            out.append((t, seen[t]))
        return out

    def add(self, key: str, text: str) -> None:
        tokens = words(text)
        self._exact.setdefault(" ".join(tokens), key)
        doc = len(self._keys)
        self._keys.append(key)
        self._tokens.append(tokens)
        for pair in self._pairs(tokens):
            self._postings.setdefault(pair, []).append(doc)

    def match(self, text: str) -> tuple[str, str, float] | None:
        """`("exact_duplicate" | "near_duplicate", key of the closest text, ROUGE-L)`, or None."""
        tokens = words(text)
        hit = self._exact.get(" ".join(tokens))
        if hit is not None:
            return "exact_duplicate", hit, 1.0
        overlap: Counter[int] = Counter()
        for pair in self._pairs(tokens):
            overlap.update(self._postings.get(pair, ()))
        best: tuple[float, int] | None = None
        for doc, shared in overlap.items():
            if 2 * shared < self.threshold * (len(tokens) + len(self._tokens[doc])):
                continue
            score = rouge_l(tokens, self._tokens[doc])
            if score >= self.threshold and (best is None or score > best[0]):
                best = (score, doc)
        if best is None:
            return None
        return "near_duplicate", self._keys[best[1]], best[0]

"""The repetition scorer and the paired bootstrap intervals: cases a broken student would hit."""

from __future__ import annotations

import random

import pytest

from distray.evaluate.scorers import repeated_ngram_share, score
from distray.evaluate.stats import paired_bootstrap

LOOP = "The citation is a citation, and the citation, and the citation, and the citation, and the citation"
NORMAL = "Smith, J. (2020). A study of birds. Journal of Ornithology, 12(3), 45-67."


def test_a_looping_answer_scores_high_and_a_normal_one_low() -> None:
    assert repeated_ngram_share(LOOP) >= 0.4
    assert repeated_ngram_share(NORMAL) == 0.0
    assert repeated_ngram_share("yes") == 0.0  # too short to repeat a 4-gram
    r = score("repetition", [LOOP, NORMAL], [None, None])  # needs no reference
    assert r.n == 2 and r.per_row[1] == 0.0
    assert r.value == pytest.approx(100 * repeated_ngram_share(LOOP) / 2)


def test_answers_cut_at_the_cap_are_counted_and_unanswered_rows_are_not() -> None:
    r = score("repetition", [LOOP, NORMAL, "ok", None], [None] * 4,
              finish_reasons=["length", "stop", "stop", None])
    assert r.extra["max_tokens_hit_pct"] == pytest.approx(100 / 3)
    assert r.per_row[3] is None and r.n == 3
    assert score("repetition", ["a"], [None]).extra["max_tokens_hit_pct"] is None  # not known


def test_a_clear_difference_excludes_zero() -> None:
    rnd = random.Random(1)
    a = [1.0 if rnd.random() < 0.8 else 0.0 for _ in range(200)]
    b = [1.0 if rnd.random() < 0.3 else 0.0 for _ in range(200)]
    ci = paired_bootstrap(a, b)
    assert ci is not None and ci.n == 200
    assert 0 < ci.low < ci.diff < ci.high and not ci.within_noise
    worse = paired_bootstrap(b, a)
    assert worse is not None and worse.high < 0 and not worse.within_noise


def test_identical_arms_and_coin_flips_are_within_noise() -> None:
    same = [0.1 * i for i in range(50)]
    ci = paired_bootstrap(same, same)
    assert ci is not None and ci.diff == 0.0 and ci.within_noise
    rnd = random.Random(2)
    a = [float(rnd.random() < 0.5) for _ in range(40)]
    b = [float(rnd.random() < 0.5) for _ in range(40)]
    ci = paired_bootstrap(a, b)
    assert ci is not None and ci.low < 0 < ci.high and ci.within_noise


def test_a_fixed_seed_gives_the_same_interval_and_pairs_skip_missing_rows() -> None:
    rnd = random.Random(3)
    a = [rnd.random() for _ in range(60)]
    b = [rnd.random() for _ in range(60)]
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)
    ci = paired_bootstrap([1.0, None, 3.0], [0.0, 2.0, None])
    assert ci is not None and ci.n == 1 and ci.diff == 1.0
    assert paired_bootstrap([None], [1.0]) is None
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([1.0], [1.0, 2.0])

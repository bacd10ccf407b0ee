"""Lower-bound statistics on synthetic scores with known answers (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.privacy.empirical import (
    clopper_pearson,
    default_guess_sets,
    epsilon_lower_bound_clopper_pearson,
    epsilon_lower_bound_one_run,
    one_run_audit,
    p_value_one_run,
    rr_accuracy,
    threshold_confusion,
)
from fedrec.privacy.errors import PrivacyError


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("r", [10, 50, 100, 500])
def test_all_correct_with_pure_dp_is_the_closed_form(r: int) -> None:
    # P[Bin(r, p) ≥ r] = p^r ≤ β  ⇔  p ≤ β^(1/r): the bound is logit(β^(1/r)).
    eps = epsilon_lower_bound_one_run(m=r, r=r, v=r, delta=0.0, confidence=0.95)
    assert eps == pytest.approx(logit(0.05 ** (1 / r)), abs=1e-9)


def test_golden_value_m100() -> None:
    assert epsilon_lower_bound_one_run(m=100, r=100, v=100, delta=0.0) == pytest.approx(3.49296543, abs=1e-7)
    # δ only weakens the bound, and a little at δ = 1e-5.
    with_delta = epsilon_lower_bound_one_run(m=100, r=100, v=100, delta=1e-5)
    assert 3.48 < with_delta < 3.49296543


def test_p_value_is_the_binomial_tail_without_delta() -> None:
    from scipy import stats

    p = p_value_one_run(m=40, r=20, v=15, epsilon=1.0, delta=0.0)
    assert p == pytest.approx(float(stats.binom.sf(14, 20, rr_accuracy(1.0))))


def test_p_value_grows_with_epsilon_and_delta() -> None:
    ps = [p_value_one_run(m=200, r=100, v=80, epsilon=e, delta=0.0) for e in (0.0, 0.5, 1.0, 2.0)]
    assert ps == sorted(ps)
    assert p_value_one_run(m=200, r=100, v=80, epsilon=1.0, delta=1e-3) > ps[2]


def test_chance_accuracy_gives_zero() -> None:
    assert epsilon_lower_bound_one_run(m=100, r=100, v=50, delta=1e-5) == 0.0
    assert epsilon_lower_bound_one_run(m=100, r=0, v=0, delta=1e-5) == 0.0


def test_perfectly_separable_scores_give_the_formula() -> None:
    m = 200
    included = np.arange(m) % 2 == 0
    scores = included.astype(float)
    res = one_run_audit(scores, included, delta=0.0, guess_sets=[(50, 50)])
    assert (res.k_in, res.k_out, res.correct) == (50, 50, 100)
    assert res.epsilon_lb == pytest.approx(logit(0.05 ** (1 / 100)), abs=1e-9)
    # With several guess sets the level is split (Bonferroni): all-correct 100 guesses at β/8.
    sets = default_guess_sets(m)
    res8 = one_run_audit(scores, included, delta=0.0)
    assert res8.candidates == len(sets) == 8
    assert res8.epsilon_lb == pytest.approx(logit((0.05 / 8) ** (1 / m)), abs=1e-9)  # all m guesses right


def test_random_scores_rarely_give_a_positive_bound() -> None:
    # Validity: with scores independent of membership the bound is > 0 in at most ~β of the trials.
    rng = np.random.default_rng(7)
    positives = 0
    trials = 200
    for _ in range(trials):
        included = rng.random(100) < 0.5
        res = one_run_audit(rng.normal(size=100), included, delta=1e-5)
        positives += res.epsilon_lb > 0
    assert positives <= 0.05 * trials


def test_one_sided_guesses_beat_noisy_bottom() -> None:
    # Included canaries that were never sampled look excluded: the bottom is noisy, the top is clean.
    m = 400
    rng = np.random.default_rng(0)
    included = rng.random(m) < 0.5
    scores = np.where(included, 1.0, 0.0) + rng.normal(0, 0.01, m)
    unsampled = included & (rng.random(m) < 0.3)
    scores[unsampled] = -1.0  # lower than any excluded canary
    res = one_run_audit(scores, included, delta=1e-5)
    assert res.k_out == 0 and res.correct == res.k_in
    assert res.epsilon_lb > 2.5


def test_scores_and_labels_must_match() -> None:
    with pytest.raises(PrivacyError, match="same length"):
        one_run_audit([0.1, 0.2], [True], delta=1e-5)
    with pytest.raises(PrivacyError, match="finite"):
        one_run_audit([0.1, float("nan")], [True, False], delta=1e-5)
    with pytest.raises(PrivacyError, match="guess set"):
        one_run_audit([0.1, 0.2], [True, False], delta=1e-5, guess_sets=[(2, 1)])
    with pytest.raises(PrivacyError, match="confidence"):
        epsilon_lower_bound_one_run(m=10, r=10, v=10, delta=0.0, confidence=1.0)
    with pytest.raises(PrivacyError, match="correct"):
        epsilon_lower_bound_one_run(m=10, r=5, v=6, delta=0.0)


def test_clopper_pearson_interval_known_values() -> None:
    # 0 of n: the upper end solves (1 - p)^n = alpha/2.
    lo, hi = clopper_pearson(0, 50, alpha=0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-9)
    lo, hi = clopper_pearson(50, 50, alpha=0.05)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 50), rel=1e-9)
    lo, hi = clopper_pearson(5, 10, alpha=0.05)
    assert lo < 0.5 < hi


def test_clopper_pearson_epsilon() -> None:
    # Perfect attack on 100 in / 100 out: FPR⁺ = FNR⁺ = 1 - 0.025^(1/100), ε = log((1 - FNR⁺)/FPR⁺).
    up = 1 - 0.025 ** (1 / 100)
    eps = epsilon_lower_bound_clopper_pearson(tp=100, fp=0, tn=100, fn=0, delta=0.0)
    assert eps == pytest.approx(math.log((1 - up) / up), rel=1e-9)
    assert epsilon_lower_bound_clopper_pearson(tp=50, fp=50, tn=50, fn=50, delta=1e-5) == 0.0


def test_threshold_confusion() -> None:
    assert threshold_confusion([3, 2, 1, 0], [True, False, True, False], 1.5) == (1, 1, 1, 1)

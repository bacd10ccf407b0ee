"""Empirical lower bounds on ε from a membership-inference experiment (pure statistics, no I/O).

An audit inserts ``m`` canaries, each included in training independently with probability ½, scores
each canary from the final model, and asks: how large must ε be for an (ε, δ)-DP mechanism to let
an attacker guess this well? Two published methods, implemented here from their statements:

* **One run** (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run",
  Theorem 3.1 and its δ > 0 extension). The auditor guesses "in" for the ``k_in`` highest scores,
  "out" for the ``k_out`` lowest and abstains on the rest: ``r = k_in + k_out`` guesses, ``v``
  correct. If the mechanism is (ε, δ)-DP in each canary, then for every v

      P[V ≥ v] ≤ f(v) + 2·m·δ · max_{1≤i≤v} (f(v−i) − f(v)) / i,   f(t) = P[Binomial(r, p_ε) ≥ t],

  with ``p_ε = e^ε / (1 + e^ε)`` (the accuracy of ε-randomized response). ε is rejected at level β
  when that p-value is ≤ β; the lower bound is the largest rejected ε (the p-value grows with ε).
  Perfect guesses with δ = 0 give the closed form ``ε = logit(β^(1/r))``.
* **Clopper–Pearson** (Jagielski et al. 2020; Nasr et al. 2021): exact binomial upper bounds on the
  false-positive and false-negative rates of a threshold attack, then
  ``ε ≥ max(log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺))``. Valid when every trial is an
  independent training run; across the canaries of one run it is a heuristic (the one-run theorem
  is what licenses many canaries per run).

Several canary sets trained independently (``--runs``) are one mechanism in which each canary only
touches its own run, so the one-run theorem applies to their union with ``m = Σ m_run``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedrec.privacy.errors import PrivacyError

_EPS_MAX = 60.0  # above this p_ε = 1 in double precision: the search stops here
_BISECT_STEPS = 60


def rr_accuracy(epsilon: float) -> float:
    """p_ε = e^ε / (1 + e^ε): the best guessing accuracy ε-DP allows for one included/excluded bit."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value_one_run(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v correct of r guesses] for an (ε, δ)-DP mechanism with m canaries."""
    _check_counts(m=m, r=r, v=v)
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise PrivacyError(f"need ε ≥ 0 and 0 ≤ δ < 1, got ε={epsilon!r}, δ={delta!r}")
    p = rr_accuracy(epsilon)
    # f(t) = P[B ≥ t] = sf(t − 1) for t = 0 … v, in one vectorised call
    f = stats.binom.sf(np.arange(v + 1) - 1, r, p)
    f_v = float(f[v])
    if delta == 0 or v == 0:
        return min(1.0, f_v)
    i = np.arange(1, v + 1)
    worst = float(np.max((f[v - i] - f_v) / i))
    return min(1.0, f_v + 2.0 * m * delta * worst)


def epsilon_lower_bound_one_run(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest ε that ``v`` correct of ``r`` guesses reject at level ``1 − confidence`` (0 if none)."""
    beta = _beta(confidence)
    _check_counts(m=m, r=r, v=v)

    def rejected(eps: float) -> bool:
        return p_value_one_run(m=m, r=r, v=v, epsilon=eps, delta=delta) <= beta

    if r == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_MAX:
            return _EPS_MAX
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunResult:
    """The best guess set of a one-run audit and its ε lower bound."""

    m: int  # canaries
    k_in: int  # guessed "in": the k_in highest scores
    k_out: int  # guessed "out": the k_out lowest scores
    correct: int  # v
    epsilon_lb: float  # at ``confidence``, Bonferroni-corrected over the guess sets tried
    confidence: float
    delta: float
    candidates: int  # guess sets tried (the correction factor)

    @property
    def guesses(self) -> int:
        return self.k_in + self.k_out


def default_guess_sets(m: int) -> list[tuple[int, int]]:
    """(k_in, k_out) pairs tried: k = m/16, m/8, m/4, m/2 guesses "in", with as many or no "out" guesses.

    One-sided sets matter: an included canary the sampler never picked looks excluded, so the lowest
    scores are noisier evidence than the highest.
    """
    ks = sorted({max(1, m // d) for d in (16, 8, 4, 2)})
    return [(k, k) for k in ks] + [(k, 0) for k in ks]


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_sets: Sequence[tuple[int, int]] | None = None,
) -> OneRunResult:
    """Guess "in" for the ``k_in`` top scores and "out" for the ``k_out`` bottom ones; keep the best bound.

    Each guess set is tested at level ``(1 − confidence) / len(guess_sets)`` (Bonferroni), so choosing
    the best set after seeing the scores keeps the stated confidence. Higher score = more likely in.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != inc.shape:
        raise PrivacyError(
            f"scores and included must be 1-D of the same length, got {s.shape} and {inc.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise PrivacyError("membership scores must be finite numbers")
    m = len(s)
    if m < 2:
        raise PrivacyError(f"a one-run audit needs at least 2 canaries, got {m}")
    sets = list(dict.fromkeys(guess_sets)) if guess_sets is not None else default_guess_sets(m)
    if not sets or any(ki < 0 or ko < 0 or ki + ko < 1 or ki + ko > m for ki, ko in sets):
        raise PrivacyError(f"each guess set needs k_in, k_out ≥ 0 and 1 ≤ k_in + k_out ≤ m = {m}, got {sets}")
    corrected = 1.0 - _beta(confidence) / len(sets)
    order = np.argsort(-s, kind="stable")  # highest score first
    best: OneRunResult | None = None
    for k_in, k_out in sets:
        v = (
            int(inc[order[:k_in]].sum() + (~inc[order[m - k_out :]]).sum())
            if k_out
            else int(inc[order[:k_in]].sum())
        )
        eps = epsilon_lower_bound_one_run(m=m, r=k_in + k_out, v=v, delta=delta, confidence=corrected)
        result = OneRunResult(m, k_in, k_out, v, eps, confidence, delta, len(sets))
        if best is None or eps > best.epsilon_lb:
            best = result
    assert best is not None
    return best


# ---------------------------------------------------------------- Clopper–Pearson (multi-run)


def clopper_pearson(successes: int, trials: int, *, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 − alpha) interval for a binomial proportion (each side alpha/2)."""
    if trials < 0 or not 0 <= successes <= trials:
        raise PrivacyError(f"need 0 ≤ successes ≤ trials, got {successes} of {trials}")
    if not 0 < alpha < 1:
        raise PrivacyError(f"alpha must be in (0, 1), got {alpha!r}")
    if trials == 0:
        return 0.0, 1.0
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = (
        1.0
        if successes == trials
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return lo, hi


def epsilon_lower_bound_clopper_pearson(
    *, tp: int, fp: int, tn: int, fn: int, delta: float, confidence: float = 0.95
) -> float:
    """ε lower bound of a threshold attack from Clopper–Pearson upper bounds on FPR and FNR.

    Both rates are bounded together at ``confidence`` (each one-sided at ``1 − β/2``).
    """
    beta = _beta(confidence)
    if min(tp, fp, tn, fn) < 0:
        raise PrivacyError(f"confusion counts must be ≥ 0, got tp={tp} fp={fp} tn={tn} fn={fn}")
    # one-sided upper bounds at level β/2 each = the upper end of a two-sided interval at alpha = β
    fpr_hi = clopper_pearson(fp, fp + tn, alpha=beta)[1]
    fnr_hi = clopper_pearson(fn, fn + tp, alpha=beta)[1]
    bounds = [0.0]
    for a, b in ((fnr_hi, fpr_hi), (fpr_hi, fnr_hi)):
        if b > 0 and 1 - delta - a > 0:
            bounds.append(math.log((1 - delta - a) / b))
    return max(bounds)


def threshold_confusion(
    scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, threshold: float
) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) of guessing "in" when score > threshold."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    guess = s > threshold
    return (
        int((guess & inc).sum()),
        int((guess & ~inc).sum()),
        int((~guess & ~inc).sum()),
        int((~guess & inc).sum()),
    )


# ---------------------------------------------------------------- argument checks


def _beta(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise PrivacyError(f"confidence must be in (0, 1), got {confidence!r}")
    return 1.0 - confidence


def _check_counts(*, m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 ≤ correct ≤ guesses ≤ canaries, got v={v}, r={r}, m={m}")


# ---------------------------------------------------------------- Gaussian releases (many trials)
#
# A Gaussian mechanism of L2 sensitivity 1 and noise multiplier σ is exactly μ-Gaussian DP with
# μ = 1/σ (Dong, Roth, Su 2019): distinguishing a neighbour is as hard as telling N(0, 1) from
# N(μ, 1). Its (ε, δ) curve is the Balle–Wang (2018) profile
#
#     δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2),
#
# and its trade-off curve is TPR = Φ(Φ⁻¹(FPR) + μ). An audit that runs the release T times with
# and without a canary and projects each release on the canary's contribution sees two samples of
# (ideally) Gaussian scores; their standardised mean gap estimates μ.


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism at ``delta`` (the Balle–Wang profile above); ∞ for μ = ∞, 0 for μ ≤ 0."""
    if not 0 < delta < 1:
        raise PrivacyError(f"δ must be in (0, 1), got {delta!r}")
    if math.isnan(mu):
        raise PrivacyError("μ is not a number")
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf

    def excess(eps: float) -> float:
        a = stats.norm.cdf(-eps / mu + mu / 2)
        b = math.exp(min(eps + float(stats.norm.logcdf(-eps / mu - mu / 2)), 700.0))
        return float(a - b) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = mu * mu / 2 + 10.0 * mu + 10.0
    from scipy.optimize import brentq

    return float(brentq(excess, 0.0, hi, xtol=1e-10))


def gdp_mu_for_epsilon(epsilon: float, delta: float) -> float:
    """The μ whose (ε, δ) profile passes through (``epsilon``, ``delta``) (inverse of :func:`gdp_epsilon`)."""
    if not epsilon > 0:
        raise PrivacyError(f"ε must be > 0, got {epsilon!r}")
    from scipy.optimize import brentq

    hi = 1.0
    while gdp_epsilon(hi, delta) < epsilon:
        hi *= 2.0
    return float(brentq(lambda m: gdp_epsilon(m, delta) - epsilon, 1e-9, hi, xtol=1e-12))


def gdp_tpr(fpr: np.ndarray, mu: float) -> np.ndarray:
    """The μ-GDP trade-off curve: the highest TPR any test reaches at false-positive rate ``fpr``."""
    f = np.clip(np.asarray(fpr, dtype=np.float64), 0.0, 1.0)
    out: np.ndarray = stats.norm.cdf(stats.norm.ppf(f) + mu)
    return out


@dataclass(frozen=True)
class GaussianFit:
    """μ fitted to two score samples (standardised mean gap, pooled variance) and its lower bound."""

    mu: float  # point estimate (∞ when both samples are constant and differ)
    mu_lb: float  # one-sided lower confidence bound at ``confidence`` (noncentral t, exact under normality)
    n_in: int
    n_out: int
    confidence: float


def gaussian_fit(scores_in: np.ndarray, scores_out: np.ndarray, *, confidence: float = 0.95) -> GaussianFit:
    """Fit μ = (mean_in − mean_out) / pooled sd and bound it below by inverting the noncentral t test.

    Exact when the two samples are Gaussian with one variance (a Gaussian release and a linear
    statistic); a heuristic otherwise — the Clopper–Pearson bound needs no such assumption.
    """
    beta = _beta(confidence)
    a = np.asarray(scores_in, dtype=np.float64)
    b = np.asarray(scores_out, dtype=np.float64)
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        raise PrivacyError(f"a Gaussian fit needs at least 2 scores per side, got {n1} and {n2}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise PrivacyError("scores must be finite numbers")
    gap = float(a.mean() - b.mean())
    pooled = math.sqrt((((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()) / (n1 + n2 - 2))
    scale = 1e-12 * max(1.0, float(np.abs(np.concatenate([a, b])).max()))
    if pooled <= scale:  # no noise at all: the two outputs are told apart perfectly
        mu = math.inf if abs(gap) > scale else 0.0
        return GaussianFit(mu, mu, n1, n2, confidence)
    mu = gap / pooled
    k = math.sqrt(n1 * n2 / (n1 + n2))
    t_obs, df = mu * k, n1 + n2 - 2

    def p_above(nc: float) -> float:  # P[T ≥ t_obs] under noncentrality nc, increasing in nc
        return float(stats.nct.sf(t_obs, df, nc))

    if t_obs > 30.0:  # far in the tail the noncentral t series fails: the large-sample normal bound
        se = math.sqrt(1.0 / n1 + 1.0 / n2 + mu * mu / (2.0 * (n1 + n2)))
        return GaussianFit(mu, max(0.0, mu - float(stats.norm.ppf(1 - beta)) * se), n1, n2, confidence)
    if p_above(0.0) >= beta:  # not even μ > 0 is established
        return GaussianFit(mu, 0.0, n1, n2, confidence)
    from scipy.optimize import brentq

    nc = float(brentq(lambda x: p_above(x) - beta, 0.0, max(1.0, t_obs), xtol=1e-9))
    return GaussianFit(mu, nc / k, n1, n2, confidence)


def fisher_direction(features_in: np.ndarray, features_out: np.ndarray) -> np.ndarray:
    """Fisher's linear discriminant w = (Σ_pooled + ridge)⁻¹ (m_in − m_out) of two feature samples.

    The most powerful linear test between two Gaussians with one covariance; a tiny ridge keeps it
    defined when a direction has no noise at all (a broken release): w then points along it.
    """
    a = np.atleast_2d(np.asarray(features_in, dtype=np.float64))
    b = np.atleast_2d(np.asarray(features_out, dtype=np.float64))
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise PrivacyError(f"need ≥ 2 rows per side with the same columns, got {a.shape} and {b.shape}")
    gap = a.mean(0) - b.mean(0)
    cov = (np.cov(a, rowvar=False) * (len(a) - 1) + np.cov(b, rowvar=False) * (len(b) - 1)) / (
        len(a) + len(b) - 2
    )
    cov = np.atleast_2d(cov)
    ridge = 1e-9 * max(float(np.trace(cov)) / len(cov), 1e-300) + 1e-300
    w: np.ndarray = np.linalg.solve(cov + ridge * np.eye(len(cov)), gap)
    norm_w = float(np.linalg.norm(w))
    return w / norm_w if norm_w > 0 and math.isfinite(norm_w) else np.eye(len(gap))[0]


def best_threshold(
    scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float, confidence: float = 0.95
) -> float:
    """The threshold ("in" when score > t) whose Clopper–Pearson ε bound is largest on these scores.

    Choose it on trials that are then left out of the bound (the audit's fit split), so that the
    bound on the other trials keeps its confidence.
    """
    a = np.sort(np.asarray(scores_in, dtype=np.float64))
    b = np.sort(np.asarray(scores_out, dtype=np.float64))
    cands = np.unique(np.concatenate([a, b]))
    if len(cands) > 400:
        cands = np.unique(np.quantile(cands, np.linspace(0, 1, 400)))
    best_t, best_eps = float(np.median(np.concatenate([a, b]))), -1.0
    for t in cands:
        tp = int(len(a) - np.searchsorted(a, t, side="right"))
        fp = int(len(b) - np.searchsorted(b, t, side="right"))
        eps = epsilon_lower_bound_clopper_pearson(
            tp=tp, fp=fp, tn=len(b) - fp, fn=len(a) - tp, delta=delta, confidence=confidence
        )
        if eps > best_eps:
            best_t, best_eps = float(t), eps
    return best_t


def roc_points(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of "in when score > t" over every threshold, from (0, 0) to (1, 1)."""
    a = np.asarray(scores_in, dtype=np.float64)
    b = np.asarray(scores_out, dtype=np.float64)
    ts = np.unique(np.concatenate([a, b]))[::-1]
    a_sorted, b_sorted = np.sort(a), np.sort(b)
    tpr = (len(a) - np.searchsorted(a_sorted, ts, side="left")) / len(a)
    fpr = (len(b) - np.searchsorted(b_sorted, ts, side="left")) / len(b)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], tpr, [1.0]])

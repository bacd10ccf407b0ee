"""Pure ε maths for user-level DP-SGD: compose, cross-check, calibrate (no state, no I/O).

A *composition history* is a sequence of ``(noise_multiplier, sample_rate, steps)`` segments,
the same shape as an Opacus accountant's ``history``: ``steps`` applications of the
Poisson-subsampled Gaussian mechanism with sampling rate ``sample_rate`` (the probability that
one *user* is in a batch) and noise ``noise_multiplier`` (σ, in units of the clipping norm).

- :func:`epsilon` is what the project records (Opacus PRV by default, RDP allowed; never GDP,
  which is an asymptotic approximation and not an upper bound).
- :func:`epsilon_dp_accounting` is the same quantity from Google's ``dp_accounting`` — an
  independent implementation for audits.
- :func:`calibrate_noise` finds the smallest σ meeting a target ε, verified by construction.

Composition is commutative, so segments with identical ``(σ, q)`` are merged before Opacus
sees them: the result is the same bound, and the PRV accountant is much faster on one segment
than on many (its cost grows with the number of *distinct* segments).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Literal

import numpy as np

from fedrec.privacy.errors import BudgetError

Accountant = Literal["prv", "rdp"]
Segment = tuple[float, float, int]

#: Accountants the project may record ε with (GDP is an approximation, not a bound).
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

_MAX_SIGMA = 1e4  # calibration gives up above this σ: the target is unreachable in practice
_SIGMA_RTOL = 1e-3  # relative width of the final bisection bracket on σ
# Opacus (RDP, and PRV's domain sizing) warns when the optimal Rényi order sits at the edge of
# its α grid: the bound is still valid, only possibly loose, so it is not the caller's problem.
_EDGE_ALPHA_WARNING = r".*Optimal order is the (largest|smallest) alpha.*"


def check_accountant(accountant: str) -> Accountant:
    """Return ``accountant`` if the project may record ε with it, else raise :class:`BudgetError`."""
    if accountant == "prv":
        return "prv"
    if accountant == "rdp":
        return "rdp"
    raise BudgetError(
        f"accountant must be one of 'prv' or 'rdp' (GDP is never used for budgets), got {accountant!r}"
    )


def check_delta(*, delta: float, n_users: int) -> None:
    """Require ``0 < δ < 1/n_users`` — a δ of 1/n would allow leaking one whole user outright."""
    _check_delta_range(delta)
    if isinstance(n_users, bool) or not isinstance(n_users, Integral) or n_users < 1:
        raise BudgetError(f"n_users must be an integer ≥ 1, got {n_users!r}")
    if not delta < 1.0 / n_users:
        raise BudgetError(
            f"delta must be < 1/n_users = {1.0 / n_users:.6g} for a tenant with {n_users} users, "
            f"got {delta!r}"
        )


def validate_history(history: Iterable[Sequence[float]]) -> list[Segment]:
    """Check every segment (σ > 0 finite, 0 < q ≤ 1, steps an integer ≥ 0) and return clean tuples."""
    clean: list[Segment] = []
    for i, segment in enumerate(history):
        if isinstance(segment, str | bytes) or not isinstance(segment, Sequence) or len(segment) != 3:
            raise BudgetError(
                f"history segment {i} must be (noise_multiplier, sample_rate, steps), got {segment!r}"
            )
        sigma, q, steps = segment
        clean.append(
            (
                _check_sigma(sigma, where=f" in history segment {i}"),
                _check_rate(q, where=f" in history segment {i}"),
                _check_steps(steps, where=f" in history segment {i}", minimum=0),
            )
        )
    return clean


def merge_history(history: Iterable[Segment]) -> list[Segment]:
    """Merge segments with equal ``(σ, q)`` and drop empty ones (composition is commutative)."""
    steps_by_key: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps > 0:
            steps_by_key[(sigma, q)] = steps_by_key.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_key.items()]


def epsilon(*, history: Iterable[Sequence[float]], delta: float, accountant: Accountant = "prv") -> float:
    """ε of the composed history at ``delta``, from Opacus' PRV (default) or RDP accountant.

    An empty history (or one whose segments all have 0 steps) spends nothing: ε = 0.
    """
    kind = check_accountant(accountant)
    _check_delta_range(delta)
    segments = merge_history(validate_history(history))
    if not segments:
        return 0.0
    return _epsilon_of(tuple(sorted(segments)), float(delta), kind)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(segments: tuple[Segment, ...], delta: float, kind: str) -> float:
    """Memoized: the function is pure, and equally sized tenants (or repeated budget checks) ask the
    same question many times — one PRV evaluation costs 0.1–1 s."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    acc.history = list(segments)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # q = 1 makes PRV take log(1 - q) = -inf on a branch it then discards; the result is right.
        warnings.filterwarnings("ignore", message=_EDGE_ALPHA_WARNING, category=UserWarning)
        return float(acc.get_epsilon(delta))


def epsilon_dp_accounting(
    *, history: Iterable[Sequence[float]], delta: float, method: Literal["pld", "rdp"]
) -> float:
    """ε of the same history from Google's ``dp_accounting`` (PLD or RDP) — the audit cross-check.

    Each segment is ``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)``.
    """
    if method not in ("pld", "rdp"):
        raise BudgetError(f"method must be 'pld' or 'rdp', got {method!r}")
    _check_delta_range(delta)
    segments = merge_history(validate_history(history))
    if not segments:
        return 0.0
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    acc: dp_accounting.PrivacyAccountant = (
        pld_privacy_accountant.PLDAccountant() if method == "pld" else rdp_privacy_accountant.RdpAccountant()
    )
    for sigma, q, steps in segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "prv",
    history_before: Iterable[Sequence[float]] = (),
) -> float:
    """Smallest σ (to a relative 1e-3) with ``epsilon(history_before + [(σ, q, steps)]) ≤ target``.

    The returned σ is one the accountant was actually evaluated at and found within the target,
    so the guarantee does not rest on the bisection's tolerance. Raises :class:`BudgetError` if
    the target is not positive or cannot be met (``history_before`` already spends it, or even
    σ = 1e4 is not enough).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, Real) or not target_epsilon > 0:
        raise BudgetError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not math.isfinite(target_epsilon):
        raise BudgetError(f"target_epsilon must be finite, got {target_epsilon!r}")
    check_accountant(accountant)
    _check_delta_range(delta)
    q = _check_rate(sample_rate)
    n = _check_steps(steps, minimum=1)
    before = validate_history(history_before)

    def eps_at(sigma: float) -> float:
        return epsilon(history=[*before, (sigma, q, n)], delta=delta, accountant=accountant)

    spent_before = epsilon(history=before, delta=delta, accountant=accountant)
    if spent_before >= target_epsilon:
        raise BudgetError(
            f"target_epsilon {target_epsilon:g} cannot be met: the history before already spends ε = "
            f"{spent_before:.4g}"
        )
    # Bracket: eps_at(lo) > target ≥ eps_at(hi).
    hi = 1.0
    if eps_at(hi) > target_epsilon:
        lo = hi
        while True:
            hi *= 2.0
            if hi > _MAX_SIGMA:
                raise BudgetError(
                    f"target_epsilon {target_epsilon:g} cannot be met with noise_multiplier ≤ {_MAX_SIGMA:g} "
                    f"for sample_rate {q:g} and {n} steps"
                )
            if eps_at(hi) <= target_epsilon:
                break
            lo = hi
    else:
        lo = hi / 2.0
        while eps_at(lo) <= target_epsilon:
            hi = lo
            lo /= 2.0
            if lo < 1e-3:  # a σ this small already meets the target: no need to be finer
                return hi
    while (hi - lo) > _SIGMA_RTOL * hi:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------- argument checks


def _check_delta_range(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, Real) or not 0.0 < float(delta) < 1.0:
        raise BudgetError(f"delta must be in (0, 1), got {delta!r}")


def _check_sigma(sigma: object, *, where: str = "") -> float:
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, Real)
        or not math.isfinite(sigma)
        or not float(sigma) > 0
    ):
        raise BudgetError(f"noise_multiplier must be a finite number > 0{where}, got {sigma!r}")
    return float(sigma)


def _check_rate(q: object, *, where: str = "") -> float:
    if isinstance(q, bool) or not isinstance(q, Real) or not 0.0 < float(q) <= 1.0:
        raise BudgetError(f"sample_rate must be in (0, 1]{where}, got {q!r}")
    return float(q)


def _check_steps(steps: object, *, where: str = "", minimum: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or int(steps) < minimum:
        raise BudgetError(f"steps must be an integer ≥ {minimum}{where}, got {steps!r}")
    return int(steps)

"""Automatic choice of the DP approach from public facts: tenant sizes, the release's σ, the noise mode.

What decides it (docs/PRIVACY_UTILITY.md, the frontier): the item–item Gram's signal grows with the
number of users that contribute to the server's sum, its noise is the std of that sum. With ``k``
tenants releasing independently (local noise) the sum carries ``σ·√k``; under secure aggregation
with distributed noise it carries ``σ``. The index

    users_per_noise = (total users) / (effective σ of the sum)

separates the regimes on every data set of the frontier: below :data:`DP_EASE_MIN_USERS_PER_NOISE`
DP-EASE loses to DP popularity (its Gram components drown), above it DP-EASE wins. With no noise
(ε = ∞, σ = 0) the approach is plain EASE on the exact Gram.

Everything is computed from what the coordinator knows anyway (user counts per tenant, σ from ε, δ
and the accountant — the caller calibrates it with ``fedrec.privacy.gram.calibrate_release_sigma``);
nothing depends on the tenants' data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Approach = Literal["ease", "dp_ease", "dp_popularity"]
NoiseMode = Literal["local", "distributed"]
NOISE_MODES: tuple[str, ...] = ("local", "distributed")

#: Users per unit of effective noise std from which DP-EASE is picked. The frontier (docs/PRIVACY_UTILITY.md)
#: puts the crossover at ≈ 450 on synthetic data but above ≈ 1 600 on ml-100k (strong popularity, weak
#: item–item signal): 1 000 is the value at which no measured point picks DP-EASE below DP popularity
#: by more than noise, at the price of leaving DP-EASE's gain on the table for 1 000-user synthetic
#: federations at ε = 4–8.
DP_EASE_MIN_USERS_PER_NOISE = 1000.0


@dataclass(frozen=True)
class Choice:
    """The picked approach and why (one sentence)."""

    approach: Approach
    reason: str
    users: int  # total users of all tenants
    effective_sigma: float  # noise multiplier of the server's sum
    users_per_noise: float  # the deciding index (inf without noise)


def sum_sigma(sigma: float, tenants: int, noise_mode: NoiseMode) -> float:
    """Noise std (in sensitivity units) of the server's sum of ``tenants`` releases at multiplier σ."""
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    if tenants < 1 or sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"need tenants ≥ 1 and a finite sigma ≥ 0, got {tenants}, {sigma}")
    return sigma * math.sqrt(tenants) if noise_mode == "local" else sigma


def choose(
    tenant_users: Sequence[int],
    sigma: float,
    *,
    noise_mode: NoiseMode = "local",
    epsilon: float | None = None,
    threshold: float = DP_EASE_MIN_USERS_PER_NOISE,
    noise_words: str | None = None,
) -> Choice:
    """Pick ``ease`` (σ = 0), ``dp_ease`` or ``dp_popularity`` for these tenants (module docstring).

    ``noise_words`` names the noise in the reason (default: ``"<noise_mode> noise"``)."""
    if not tenant_users or any(int(n) < 0 for n in tenant_users):
        raise ValueError("tenant_users must list each tenant's (non-negative) user count")
    users = int(sum(int(n) for n in tenant_users))
    k = len(tenant_users)
    eff = sum_sigma(sigma, k, noise_mode)
    at = f"ε = {epsilon:g}" if epsilon is not None else f"σ = {sigma:.3g}"
    if eff == 0.0:
        return Choice(
            "ease",
            f"no noise ({at}): EASE on the exact Gram is the strongest model here",
            users,
            0.0,
            math.inf,
        )
    ratio = users / eff
    mode = f"{noise_words or f'{noise_mode} noise'}, {k} tenant(s)"
    if ratio >= threshold:
        return Choice(
            "dp_ease",
            f"{users} users over an effective noise std of {eff:.3g} ({mode}, {at}) give {ratio:.0f} users "
            f"per unit of noise ≥ {threshold:g}, where DP-EASE beats DP popularity on the frontier",
            users,
            eff,
            ratio,
        )
    return Choice(
        "dp_popularity",
        f"{users} users over an effective noise std of {eff:.3g} ({mode}, {at}) give only {ratio:.0f} users "
        f"per unit of noise < {threshold:g}: the Gram's components drown, DP popularity is the better floor",
        users,
        eff,
        ratio,
    )

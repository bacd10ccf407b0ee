"""The server's side of the one-shot DP item release (``approach`` ``dp_ease`` / ``dp_popularity``).

* :func:`resolve_approach` — ``auto`` → the approach the frontier says is best, from public facts only
  (each tenant's user count, the ε cap, δ, the accountant, the noise mode, the catalogue size), before
  anything is released (``fedrec.shared_model.choose``); an explicit approach is kept, with the reason.
* :func:`release_problem` — the checks a tenant's release must pass before it is summed (exact keys,
  shapes, finite values, a user count within the tenant's manifest).
* :func:`fit_release` — the server's model from the SUM of the releases: DP-EASE on the noisy Gram
  (M and λ by the fixed rule of ``fedrec.shared_model.dp_item``) or DP popularity, as an
  :class:`~fedrec.shared_model.item_model.ItemReleaseModel`. Post-processing only: no extra privacy cost.

Noise of the sum: tenant ``t`` adds noise of multiplier ``σ_t/√shares`` (``shares`` = 1 with local
noise), so the sum carries ``√(Σ_t σ_t²/shares)`` — what :func:`sum_noise` returns and what the rule
is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrec.privacy import gram
from fedrec.shared_model.choose import choose
from fedrec.shared_model.codec import Weights
from fedrec.shared_model.dp_item import DPEASE
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.runconfig import RELEASE_APPROACHES, RunConfig

MAX_GRAM_ITEMS = (
    gram.MAX_GRAM_ITEMS
)  # catalogues above this never release the Gram (same limit as the tenants')


@dataclass(frozen=True)
class ApproachChoice:
    """What the run trains and why (written to privacy.json and printed by ``fedrec simulate``)."""

    approach: str  # mlp | dp_ease | dp_popularity
    reason: str
    noise_mode: str  # local | distributed (SecAgg+) | none
    users_per_noise: float | None = None  # the deciding index of the automatic choice

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.approach, "reason": self.reason, "noise_mode": self.noise_mode}
        if self.users_per_noise is not None:
            out["users_per_noise"] = (
                None if math.isinf(self.users_per_noise) else round(self.users_per_noise, 1)
            )
        return out


def pop_share(approach: str) -> float:
    """ρ of the release: all of the sensitivity to popularity (dp_popularity) or to the Gram (dp_ease)."""
    if approach not in RELEASE_APPROACHES:
        raise FedrecError(f"{approach!r} is not an item-release approach")
    return 1.0 if approach == "dp_popularity" else 0.0


def shares_for(cfg: RunConfig, threshold: int | None) -> int:
    """Noise shares per tenant: 1 (local) without SecAgg+; the SecAgg+ threshold with it — the sum the
    server can ever unmask holds at least ``threshold`` tenants' shares, so it carries the full σ."""
    return int(threshold) if cfg.secagg and cfg.dp and threshold else 1


def resolve_approach(
    cfg: RunConfig, tenant_users: Mapping[str, int], n_items: int, *, shares: int = 1
) -> ApproachChoice:
    """``cfg.approach`` made concrete (module docstring)."""
    mode = "none" if not cfg.dp else ("distributed" if shares > 1 else "local")
    if cfg.approach != "auto":
        why = {
            "mlp": "asked for: DP-SGD rounds of the MLP" if cfg.dp else "asked for: the federated MLP",
            "dp_ease": "asked for: one item–item Gram release per tenant, DP-EASE on the server's sum",
            "dp_popularity": "asked for: one popularity release per tenant, ranked by the noisy sum",
        }[cfg.approach]
        if cfg.approach == "dp_ease" and n_items > MAX_GRAM_ITEMS:
            raise FedrecError(
                f"dp_ease releases an item–item Gram: {n_items} items is above the limit ({MAX_GRAM_ITEMS}); "
                "use dp_popularity or mlp"
            )
        if cfg.approach == "mlp":  # DP-SGD: each tenant adds its own noise, SecAgg+ or not
            return ApproachChoice("mlp", why, "local" if cfg.dp else "none")
        return ApproachChoice(cfg.approach, why, mode)
    if not cfg.dp:
        return ApproachChoice(
            "mlp",
            "no DP (--no-dp): the federated MLP; an exact item–item Gram would hand the server raw "
            "co-occurrence counts",
            "none",
        )
    if not tenant_users:
        raise FedrecError("approach auto needs each tenant's user count (manifests or the tenants' replies)")
    caps = [cfg.cap_for(t) for t in tenant_users]
    sigma = gram.calibrate_release_sigma(
        target_epsilon=min(caps),
        delta=cfg.delta,
        accountant=cfg.accountant,  # type: ignore[arg-type]
    )
    choice = choose(
        list(tenant_users.values()),
        sigma / math.sqrt(shares),
        noise_mode="local",  # σ/√shares per tenant, summed over the tenants: the same as distributed noise
        epsilon=min(caps),
    )
    if choice.approach == "dp_ease" and n_items > MAX_GRAM_ITEMS:
        return ApproachChoice(
            "dp_popularity",
            f"{choice.reason}; but {n_items} items is above the Gram release limit ({MAX_GRAM_ITEMS}), "
            "so DP popularity",
            mode,
            choice.users_per_noise,
        )
    return ApproachChoice(choice.approach, choice.reason, mode, choice.users_per_noise)


def release_problem(
    weights: Weights, approach: str, n_items: int, users: int, max_users: int | None
) -> str | None:
    """Why a tenant's release must not be summed, or None."""
    keys = ("popularity",) if approach == "dp_popularity" else ("gram",)
    return shape_problem(weights, keys, n_items, users, max_users)


def shape_problem(
    weights: Weights, keys: Sequence[str], n_items: int, users: int, max_users: int | None
) -> str | None:
    """The checks every item release passes before it is summed: exactly ``keys`` ('popularity' of
    n_items, 'gram' the packed upper triangle), float32, finite, and a user count in (0, manifest]."""
    sizes = {"popularity": (n_items,), "gram": (n_items * (n_items + 1) // 2,)}
    want = {k: sizes[k] for k in keys}
    if set(weights) != set(want):
        return f"release has keys {sorted(weights)}, expected {sorted(want)}"
    for k, shape in want.items():
        v = weights[k]
        if tuple(v.shape) != shape:
            return f"{k}: shape {tuple(v.shape)} != {shape}"
        if v.dtype != np.float32:
            return f"{k}: dtype {v.dtype} is not float32"
        if not np.isfinite(v).all():
            return f"{k}: non-finite values"
    if users <= 0:
        return f"user count {users} must be positive"
    if max_users is not None and users > max_users:
        return f"user count {users} exceeds the tenant's manifest ({max_users})"
    return None


def sum_noise(sigmas: Sequence[float], shares: int) -> float:
    """Noise multiplier of the server's sum of releases with multipliers ``sigmas`` split in ``shares``."""
    return math.sqrt(sum(s * s for s in sigmas) / max(1, shares))


def fit_release(
    total: Mapping[str, np.ndarray], approach: str, *, n_items: int, users: int, sigma_sum: float, dp: bool
) -> ItemReleaseModel:
    """The server's model from the summed release ``total`` (natural units)."""
    noise = gram.ReleaseNoise(sigma=sigma_sum, pop_share=pop_share(approach))
    if approach == "dp_popularity":
        return ItemReleaseModel.from_popularity(
            np.asarray(total["popularity"], dtype=np.float64), noise.pop_std() if dp else 0.0
        )
    g = gram.unpack_gram(np.asarray(total["gram"], dtype=np.float64), n_items)
    fitted = DPEASE().fit_gram(
        g,
        offdiag_std=noise.offdiag_std() if dp and sigma_sum > 0 else 0.0,
        diag_std=noise.diag_std() if dp and sigma_sum > 0 else 0.0,
        users=users,
    )
    return ItemReleaseModel.from_ease(fitted, n_items, kind="dp_ease" if dp else "ease")

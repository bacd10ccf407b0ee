"""The server's side of the one-shot DP item release (``approach`` ``dp_ease`` / ``dp_popularity``).

* :func:`resolve_approach` — ``auto`` → the approach the frontier says is best, from public facts only
  (each tenant's user count, the ε cap, δ, the accountant, the noise mode, the catalogue size), before
  anything is released (``fedrec.shared_model.choose``); an explicit approach is kept, with the reason
  (approach ``mlp`` under DP with its head left open gets the head ``auto`` would train).
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
from fedrec.shared_model.choose import Choice, choose
from fedrec.shared_model.codec import Weights
from fedrec.shared_model.dp_item import DPEASE, DPEASERule
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.runconfig import RELEASE_APPROACHES, RunConfig

MAX_GRAM_ITEMS = gram.MAX_GRAM_ITEMS  # the default gram-limit (run config); tenants check the same limit
#: dp_two_stage's EASE ridge per user (DP-EASE's default is 0.002): chosen on validation — ml-100k random
#: split and the 30k × 40k synthetic, ε 8 / 3, SecAgg / local; docs/PRIVACY_UTILITY.md.
TWO_STAGE_LAM_PER_USER = 0.008


@dataclass(frozen=True)
class ApproachChoice:
    """What the run trains and why (written to privacy.json and printed by ``fedrec simulate``)."""

    approach: str  # mlp | dp_ease | dp_popularity | dp_two_stage
    reason: str
    noise_mode: str  # local | distributed (SecAgg+) | none
    users_per_noise: float | None = None  # the deciding index of the automatic choice
    head: str = ""  # approach mlp picked by auto: "" = the DP head (AUTO_HEAD), "ease" = the EASE-table head

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ApproachChoice:
        """The inverse of :meth:`to_json` (a resumed run's choice)."""
        upn = data.get("users_per_noise", "absent")
        return cls(
            str(data["name"]),
            str(data["reason"]),
            str(data["noise_mode"]),
            None if upn == "absent" else (math.inf if upn is None else float(upn)),
            str(data.get("head", "")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.approach, "reason": self.reason, "noise_mode": self.noise_mode}
        if self.head:
            out["head"] = self.head
        if self.users_per_noise is not None:
            out["users_per_noise"] = (
                None if math.isinf(self.users_per_noise) else round(self.users_per_noise, 1)
            )
        return out


def pop_share(approach: str, stage: int = 0) -> float:
    """ρ of the release: all of the sensitivity to popularity (dp_popularity, stage 1 of dp_two_stage)
    or to the Gram (dp_ease, stage 2 of dp_two_stage)."""
    if approach not in RELEASE_APPROACHES:
        raise FedrecError(f"{approach!r} is not an item-release approach")
    if approach == "dp_two_stage":
        if stage not in (1, 2):
            raise FedrecError(f"dp_two_stage has stages 1 and 2, got {stage!r}")
        return 1.0 if stage == 1 else 0.0
    return 1.0 if approach == "dp_popularity" else 0.0


def release_rounds(approach: str) -> int:
    """How many release rounds an item-release approach takes (two for dp_two_stage)."""
    return 2 if approach == "dp_two_stage" else 1


def release_shapes(approach: str, stage: int, n_items: int, selected: int = 0) -> dict[str, tuple[int, ...]]:
    """What a tenant's release of ``stage`` must hold: its keys and shapes."""
    if pop_share(approach, stage) == 1.0:
        return {"popularity": (n_items,)}
    m = selected if approach == "dp_two_stage" else n_items
    return {"gram": (m * (m + 1) // 2,)}


def shares_for(cfg: RunConfig, threshold: int | None) -> int:
    """Noise shares per tenant: 1 (local) without SecAgg+; the SecAgg+ threshold with it — the sum the
    server can ever unmask holds at least ``threshold`` tenants' shares, so it carries the full σ."""
    return int(threshold) if cfg.secagg and cfg.dp and threshold else 1


def _selection_words(cfg: RunConfig, n_items: int) -> str:
    """How many items dp_two_stage's Gram covers, in words (the M rule or the gram-limit)."""
    cap = min(cfg.gram_limit, n_items)
    if cfg.select_rule > 0:
        tier = (
            f", plus a tier of the next {cfg.tier - 1:g} × M scored by a ridge regression on them"
            if cfg.tier > 1
            else ""
        )
        return (
            f"M items, M by the M rule from the stage-1 release (noisy popularity ≥ {cfg.select_rule:g} × "
            f"the Gram's noise edge per item; at most {cap}){tier}"
        )
    return f"{cap} items (the gram-limit)"


#: Why ``auto`` trains the DP MLP head where ``choose()`` would release DP popularity (docs/FEDERATION.md).
HEAD_REASON = (
    "DP popularity would be released; the DP MLP head (release-init: 0.9 of ε on a DP popularity release "
    "as its prior, the public genres as its frozen item table, then DP-SGD of a weight on the dot term) "
    "beats DP popularity on validation wherever this rule falls back to it on the measured frontier "
    "(synthetic 1 000 users and ml-100k, ε 1–8, local noise and SecAgg+; docs/FEDERATION.md)"
)


#: Fewest users (all tenants) from which ``auto`` trains the EASE-table head where it would release
#: DP-EASE (docs/FEDERATION.md, "auto picks the EASE-table head").
EASE_HEAD_MIN_USERS = 5_000
#: Why ``auto`` trains the EASE-table head where ``choose()`` would release DP-EASE (docs/FEDERATION.md).
EASE_HEAD_REASON = (
    "DP-EASE would be released; the EASE-table head (release-init: 0.95 of ε on one Gram release, "
    "DP-EASE's item–item model of it as frozen tables, then cohort DP-SGD rounds of the MLP and of the "
    "100 most popular items' rows on top, its noise split into shares under SecAgg+) beats DP-EASE on "
    "validation wherever this rule picks it (synthetic 5 000–100 000 users, ε 1–8, SecAgg+ and local "
    "noise; docs/FEDERATION.md)"
)


def ease_head_applies(*, users: int, cfg: RunConfig | None = None) -> str | None:
    """Why ``auto`` may not swap DP-EASE for the EASE-table head here, or None (it may): the head was
    measured above DP-EASE from EASE_HEAD_MIN_USERS users (with local noise and under SecAgg+), and the
    settings ``cfg`` was given must make a valid head run (an explicit ``lr``, say, is refused in the
    head's cohort rounds: the run keeps DP-EASE rather than fail after the tenants' counts were charged)."""
    if users < EASE_HEAD_MIN_USERS:
        return (
            f"{users} users < {EASE_HEAD_MIN_USERS}: below that the head was not measured above DP-EASE "
            "on every data set (ml-100k: below it on validation)"
        )
    if cfg is not None:
        try:
            cfg.with_approach("mlp", "ease")
        except FedrecError as exc:
            return f"this run's settings do not fit the head: {exc}"
    return None


def head_applies(cfg: RunConfig, *, item_features: bool) -> str | None:
    """Why ``auto`` may not swap DP popularity for the DP MLP head here, or None (it may): the head was
    measured in dp-mode local-steps, and it needs public item features (genres) for its item table. It was
    measured above DP popularity with local noise and under SecAgg+ alike (the frontier's "DP MLP" column,
    docs/FEDERATION.md)."""
    if cfg.dp_mode != "local-steps":
        return f"dp-mode {cfg.dp_mode}: the head was measured with local-steps only"
    if not item_features:
        return "the catalogue has no public genres for the head's item table"
    return None


def _choose(cfg: RunConfig, tenant_users: Mapping[str, int], shares: int) -> Choice:
    """``choose()``'s rule for this federation: the release σ at the smallest cap, split in ``shares``."""
    caps = [cfg.cap_for(t) for t in tenant_users]
    sigma = gram.calibrate_release_sigma(
        target_epsilon=min(caps),
        delta=cfg.delta,
        accountant=cfg.accountant,  # type: ignore[arg-type]
    )
    return choose(
        list(tenant_users.values()),
        sigma / math.sqrt(shares),
        noise_mode="local",  # σ/√shares per tenant, summed over the tenants: the same as distributed noise
        epsilon=min(caps),
        noise_words=None if shares == 1 else f"distributed noise, σ/√{shares} per tenant",
    )


def resolve_approach(
    cfg: RunConfig,
    tenant_users: Mapping[str, int],
    n_items: int,
    *,
    shares: int = 1,
    item_features: bool = False,
) -> ApproachChoice:
    """``cfg.approach`` made concrete (module docstring). ``item_features``: the catalogue has public
    genres, so ``auto`` may train the DP MLP head where it would release DP popularity."""
    mode = "none" if not cfg.dp else ("distributed" if shares > 1 else "local")
    if cfg.approach != "auto":
        reasons: dict[str, str] = {
            "mlp": "asked for: DP-SGD rounds of the MLP" if cfg.dp else "asked for: the federated MLP",
            "dp_ease": "asked for: one item–item Gram release per tenant, DP-EASE on the server's sum",
            "dp_popularity": "asked for: one popularity release per tenant, ranked by the noisy sum",
        }
        reasons["dp_two_stage"] = (
            f"asked for: a DP popularity release ({cfg.select_share:g} of the μ² budget) selects the top "
            f"{_selection_words(cfg, n_items)}, a Gram release over them, DP-EASE; the rest ranked by "
            "DP popularity"
        )
        why = reasons[cfg.approach]
        if cfg.approach == "dp_ease" and n_items > cfg.gram_limit:
            raise FedrecError(
                f"dp_ease releases an item–item Gram: {n_items} items is above the gram-limit "
                f"({cfg.gram_limit}); use dp_two_stage, dp_popularity or mlp"
            )
        if cfg.approach == "mlp" and cfg.dp and cfg.release_init > 0:
            why = (
                f"asked for: the DP MLP head (release-init: {cfg.release_init:g} of ε on an item release "
                f"as the prior, item table {cfg.release_init_items}, then DP-SGD rounds)"
            )
        if cfg.approach == "mlp" and cfg.head_open() and tenant_users and n_items <= cfg.gram_limit:
            # the head auto would train, where it is the EASE-table head (the same rule as auto's below)
            rule = _choose(cfg, tenant_users, shares)
            if rule.approach == "dp_ease" and ease_head_applies(users=rule.users, cfg=cfg) is None:
                return ApproachChoice(
                    "mlp",
                    f"asked for: the MLP under DP, its head picked as auto picks it: {rule.reason}; "
                    f"{EASE_HEAD_REASON}",
                    mode,
                    rule.users_per_noise,
                    head="ease",
                )
        if cfg.approach == "mlp":
            # DP-SGD: local steps carry each tenant's own noise, SecAgg+ or not; cohort steps (and the
            # release-init round) split it into shares under SecAgg+, like the release approaches
            return ApproachChoice(
                "mlp", why, mode if cfg.dp_mode == "cohort" else ("local" if cfg.dp else "none")
            )
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
    choice = _choose(cfg, tenant_users, shares)
    if choice.approach == "dp_ease" and n_items > cfg.gram_limit:
        return ApproachChoice(
            "dp_two_stage",
            f"{choice.reason}; but {n_items} items is above the gram-limit ({cfg.gram_limit}), so two stages: "
            f"DP popularity ({cfg.select_share:g} of the μ² budget) selects the top "
            f"{_selection_words(cfg, n_items)}, DP-EASE on their Gram, the other items ranked below them by "
            "DP popularity",
            mode,
            choice.users_per_noise,
        )
    if choice.approach == "dp_ease":
        why_not = ease_head_applies(users=choice.users, cfg=cfg)
        if why_not is None:
            return ApproachChoice(
                "mlp", f"{choice.reason}; {EASE_HEAD_REASON}", mode, choice.users_per_noise, head="ease"
            )
        return ApproachChoice(
            choice.approach,
            f"{choice.reason} (not the EASE-table head: {why_not})",
            mode,
            choice.users_per_noise,
        )
    if choice.approach == "dp_popularity":
        why_not = head_applies(cfg, item_features=item_features)
        if why_not is None:
            return ApproachChoice("mlp", f"{choice.reason}; {HEAD_REASON}", mode, choice.users_per_noise)
        return ApproachChoice(
            choice.approach, f"{choice.reason} (not the DP MLP head: {why_not})", mode, choice.users_per_noise
        )
    return ApproachChoice(choice.approach, choice.reason, mode, choice.users_per_noise)


def release_problem(
    weights: Weights, want: Mapping[str, tuple[int, ...]], users: int, max_users: int | None
) -> str | None:
    """Why a tenant's release must not be summed (``want``: :func:`release_shapes`), or None: exactly
    the keys and shapes of ``want`` ('popularity' (N,), 'gram' the packed upper triangle), float32,
    finite, and a user count in (0, manifest]."""
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


def two_stage_size(
    popularity: np.ndarray, sigma_sum: float, select_share: float, cap: int, c: float
) -> tuple[int, str]:
    """dp_two_stage's M rule: how many items the stage-2 Gram covers, from the stage-1 release.

    ``popularity``: the summed stage-1 release Σ_u x_u + noise (natural units, x_u = 1/√n_u on u's
    items); ``sigma_sum``: its noise multiplier (0 without DP). The stage-2 release spends the rest of
    the μ² budget, so the sum's Gram carries off-diagonal noise s₂ = σ₁·√(f/(1−f))/√2 (f =
    ``select_share``), and the noise part of an M × M Gram has spectral edge 2·s₂·√M. The rule keeps
    the largest M ≤ ``cap`` whose M-th noisy popularity is ≥ c·s₂·√M: items whose released mass is
    below c × the noise edge per item add Gram rows the spectrum cannot tell from noise (and every
    item added raises the edge for all). Post-processing of the stage-1 release and the run config.
    Returns (M, why) with 2 ≤ M ≤ cap (M = cap without noise).
    """
    cap = int(cap)
    p = np.sort(np.asarray(popularity, dtype=np.float64))[::-1][:cap]  # (≤ cap,) descending
    if sigma_sum <= 0:
        return cap, f"M = {cap}: no noise, so every item up to the gram-limit"
    s2 = gram.ReleaseNoise(sigma=sigma_sum * math.sqrt(select_share / (1 - select_share)), pop_share=0.0)
    edge = c * s2.offdiag_std() * np.sqrt(np.arange(1, len(p) + 1))  # (≤ cap,) c·s₂·√m
    above = np.flatnonzero(p >= edge)
    m = max(min(2, cap), int(above[-1]) + 1 if above.size else 0)
    why = (
        f"M = {m}: the items whose stage-1 noisy popularity is ≥ {c:g} × the Gram's noise edge per item "
        f"s₂·√M = {s2.offdiag_std():.3g}·√M (= {m and p[m - 1]:.3g} ≥ {c * s2.offdiag_std() * math.sqrt(m):.3g} "
        f"at M = {m})"
    )
    if m == cap and cap < len(popularity) and above.size == len(p):
        why += f", capped at the gram-limit ({cap})"
    return m, why


def tier_size(m: int, tier: float, cap: int) -> tuple[int, str]:
    """How many items dp_two_stage's Gram covers when the M rule picked ``m``: ``tier`` × m, at most
    ``cap`` (the gram-limit) and at least m. DP-EASE fits the top m of them with the head's own noise
    edge; the others (the tier) are scored by a ridge regression on the head
    (:meth:`fedrec.shared_model.dp_item.DPEASE.fit_gram_tiered`). Post-processing, like the M rule.
    Returns (items covered, why)."""
    covered = min(int(cap), max(int(m), round(float(tier) * m)))
    if covered <= m:
        return m, ""
    return covered, (
        f"the Gram covers {covered} items ({tier:g} × M{', capped at the gram-limit' if covered == cap else ''}): "
        f"DP-EASE fits the top {m}, the next {covered - m} are scored by a ridge regression on them"
    )


def sum_noise(sigmas: Sequence[float], shares: int) -> float:
    """Noise multiplier of the server's sum of releases with multipliers ``sigmas`` split in ``shares``."""
    return math.sqrt(sum(s * s for s in sigmas) / max(1, shares))


def fit_release(
    total: Mapping[str, np.ndarray],
    approach: str,
    *,
    n_items: int,
    users: int,
    sigma_sum: float,
    dp: bool,
    stage: int = 0,
    selection: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    shrinkage: str = "soft",
    rule: DPEASERule | None = None,
    select: int = 0,
    head: int = 0,
) -> ItemReleaseModel:
    """The server's model from the summed release ``total`` (natural units).

    dp_two_stage: stage 1 gives the DP popularity model (whose prior selects stage 2's items); stage 2
    fits DP-EASE on the Gram of the ``selection`` (its support mapped back to catalogue indices) and
    ranks every other item below by ``prior`` (the stage-1 log-prior). ``select``: stage 1's model
    records how many items stage 2 selects (:func:`two_stage_size`; 0 = the gram-limit); ``head``:
    stage 1 records, and stage 2 is given, how many of them (the top by ``prior``) DP-EASE fits — the
    rest of the selection is a tier scored by a regression on them (:meth:`DPEASE.fit_gram_tiered`;
    0 = no tier, the whole selection is the head).
    """
    noise = gram.ReleaseNoise(sigma=sigma_sum, pop_share=pop_share(approach, stage))
    if noise.pop_share == 1.0:
        return ItemReleaseModel.from_popularity(
            np.asarray(total["popularity"], dtype=np.float64),
            noise.pop_std() if dp else 0.0,
            select=select,
            head=head,
        )
    m = n_items if selection is None else len(selection)
    g = gram.unpack_gram(np.asarray(total["gram"], dtype=np.float64), m)
    rule = rule or DPEASERule(
        max_items=max(DPEASERule().max_items, m),
        lam_per_user=TWO_STAGE_LAM_PER_USER if approach == "dp_two_stage" else DPEASERule().lam_per_user,
    )
    off = noise.offdiag_std() if dp and sigma_sum > 0 else 0.0
    dia = noise.diag_std() if dp and sigma_sum > 0 else 0.0
    ease = DPEASE(rule=rule, shrinkage=shrinkage)
    if stage == 2 and selection is not None and prior is not None and 0 < head < m:
        # the top `head` of the selection by the stage-1 prior (public), as positions in the selection
        top = np.sort(np.argsort(-np.asarray(prior, dtype=np.float64)[selection], kind="stable")[:head])
        fitted = ease.fit_gram_tiered(g, top, offdiag_std=off, diag_std=dia, users=users)
    else:
        fitted = ease.fit_gram(g, offdiag_std=off, diag_std=dia, users=users)
    if selection is not None:
        assert fitted.items is not None
        fitted.items = np.asarray(selection, dtype=np.int64)[fitted.items]  # support → catalogue indices
    return ItemReleaseModel.from_ease(fitted, n_items, kind="dp_ease" if dp else "ease", prior=prior)

"""``fedrec audit --empirical`` on a run of the item release (``dp_ease`` / ``dp_popularity``).

The release is one Gaussian mechanism (``fedrec.privacy.gram``): each user's unit row moves the scaled
release by exactly 1 in L2 and every coordinate gets ``N(0, σ²)``, so it is μ-Gaussian DP with
μ = 1/σ. This audit checks that claim on the code that produces the release message:

1. **Replica tenant.** A synthetic tenant (``--release-users`` users over ``--release-items`` items,
   the built-in generator: the coordinator never has the tenant's data), plus one canary user with
   ``--release-canary-items`` distinct items. ``D_out`` is the replica, ``D_in`` the replica and the
   canary.
2. **T trials of the release function itself** — by default ``fedrec.client.task.release_message``,
   the function every tenant calls between its data and the message it sends — each on ``D_in`` or
   ``D_out`` (T/2 each, shuffled), with fresh noise (a new generator per call). In distributed-noise
   mode (SecAgg+, ``shares`` = k > 1 in the ledger) each trial is the sum the server can unmask: the
   canary's tenant and k − 1 others, each adding σ/√k. Before each trial the tenant also releases
   ``D_out`` once ("its previous release"), so that noise shared between two releases shows.
3. **Statistic.** Each message is projected on the canary's contribution ``u`` (its unit row): the
   popularity on ``⟨p, u⟩``, the Gram on ``Σ u_i² G_ii`` and ``Σ_{i≠j} u_i u_j G_ij`` — for the
   current and the previous release. Fisher's linear discriminant, fitted on ``--fit-fraction`` of
   the trials, combines them (for a correct release it is the likelihood-ratio test; for a broken one
   it finds the leak, e.g. a direction without noise); the rest of the trials are scored with it.
4. **Bounds** on the held-out trials, each at confidence 1 − β/2 so that both hold together at 1 − β:
   Clopper–Pearson on the FPR/FNR of the threshold chosen on the fit trials (no assumption), and the
   μ of Gaussian DP fitted to the two score samples with its noncentral-t lower bound, turned into ε
   at the run's δ (exact when the scores are Gaussian, as a correct release makes them). The audit
   fails when either bound exceeds the claimed ε, or when two releases of the same data are
   bit-identical (the noise is not fresh).

The release function is a parameter (``release_fn``; the CLI's ``--release-mechanism MODULE:FUNC``):
any function with the signature of ``release_message`` whose message holds ``popularity`` and/or
``gram`` keys can be audited — the mutation tests plant broken ones through it, and a two-stage
release only needs its function (and the projections of any new key) to be audited the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedrec.privacy import gram
from fedrec.privacy.audit import Check, Finding, read_ledger
from fedrec.privacy.empirical import (
    GaussianFit,
    best_threshold,
    epsilon_lower_bound_clopper_pearson,
    fisher_direction,
    gaussian_fit,
    gdp_epsilon,
    roc_points,
)
from fedrec.simulations.reports.errors import AuditError


class RunFiles(Protocol):
    """What the release audit reads of a run (``fedrec.simulations.reports.audit.RunFiles`` has it)."""

    ledgers: dict[str, Path]
    model: dict[str, Any] | None
    privacy: dict[str, Any]

    @property
    def tenants(self) -> list[str]: ...


#: (indptr, items, n_items, noise, rng) → the published message (``fedrec.client.task.release_message``).
ReleaseFn = Callable[
    [np.ndarray, np.ndarray, int, gram.ReleaseNoise, np.random.Generator], Mapping[str, np.ndarray]
]
DEFAULT_MECHANISM = "fedrec.client.task:release_message"
Log = Callable[[str], None]


def _error(message: str) -> Exception:
    return AuditError(message)


def load_release_fn(spec: str | None) -> tuple[ReleaseFn, str]:
    """The release function named ``module:function`` (default: the product's), and its name."""
    name = spec or DEFAULT_MECHANISM
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise _error(f"--release-mechanism must be MODULE:FUNCTION, got {name!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise _error(f"cannot import {module} for --release-mechanism ({err})") from None
    except AttributeError:
        raise _error(f"{module} has no {attr!r} (--release-mechanism)") from None
    if not callable(fn):
        raise _error(f"--release-mechanism {name} is not a function")
    return fn, name


# ---------------------------------------------------------------- the claim


@dataclass(frozen=True)
class ReleaseClaim:
    """What a tenant's ledger says its release was (or what a script asks for)."""

    tenant: str
    approach: str  # dp_ease | dp_popularity
    sigma: float  # noise multiplier of the sum the server sees (sensitivity 1)
    pop_share: float
    shares: int  # 1 = local noise; k > 1 = distributed (SecAgg+): each tenant adds σ/√k
    delta: float
    accountant: str
    epsilon: float  # the claimed ε of the release (ledger)
    epsilon_if_alone: float  # if the server saw this tenant's share alone
    users: int
    n_items: int

    @property
    def mu(self) -> float:
        """μ of Gaussian DP the claim implies: 1/σ (sensitivity 1, one release)."""
        return 1.0 / self.sigma

    @property
    def noise_mode(self) -> str:
        return "distributed" if self.shares > 1 else "local"


def claim_for(
    *, epsilon: float, delta: float = 1e-5, approach: str = "dp_ease", shares: int = 1,
    users: int = 1000, n_items: int = 300, accountant: str = "prv",
) -> ReleaseClaim:  # fmt: skip
    """The claim a tenant would record releasing at ``epsilon`` (σ calibrated as the product does)."""
    from fedrec.privacy.accounting import epsilon as account
    from fedrec.server.release import pop_share

    sigma = gram.calibrate_release_sigma(target_epsilon=epsilon, delta=delta, accountant=accountant)  # type: ignore[arg-type]
    eps = account(history=[(sigma, 1.0, 1)], delta=delta, accountant=accountant)  # type: ignore[arg-type]
    alone = account(history=[(sigma / math.sqrt(shares), 1.0, 1)], delta=delta, accountant=accountant)  # type: ignore[arg-type]
    return ReleaseClaim(
        "replica", approach, sigma, pop_share(approach), shares, delta, accountant, eps, alone, users, n_items
    )


def release_claim(run: RunFiles, tenant: str) -> ReleaseClaim:
    """The release entry of ``tenant``'s ledger as a claim; :class:`AuditError` when there is none."""
    path = run.ledgers.get(tenant)
    led = read_ledger(path) if path is not None else None
    entries = [
        e
        for e in (led.entries if led else [])
        if isinstance(e, dict) and str(e.get("mechanism", "")).startswith("gaussian:item_release")
    ]
    if not entries:
        raise _error(f"tenant {tenant} has no release entry in its ledger: nothing to audit empirically")
    e = entries[-1]
    n_items = (run.model or {}).get("n_items")
    try:
        return ReleaseClaim(
            tenant=tenant,
            approach=str(run.privacy["approach"]["name"]),
            sigma=float(e["noise_multiplier"]),
            pop_share=float(e["pop_share"]),
            shares=int(e.get("shares", 1)),
            delta=float(e["delta"]),
            accountant=str(e["accountant"]),
            epsilon=float(e["epsilon"]),
            epsilon_if_alone=float(e["epsilon_if_alone"] if "epsilon_if_alone" in e else e["epsilon"]),
            users=int(e["users"]),
            n_items=int(n_items) if isinstance(n_items, int) else 300,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise _error(f"the release entry of {tenant} lacks a field the audit needs: {err}") from None


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class ReleaseAuditConfig:
    """The release experiment (module docstring). ``None`` sizes come from the run."""

    trials: int = 2000  # releases in all, half with the canary
    users: int | None = None  # replica users (default: the tenant's, from the ledger)
    items: int | None = None  # replica items (default: the run's catalogue, at most 300)
    canary_items: int | None = None  # the canary's distinct items (default: min(100, items/2))
    mechanism: str | None = None  # MODULE:FUNCTION of the release (default: the product's)
    fit_fraction: float = 0.2  # trials that fit the discriminant and the threshold
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trials < 20:
            raise _error(f"--trials must be at least 20, got {self.trials}")
        if self.users is not None and self.users < 1:
            raise _error(f"--release-users must be ≥ 1, got {self.users}")
        if self.items is not None and self.items < 10:
            raise _error(f"--release-items must be ≥ 10, got {self.items}")
        if self.canary_items is not None and self.canary_items < 1:
            raise _error(f"--release-canary-items must be ≥ 1, got {self.canary_items}")
        if not 0.05 <= self.fit_fraction <= 0.5:
            raise _error(f"the fit fraction must be in [0.05, 0.5], got {self.fit_fraction}")
        if not 0 < self.confidence < 1:
            raise _error(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass
class ReleaseAuditResult:
    claim: ReleaseClaim
    mechanism: str
    trials: int
    users: int
    items: int
    canary_items: int
    features: list[str]
    n_fit: int
    scores_in: list[float]  # held-out trials, with the canary
    scores_out: list[float]  # held-out trials, without
    fit: GaussianFit  # at confidence 1 − β/2
    epsilon_gaussian_lb: float  # ε at δ of fit.mu_lb
    epsilon_cp_lb: float  # Clopper–Pearson at 1 − β/2
    threshold: float
    confidence: float
    repeated_releases: int  # releases of D_out that were bit-identical to an earlier one
    releases_of_d_out: int
    seconds: float
    roc: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    @property
    def epsilon_lb(self) -> float:
        """max of the two bounds; together they hold at ``confidence``."""
        return max(self.epsilon_cp_lb, self.epsilon_gaussian_lb)

    @property
    def tenant(self) -> str:
        return self.claim.tenant

    def checks(self) -> list[Check]:
        t = self.claim.tenant
        out = []
        if self.repeated_releases:
            msg = (
                f"{self.repeated_releases} of {self.releases_of_d_out} releases of the same data were "
                "bit-identical to an earlier one: the noise is not fresh (reused or seeded from public facts)"
            )
            out.append(Check("release_fresh_noise", t, (Finding("release_fresh_noise", t, None, None, msg),)))
        else:
            out.append(
                Check("release_fresh_noise", t, (), f"{self.releases_of_d_out} releases of D_out all differ")
            )
        if self.epsilon_lb > self.claim.epsilon:
            which = "Gaussian-DP fit" if self.epsilon_gaussian_lb >= self.epsilon_cp_lb else "Clopper–Pearson"
            msg = (
                f"the release shows ε ≥ {_num(self.epsilon_lb)} ({which}, {self.confidence:.0%} confidence, "
                f"{self.trials} trials; μ fitted {_num(self.fit.mu)} ≥ {_num(self.fit.mu_lb)} vs claimed "
                f"{self.claim.mu:.3f}), above the claimed ε {self.claim.epsilon:.3f}"
            )
            out.append(Check("release_lower_bound", t, (Finding("release_lower_bound", t, None, None, msg),)))
        else:
            out.append(
                Check(
                    "release_lower_bound",
                    t,
                    (),
                    f"ε_lb {self.epsilon_lb:.3f} ≤ claimed {self.claim.epsilon:.3f} "
                    f"(μ fitted {_num(self.fit.mu)} vs claimed {self.claim.mu:.3f})",
                )
            )
        return out

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks())

    def verdict(self) -> str:
        """The audit's finding in one sentence."""
        c = self.claim
        what = f"the {c.approach} release of {c.tenant} ({c.noise_mode} noise, {self.mechanism})"
        if self.repeated_releases:
            return (
                f"FAIL: {what} is broken — releases of the same data repeat bit for bit, so its noise "
                f"protects nothing (ε ≥ {_num(self.epsilon_lb)} from {self.trials} trials vs claimed "
                f"{c.epsilon:.2f})."
            )
        if self.epsilon_lb > c.epsilon:
            return (
                f"FAIL: {what} leaks more than claimed — {self.trials} trials show ε ≥ "
                f"{_num(self.epsilon_lb)} at {self.confidence:.0%} confidence against a claimed ε of "
                f"{c.epsilon:.2f} (fitted μ {_num(self.fit.mu)} vs claimed {c.mu:.3f})."
            )
        return (
            f"PASS: {what} behaves as claimed — the strongest test over {self.trials} trials reaches "
            f"ε ≥ {self.epsilon_lb:.2f} at {self.confidence:.0%} confidence, below the claimed ε of "
            f"{c.epsilon:.2f} (fitted μ {_num(self.fit.mu)} vs claimed {c.mu:.3f})."
        )

    def to_json(self) -> dict[str, Any]:
        c = self.claim
        return {
            "tenant": c.tenant,
            "approach": c.approach,
            "noise_mode": c.noise_mode,
            "shares": c.shares,
            "mechanism": self.mechanism,
            "claimed_epsilon": c.epsilon,
            "claimed_epsilon_if_alone": c.epsilon_if_alone,
            "delta": c.delta,
            "accountant": c.accountant,
            "unit": "user",
            "sigma": c.sigma,
            "claimed_mu": c.mu,
            "fitted_mu": _finite(self.fit.mu),
            "fitted_mu_lb": _finite(self.fit.mu_lb),
            "epsilon_lower_bound": _finite(self.epsilon_lb),
            "epsilon_gaussian_lb": _finite(self.epsilon_gaussian_lb),
            "epsilon_clopper_pearson_lb": _finite(self.epsilon_cp_lb),
            "confidence": self.confidence,
            "trials": self.trials,
            "fit_trials": self.n_fit,
            "replica": {"users": self.users, "items": self.items, "canary_items": self.canary_items},
            "features": self.features,
            "repeated_releases": self.repeated_releases,
            "releases_of_d_out": self.releases_of_d_out,
            "seconds": round(self.seconds, 3),
            "passed": self.passed,
            "verdict": self.verdict(),
        }


def _num(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.3f}"


def _finite(x: float) -> float | str:
    return "inf" if math.isinf(x) else float(x)


def _replica(users: int, items: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, items) of the synthetic replica and the canary's k distinct items."""
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.sources import synthetic

    split = prepare_dataset(synthetic(users=users, items=items, seed=seed)).split
    if split.n_items != items:
        raise _error(f"the replica generator gave {split.n_items} items, not {items}")
    rng = np.random.default_rng([seed, 1])
    canary = np.sort(rng.choice(items, size=k, replace=False)).astype(np.int64)
    return np.asarray(split.indptr, np.int64), np.asarray(split.train_items, np.int64), canary


class _Projector:
    """Projections of a release message on the canary's unit row u (k items, 1/√k each)."""

    def __init__(self, canary: np.ndarray, n_items: int) -> None:
        self.canary = canary
        k = len(canary)
        self.w = 1.0 / math.sqrt(k)
        i, j = np.triu_indices(k)
        a, b = canary[i], canary[j]  # a ≤ b since canary is sorted
        pos = a * n_items - a * (a - 1) // 2 + (b - a)  # row-major packed upper triangle
        self.diag_pos = pos[i == j]
        self.off_pos = pos[i != j]
        self.n_packed = n_items * (n_items + 1) // 2
        self.n_items = n_items

    def names(self, keys: list[str]) -> list[str]:
        out = []
        for key in keys:
            out += ["popularity·u"] if key == "popularity" else ["Σu²G_ii", "Σu_iu_jG_ij"]
        return out

    def __call__(self, message: Mapping[str, np.ndarray]) -> np.ndarray:
        feats: list[float] = []
        for key in sorted(message):
            v = np.asarray(message[key], dtype=np.float64)
            if key == "popularity":
                if v.shape != (self.n_items,):
                    raise _error(f"release key popularity has shape {v.shape}, expected ({self.n_items},)")
                feats.append(self.w * float(v[self.canary].sum()))
            elif key == "gram":
                if v.shape != (self.n_packed,):
                    raise _error(f"release key gram has shape {v.shape}, expected ({self.n_packed},)")
                feats.append(self.w**2 * float(v[self.diag_pos].sum()))
                feats.append(2 * self.w**2 * float(v[self.off_pos].sum()))
            else:
                raise _error(f"release key {key!r} has no canary projection (known: popularity, gram)")
        return np.asarray(feats)


def _digest(message: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(message):
        h.update(key.encode())
        h.update(np.ascontiguousarray(message[key]).tobytes())
    return h.digest()


def run_release_audit(
    claim: ReleaseClaim,
    cfg: ReleaseAuditConfig,
    *,
    release_fn: ReleaseFn | None = None,
    log: Log = lambda _: None,
) -> ReleaseAuditResult:
    """The experiment of the module docstring on ``claim`` (``release_fn`` overrides ``cfg.mechanism``)."""
    t0 = time.perf_counter()
    if release_fn is None:
        release_fn, name = load_release_fn(cfg.mechanism)
    else:
        name = getattr(release_fn, "__qualname__", "release_fn")
    items = cfg.items or min(claim.n_items, 300)
    items = max(items, 10)
    k = cfg.canary_items or max(1, min(100, items // 2))
    if k > items:
        raise _error(f"the canary's {k} items do not fit in a replica of {items} items")
    if claim.pop_share < 1 and items > gram.MAX_GRAM_ITEMS:
        raise _error(f"a Gram release of {items} items is above the limit ({gram.MAX_GRAM_ITEMS})")
    users = cfg.users or claim.users
    log(f"release audit: replica of {users} users × {items} items, a canary with {k} items …")
    indptr, hist, canary = _replica(users, items, k, cfg.seed)
    d_out = (indptr, hist)
    d_in = (np.append(indptr, indptr[-1] + k), np.concatenate([hist, canary]))
    noise = gram.ReleaseNoise(sigma=claim.sigma, pop_share=claim.pop_share, shares=claim.shares)
    project = _Projector(canary, items)
    seeds = np.random.SeedSequence([cfg.seed, 2])
    order = np.random.default_rng(seeds.spawn(1)[0]).permutation(
        np.arange(cfg.trials) < cfg.trials // 2
    )  # True = the canary is in

    def view(data: tuple[np.ndarray, np.ndarray], seq: np.random.SeedSequence) -> Mapping[str, np.ndarray]:
        """What the server sees: this tenant's message, plus the other k − 1 shares under SecAgg+."""
        rngs = [np.random.default_rng(s) for s in seq.spawn(claim.shares)]
        msg = dict(release_fn(data[0], data[1], items, noise, rngs[0]))
        for r in rngs[1:]:  # the other tenants' releases (their data does not matter, their noise does)
            other = release_fn(d_out[0], d_out[1], items, noise, r)
            msg = {key: msg[key] + np.asarray(other[key]) for key in msg}
        return msg

    feats = []
    digests: set[bytes] = set()
    repeated = 0
    n_d_out = 0
    keys: list[str] = []
    for t, included in enumerate(order):
        prev_seq, cur_seq = seeds.spawn(2)
        prev = view(d_out, prev_seq)  # the tenant's previous release of the same users
        cur = view(d_in if included else d_out, cur_seq)
        if not keys:
            keys = sorted(cur)
        for msg in (prev, cur) if not included else (prev,):
            d = _digest(msg)
            repeated += d in digests
            digests.add(d)
            n_d_out += 1
        feats.append(np.concatenate([project(cur), project(prev)]))
        if (t + 1) % max(1, cfg.trials // 10) == 0:
            log(f"release audit: {t + 1}/{cfg.trials} trials ({time.perf_counter() - t0:.0f} s)")
    x = np.asarray(feats)
    inc = np.asarray(order)
    n_fit = max(4, round(cfg.fit_fraction * cfg.trials))
    fit_in, fit_out = x[:n_fit][inc[:n_fit]], x[:n_fit][~inc[:n_fit]]
    if len(fit_in) < 2 or len(fit_out) < 2:
        raise _error("too few trials to fit the discriminant: raise --trials")
    w = fisher_direction(fit_in, fit_out)
    scores = x @ w
    beta = 1.0 - cfg.confidence
    half = 1.0 - beta / 2  # each bound at 1 − β/2: both hold together at 1 − β
    thr = best_threshold(
        scores[:n_fit][inc[:n_fit]], scores[:n_fit][~inc[:n_fit]], delta=claim.delta, confidence=half
    )
    s_in, s_out = scores[n_fit:][inc[n_fit:]], scores[n_fit:][~inc[n_fit:]]
    tp = int((s_in > thr).sum())
    fp = int((s_out > thr).sum())
    cp = epsilon_lower_bound_clopper_pearson(
        tp=tp, fp=fp, tn=len(s_out) - fp, fn=len(s_in) - tp, delta=claim.delta, confidence=half
    )
    fit = gaussian_fit(s_in, s_out, confidence=half)
    fpr, tpr = roc_points(s_in, s_out)
    return ReleaseAuditResult(
        claim=claim,
        mechanism=name,
        trials=cfg.trials,
        users=users,
        items=items,
        canary_items=k,
        features=[f"current {f}" for f in project.names(keys)]
        + [f"previous {f}" for f in project.names(keys)],
        n_fit=n_fit,
        scores_in=[float(v) for v in s_in],
        scores_out=[float(v) for v in s_out],
        fit=fit,
        epsilon_gaussian_lb=gdp_epsilon(fit.mu_lb, claim.delta),
        epsilon_cp_lb=cp,
        threshold=thr,
        confidence=cfg.confidence,
        repeated_releases=repeated,
        releases_of_d_out=n_d_out,
        seconds=time.perf_counter() - t0,
        roc=([float(v) for v in fpr], [float(v) for v in tpr]),
    )


def release_audit(
    run: RunFiles, cfg: ReleaseAuditConfig, *, tenant: str | None = None, log: Log = lambda _: None
) -> ReleaseAuditResult:
    """Audit the release of ``tenant`` (default: the first) of a release run."""
    name = tenant or (run.tenants[0] if run.tenants else None)
    if name is None or name not in run.tenants:
        raise _error(f"tenant {tenant!r} is not in this run (tenants: {', '.join(run.tenants)})")
    return run_release_audit(release_claim(run, name), cfg, log=log)

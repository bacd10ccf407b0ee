"""``fedrec audit --empirical`` on a DP-SGD run: white-box Dirac gradient canaries, many in one run.

The data canaries of ``fedrec.simulations.reports.audit`` (synthetic users with their own items,
scored by the final model) give an ε lower bound of 0 at the ε users run: a canary's gradient is
mixed into the shared MLP and its signal is lost in the noise of every other coordinate. This
audit follows the white-box setting of Steinke, Nasr and Jagielski (2023, "Privacy auditing with one
(1) training run"): the auditor writes the canaries' gradients and reads the released iterates.

1. **Dedicated coordinates.** The replica model (the run's architecture, a synthetic tenant of
   ``--dpsgd-real-users`` users) gets one extra table of ``m`` scalars, one per canary, that no
   forward pass of a real user touches: no real user's gradient has a component there, ever.
2. **Canaries through the real DP path.** Each canary is included with probability ½; included
   canaries are users of the tenant, Poisson-sampled with the real users by ``train_round`` at the
   run's rate q, for the run's steps and rounds. A sampled canary's per-user loss is ``−G·C·w_j`` on its
   own coordinate (raw gradient norm G·C, G = ``--dpsgd-canary-norm`` > 1), which goes through the
   product's per-user clipping (``FastClipper``) to norm C and into Opacus'
   ``DPOptimizerFastGradientClipping``: noise σ·C on every coordinate, scaling, Adam. Nothing of the
   product is patched; the only hooks are ``train_round``'s ``canaries`` and ``make_trainer``
   (the trainer factory, swapped only to plant a broken mechanism).
3. **Observation.** Opacus' step hook reads each step's privatized gradient on the canary table
   (the model's change on those coordinates before Adam, which is post-processing): in units of C
   it is ``x_t = c·b_t + σ·z_t`` with ``b_t`` = "sampled at step t" (never for an excluded canary).
4. **Scores and bounds** (each at confidence ``1 − β/3``, so that all three hold together at ``1 − β``):

   * ``dpsgd_lower_bound`` — the score of a canary is the log-likelihood ratio of its observations
     under the claimed mechanism, ``Σ_t log(1 − q + q·exp((x_t − ½)/σ²))``; the one-run theorem
     (``fedrec.privacy.empirical.one_run_audit``) turns the guesses on the top and bottom scores into
     an ε lower bound that holds for ANY mechanism that is ε-DP in each canary (no assumption on
     the noise). Fails when it exceeds the claimed ε.
   * ``dpsgd_noise`` — an excluded canary's coordinate receives pure noise: ``m/2 × steps`` draws
     whose standard deviation (in units of σ·C) is bounded above with the χ² distribution; fails when
     even the upper bound is below 1 (less noise than claimed). The ε that the bound on the noise
     implies (at the claimed q, steps and C) is reported as a parametric lower bound.
   * ``dpsgd_clipping`` — an included canary adds ``q·c`` per step on average; ``c``, its
     contribution in units of C, is bounded below; fails when the lower bound exceeds 1 (a canary
     moved the model by more than the clipping bound).

The replica trains the tenant alone, rounds one after the other (no averaging with other tenants):
the strongest position for the attacker, the same mechanism for the accountant. The claim audited is
the ε of the DP-SGD rounds in the ledger (σ, q, steps per round), recomputed with the run's
accountant; the round-0 noisy user count, the DP evaluation and a ``--release-init`` release are
other mechanisms in the same ledger and are not part of it (only the DP-SGD part is audited here).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import stats

from fedrec.privacy.audit import Check, Finding, read_ledger
from fedrec.privacy.empirical import OneRunResult, one_run_audit
from fedrec.privacy.mechanisms import is_side_entry
from fedrec.simulations.reports.errors import AuditError

DEFAULT_TRAINER = "fedrec.client.train:make_private_trainer"
Log = Callable[[str], None]


class RunFiles(Protocol):
    """What this audit reads of a run (``fedrec.simulations.reports.audit.RunFiles`` has it)."""

    ledgers: dict[str, Any]
    model: dict[str, Any] | None
    privacy: dict[str, Any]
    run_config: dict[str, Any]

    @property
    def tenants(self) -> list[str]: ...


# ---------------------------------------------------------------- the claim


@dataclass(frozen=True)
class DPSGDClaim:
    """The DP-SGD mechanism a tenant's ledger records (or a script asks for)."""

    tenant: str
    sigmas: tuple[float, ...]  # noise multiplier of each round
    sample_rate: float  # Poisson rate q over users
    steps: int  # per round
    max_grad_norm: float  # C
    delta: float
    accountant: str
    epsilon: float  # of these rounds, recomputed with ``accountant``
    n_items: int = 200  # replica catalogue (the run's, when known)
    model: dict[str, Any] = field(default_factory=dict)  # run-config keys: dim, hidden, lr, …

    @property
    def total_steps(self) -> int:
        return self.steps * len(self.sigmas)


def _account(sigmas: tuple[float, ...], q: float, steps: int, delta: float, accountant: str) -> float:
    from fedrec.privacy.accounting import epsilon

    return float(epsilon(history=[(s, q, steps) for s in sigmas], delta=delta, accountant=accountant))  # type: ignore[arg-type]


def claim_for(
    *, epsilon: float, sample_rate: float = 0.2, steps: int = 5, rounds: int = 5, delta: float = 1e-5,
    accountant: str = "prv", max_grad_norm: float = 1.0, n_items: int = 200,
) -> DPSGDClaim:  # fmt: skip
    """The claim of a tenant that trains ``rounds`` × ``steps`` at rate q under an ε cap (σ as the product calibrates it)."""
    from fedrec.privacy.accounting import calibrate_noise

    sigma = calibrate_noise(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps * rounds,
        accountant=accountant,  # type: ignore[arg-type]
    )  # fmt: skip
    sigmas = (float(sigma),) * rounds
    eps = _account(sigmas, sample_rate, steps, delta, accountant)
    return DPSGDClaim("replica", sigmas, sample_rate, steps, max_grad_norm, delta, accountant, eps, n_items)


_MODEL_KEYS = ("dim", "hidden", "lr", "max-history", "targets", "negatives")


def dpsgd_claim(run: RunFiles, tenant: str) -> DPSGDClaim:
    """The DP-SGD rounds of ``tenant``'s ledger as a claim; :class:`AuditError` when there are none."""
    path = run.ledgers.get(tenant)
    led = read_ledger(path) if path is not None else None
    entries = [
        e
        for e in (led.entries if led else [])
        if isinstance(e, dict)
        and "steps" in e
        and not str(e.get("mechanism", "")).startswith("gaussian:item_release")
        and not is_side_entry(e)  # the round-0 count and the DP evaluation are not DP-SGD rounds
    ]
    if not entries:
        raise AuditError(f"tenant {tenant} has no DP-SGD round in its ledger: nothing to audit with canaries")
    try:
        rates = {float(e["sample_rate"]) for e in entries}
        steps = {int(e["steps"]) for e in entries}
        norms = {float(e["max_grad_norm"]) for e in entries}
        if len(rates) != 1 or len(steps) != 1 or len(norms) != 1:
            raise AuditError(
                f"tenant {tenant}'s rounds differ in q, steps or C ({sorted(rates)}, {sorted(steps)}, "
                f"{sorted(norms)}): the canary replica replays one plan"
            )
        sigmas = tuple(float(e["noise_multiplier"]) for e in entries)
        delta, accountant = float(entries[-1]["delta"]), str(entries[-1]["accountant"])
    except (KeyError, TypeError, ValueError) as err:
        raise AuditError(
            f"a DP-SGD entry of {tenant}'s ledger lacks a field the audit needs: {err}"
        ) from None
    if min(sigmas) <= 0:
        raise AuditError(f"tenant {tenant} recorded σ = 0: there is no noise to audit")
    q, n_steps = rates.pop(), steps.pop()
    n_items = (run.model or {}).get("n_items")
    return DPSGDClaim(
        tenant=tenant,
        sigmas=sigmas,
        sample_rate=q,
        steps=n_steps,
        max_grad_norm=norms.pop(),
        delta=delta,
        accountant=accountant,
        epsilon=_account(sigmas, q, n_steps, delta, accountant),
        n_items=int(n_items) if isinstance(n_items, int) else 200,
        model={k: run.run_config[k] for k in _MODEL_KEYS if k in run.run_config},
    )


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class GradientAuditConfig:
    """The white-box canary experiment (module docstring)."""

    canaries: int = 2000  # m; each included with probability ½
    real_users: int = 200  # synthetic users of the replica tenant (their gradients never touch the canaries)
    canary_norm: float = 10.0  # G: a canary's raw gradient norm in units of C (clipping brings it to C)
    trainer: str | None = None  # MODULE:FUNCTION of the trainer factory (default: the product's)
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canaries < 16:
            raise AuditError(f"--dpsgd-canaries must be at least 16, got {self.canaries}")
        if self.real_users < 1:
            raise AuditError(f"--dpsgd-real-users must be ≥ 1, got {self.real_users}")
        if not self.canary_norm > 1:
            raise AuditError(f"--dpsgd-canary-norm must be > 1 (in units of C), got {self.canary_norm}")
        if not 0 < self.confidence < 1:
            raise AuditError(f"confidence must be in (0, 1), got {self.confidence}")


def load_trainer(spec: str | None) -> tuple[Callable[..., Any], str]:
    """The trainer factory named ``module:function`` (default: the product's), and its name."""
    name = spec or DEFAULT_TRAINER
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise AuditError(f"--dpsgd-trainer must be MODULE:FUNCTION, got {name!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise AuditError(f"cannot import {module} for --dpsgd-trainer ({err})") from None
    except AttributeError:
        raise AuditError(f"{module} has no {attr!r} (--dpsgd-trainer)") from None
    if not callable(fn):
        raise AuditError(f"--dpsgd-trainer {name} is not a function")
    return fn, name


class DiracCanaries:
    """m scalars no real user touches; the included ones are Poisson-sampled users of the replica.

    Implements ``fedrec.client.train.RoundCanaries``. ``observed`` collects, per step, the privatized
    gradient on the m coordinates in units of C, sign flipped so that a canary's signal is positive.
    """

    def __init__(self, model: Any, included: np.ndarray, *, canary_norm: float, max_grad_norm: float) -> None:
        import torch

        self.m = len(included)
        self.members = np.flatnonzero(included)  # canary user j ↔ coordinate members[j]
        self.table = torch.nn.Embedding(self.m, 1)
        torch.nn.init.zeros_(self.table.weight)
        model.add_module("audit_canaries", self.table)  # before the trainer: its clipper sees the table
        self.raw = canary_norm * max_grad_norm
        self.c = max_grad_norm
        self.observed: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self.members)

    def attach(self, trainer: Any) -> None:
        trainer.optimizer.attach_step_hook(self._observe)

    def backward(self, trainer: Any, canaries: np.ndarray) -> None:
        import torch

        ids = torch.from_numpy(self.members[canaries].astype(np.int64)).unsqueeze(1)  # (B_c, 1)
        loss = -self.raw * self.table(ids).reshape(-1)  # (B_c,): gradient −G·C on the canary's coordinate
        trainer.backward(loss)

    def _observe(self, opt: Any) -> None:
        grad = self.table.weight.grad
        assert grad is not None, "the canary table must carry a (noised) gradient at every step"
        scale = float(opt.expected_batch_size) if opt.loss_reduction == "mean" else 1.0
        self.observed.append(-grad[:, 0].detach().double().numpy() * scale / self.c)


def _batch_for_rate(n_users: int, q: float) -> int | None:
    """The batch-users B with 1/ceil(n/B) = q for n users, or None."""
    per = round(1.0 / q)
    if per < 1 or abs(1.0 / per - q) > 1e-12:
        return None
    b = math.ceil(n_users / per)
    return b if abs(1.0 / math.ceil(n_users / b) - q) <= 1e-12 else None


def _guess_sets(m: int) -> list[tuple[int, int]]:
    """k = m/64 … m/2 guesses "in", with as many or no "out" guesses (small k: the tail at large ε)."""
    ks = sorted({max(1, m // d) for d in (64, 32, 16, 8, 4, 2)})
    return [(k, k) for k in ks] + [(k, 0) for k in ks]


@dataclass
class GradientAuditResult:
    claim: DPSGDClaim
    trainer: str
    canaries: int
    included: int
    real_users: int
    canary_norm: float
    one_run: OneRunResult  # at 1 − β/3
    noise_ratio: float  # measured noise std / claimed σ·C on the excluded canaries' coordinates
    noise_ratio_ub: float  # its upper bound at 1 − β/3
    noise_samples: int
    epsilon_noise: float  # ε of the claimed q, steps and C with σ·noise_ratio_ub (parametric)
    contribution: float  # an included canary's per-step contribution in units of C (clipped: ≤ 1)
    contribution_lb: float  # its lower bound at 1 − β/3
    confidence: float
    seconds: float
    scores: list[float] = field(default_factory=list)
    included_mask: list[bool] = field(default_factory=list)

    @property
    def epsilon_lb(self) -> float:
        return self.one_run.epsilon_lb

    @property
    def tenant(self) -> str:
        return self.claim.tenant

    def checks(self) -> list[Check]:
        t, c = self.claim.tenant, self.claim
        out: list[Check] = []

        def add(name: str, ok: bool, note: str, message: str) -> None:
            out.append(
                Check(name, t, () if ok else (Finding(name, t, None, None, message),), note if ok else "")
            )

        add(
            "dpsgd_lower_bound",
            self.epsilon_lb <= c.epsilon,
            f"ε_lb {self.epsilon_lb:.3f} ≤ claimed {c.epsilon:.3f} ({self.canaries} Dirac canaries, one run)",
            f"{self.canaries} gradient canaries show ε ≥ {self.epsilon_lb:.3f} (one-run bound, "
            f"{self.confidence:.0%} overall), above the claimed ε {c.epsilon:.3f}",
        )
        add(
            "dpsgd_noise",
            self.noise_ratio_ub >= 1.0,
            f"noise std {self.noise_ratio:.4f}× the claimed σ·C ({self.noise_samples} draws)",
            f"the noise on coordinates no user touches is {self.noise_ratio:.4f}× the claimed σ·C (at most "
            f"{self.noise_ratio_ub:.4f}× at {self.confidence:.0%} overall): that noise gives ε ≥ "
            f"{self.epsilon_noise:.3f} against the claimed {c.epsilon:.3f}",
        )
        add(
            "dpsgd_clipping",
            self.contribution_lb <= 1.0,
            f"a canary moves its coordinate by {self.contribution:.3f}·C per sampled step (≤ 1)",
            f"a canary with raw gradient norm {self.canary_norm:g}·C moved its coordinate by "
            f"{self.contribution:.3f}·C per sampled step (≥ {self.contribution_lb:.3f}): the per-user "
            "clipping bound C is not enforced",
        )
        return out

    @property
    def passed(self) -> bool:
        return all(ch.passed for ch in self.checks())

    def verdict(self) -> str:
        c = self.claim
        what = f"DP-SGD of {c.tenant} ({self.trainer}; σ {c.sigmas[0]:.3f}, q {c.sample_rate:.4g}, {c.total_steps} steps)"
        failed = [ch.name for ch in self.checks() if not ch.passed]
        if failed:
            return (
                f"FAIL: {what} does not behave as claimed — {', '.join(failed)} failed; {self.canaries} "
                f"gradient canaries show ε ≥ {self.epsilon_lb:.2f}, the measured noise implies ε ≥ "
                f"{_num(self.epsilon_noise)}, against a claimed ε of {c.epsilon:.2f}."
            )
        return (
            f"PASS: {what} behaves as claimed — {self.canaries} gradient canaries in one run show ε ≥ "
            f"{self.epsilon_lb:.2f} at {self.confidence:.0%} confidence, below the claimed ε of {c.epsilon:.2f}; "
            f"noise {self.noise_ratio:.3f}× σ·C, a canary's step {self.contribution:.3f}·C."
        )

    def to_json(self) -> dict[str, Any]:
        c, o = self.claim, self.one_run
        return {
            "tenant": c.tenant,
            "trainer": self.trainer,
            "claimed_epsilon": c.epsilon,
            "delta": c.delta,
            "accountant": c.accountant,
            "unit": "user",
            "rounds": len(c.sigmas),
            "steps_per_round": c.steps,
            "sample_rate": c.sample_rate,
            "sigmas": list(c.sigmas),
            "max_grad_norm": c.max_grad_norm,
            "canaries": self.canaries,
            "canaries_included": self.included,
            "replica_real_users": self.real_users,
            "canary_norm": self.canary_norm,
            "epsilon_lower_bound": self.epsilon_lb,
            "guesses": o.guesses,
            "correct": o.correct,
            "k_in": o.k_in,
            "k_out": o.k_out,
            "noise_ratio": self.noise_ratio,
            "noise_ratio_ub": self.noise_ratio_ub,
            "noise_samples": self.noise_samples,
            "epsilon_from_noise": _finite(self.epsilon_noise),
            "contribution": self.contribution,
            "contribution_lb": self.contribution_lb,
            "confidence": self.confidence,
            "seconds": round(self.seconds, 3),
            "passed": self.passed,
            "verdict": self.verdict(),
        }


def _num(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.2f}"


def _finite(x: float) -> float | str:
    return "inf" if math.isinf(x) else float(x)


def run_gradient_audit(
    claim: DPSGDClaim,
    cfg: GradientAuditConfig,
    *,
    log: Log = lambda _: None,
    make_trainer: Callable[..., Any] | None = None,
) -> GradientAuditResult:
    """The experiment of the module docstring on ``claim`` (``make_trainer`` overrides ``cfg.trainer``)."""
    import torch

    from fedrec.client.train import LocalTrainConfig, plan_round, train_round
    from fedrec.shared_model.model import HistoryMLP, ModelConfig
    from fedrec.shared_model.training import SamplingConfig
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.sources import synthetic

    t0 = time.perf_counter()
    if make_trainer is None:
        make_trainer, name = load_trainer(cfg.trainer)
    else:
        name = getattr(make_trainer, "__qualname__", "make_trainer")
    q, m = claim.sample_rate, cfg.canaries
    if not 0 < q <= 1 or abs(1.0 / round(1.0 / q) - q) > 1e-12:
        raise AuditError(f"cannot reproduce sample rate {q:g} (it must be 1/k for an integer k)")
    rng = np.random.default_rng([cfg.seed, 18])
    included = rng.random(m) < 0.5
    data = prepare_dataset(
        synthetic(users=max(cfg.real_users, 2), items=max(10, claim.n_items), seed=cfg.seed)
    )
    split = data.split
    batch = None
    for _ in range(round(1.0 / q) + 1):  # drop real users until 1/ceil(n/B) = q holds for some B
        batch = _batch_for_rate(split.n_users + int(included.sum()), q)
        if batch is not None or split.n_users <= 1:
            break
        split = split.subset(np.arange(1, split.n_users))
    if batch is None:
        raise AuditError(f"cannot reproduce sample rate {q:g} (it must be 1/k for an integer k)")
    mc = claim.model
    local = LocalTrainConfig(
        dp=True,
        local_epochs=claim.steps * q,
        batch_users=batch,
        lr=float(mc.get("lr") or 3e-3),
        max_grad_norm=claim.max_grad_norm,
        sampling=SamplingConfig(
            max_history=int(mc.get("max-history", 50)),
            targets=int(mc.get("targets", 20)),
            negatives=int(mc.get("negatives", 4)),
        ),
    )
    plan = plan_round(split.n_users + int(included.sum()), local)
    if plan.steps != claim.steps or abs(plan.sample_rate - q) > 1e-12:
        raise AuditError(
            f"the replica plans {plan.steps} steps at q={plan.sample_rate:g}, the run {claim.steps} at {q:g}"
        )
    catalog = data.catalog
    hidden = tuple(int(x) for x in str(mc.get("hidden", "64,32")).split(",") if x.strip())
    mcfg = ModelConfig(
        n_items=split.n_items,
        n_genres=catalog.genres.shape[1],
        user_cardinalities=catalog.cardinalities(),
        dim=int(mc.get("dim", 32)),
        hidden=hidden,
    )
    torch.manual_seed(int(rng.integers(2**31)))
    model = HistoryMLP(mcfg, catalog.genres.astype(np.float32))
    canaries = DiracCanaries(model, included, canary_norm=cfg.canary_norm, max_grad_norm=claim.max_grad_norm)
    log(
        f"dpsgd audit: {m} gradient canaries ({int(included.sum())} in) + {split.n_users} replica users, "
        f"{len(claim.sigmas)} rounds × {claim.steps} steps, q={q:.4g}, σ={claim.sigmas[0]:.4g} ({name}) …"
    )
    sig_per_step: list[float] = []
    for r, sigma in enumerate(claim.sigmas):
        before = len(canaries.observed)
        train_round(
            model, split, local, noise_multiplier=sigma, seed=int(rng.integers(2**62)),
            canaries=canaries, make_trainer=make_trainer,
        )  # fmt: skip
        got = len(canaries.observed) - before
        if got != claim.steps:
            raise AuditError(f"round {r + 1} released {got} noised steps, the ledger records {claim.steps}")
        sig_per_step += [sigma] * got
    x = np.asarray(canaries.observed)  # (T, m), units of C
    sig = np.asarray(sig_per_step)[:, None]  # (T, 1), claimed
    beta = (1.0 - cfg.confidence) / 3.0
    # 1. one-run bound on the log-likelihood ratio of each canary's observations
    a = (x - 0.5) / sig**2
    llr = (np.logaddexp(math.log1p(-q), math.log(q) + a) if q < 1 else a).sum(0)
    one = one_run_audit(llr, included, delta=claim.delta, confidence=1.0 - beta, guess_sets=_guess_sets(m))
    # 2. noise: excluded canaries' coordinates are pure noise, N(0, σ_true²) in units of C
    y = (x[:, ~included] / sig).ravel()
    n = len(y)
    ss = float((y**2).sum())
    ratio = math.sqrt(ss / n)
    ratio_ub = math.sqrt(ss / float(stats.chi2.ppf(beta, n)))
    eps_noise = (
        _account(tuple(s * ratio_ub for s in claim.sigmas), q, claim.steps, claim.delta, claim.accountant)
        if ratio_ub > 0
        else math.inf
    )
    # 3. clipping: an included canary's mean per-step signal is q·c
    z_in = x[:, included].ravel()
    contribution = float(z_in.mean()) / q
    se = float(z_in.std(ddof=1)) / math.sqrt(len(z_in)) / q
    contribution_lb = contribution - float(stats.norm.ppf(1.0 - beta)) * se
    return GradientAuditResult(
        claim=claim,
        trainer=name,
        canaries=m,
        included=int(included.sum()),
        real_users=split.n_users,
        canary_norm=cfg.canary_norm,
        one_run=one,
        noise_ratio=ratio,
        noise_ratio_ub=ratio_ub,
        noise_samples=n,
        epsilon_noise=eps_noise,
        contribution=contribution,
        contribution_lb=contribution_lb,
        confidence=cfg.confidence,
        seconds=time.perf_counter() - t0,
        scores=[float(v) for v in llr],
        included_mask=[bool(v) for v in included],
    )


def gradient_audit(
    run: RunFiles, cfg: GradientAuditConfig, *, tenant: str | None = None, log: Log = lambda _: None
) -> GradientAuditResult:
    """Audit the DP-SGD rounds of ``tenant`` (default: the first) of a run."""
    name = tenant or (run.tenants[0] if run.tenants else None)
    if name is None or name not in run.tenants:
        raise AuditError(f"tenant {tenant!r} is not in this run (tenants: {', '.join(run.tenants)})")
    return run_gradient_audit(dpsgd_claim(run, name), cfg, log=log)

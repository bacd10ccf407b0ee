"""Local training of one tenant with user-level DP-SGD (Opacus), as plain functions.

* The privacy unit is a user: one DP sample = one user's example (``make_user_batch``).
* Poisson sampling over the tenant's users with Opacus' ``UniformWithReplacementSampler`` at rate
  ``q = 1 / ceil(n_users / batch_users)`` (the rate Opacus derives from the loader; the accountant
  assumes exactly this sampling).
* Flat per-user clipping to ``max_grad_norm``. Default ``clipping="fast"``: one backward pass, per-user
  norms and the clipped sum from each layer's activations and output gradients (``client/fastdp.py``).
  ``clipping="ghost"``: Opacus' ghost clipping (``grad_sample_mode="ghost"``, two backward passes), kept
  for comparison. Both give the same clipped sum (tests check it against a slow per-user loop).
* Noise, scaling and the optimizer step are Opacus' ``DPOptimizerFastGradientClipping`` in both cases:
  Gaussian noise ``σ·C`` on every coordinate of the clipped sum, divided by the expected batch size.
* An empty Poisson batch still takes a noise-only step: the accountant counts every step as noised.
* ``secure_mode`` is off: Opacus' secure RNG needs torchcsprng, which does not support torch 2.x, so
  the noise comes from torch's default (non-cryptographic) generator. Ledgers record this.
* Audit hooks (``train_round(canaries=..., make_trainer=...)``, unused by the product): the white-box
  DP-SGD audit (``fedrec.simulations.reports.dpsgd_audit``) adds canary users to the Poisson sampling
  whose clipped gradients it injects through the same clipper and optimizer, and may swap the trainer
  factory for a planted broken one (the mutation tests).

``dp=False`` runs the same loop with plain per-user-mean gradients, no clipping, no noise (the
non-private federated baseline).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from fedrec.client.fastdp import FastClipper
from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.training import SamplingConfig, make_user_batch, per_user_loss

#: Per-user clipping implementations (same clipped sum; "fast" is ~1 backward pass, "ghost" two).
CLIPPING_MODES = ("fast", "ghost")


@dataclass(frozen=True)
class LocalTrainConfig:
    """One tenant's local training recipe for a round (shared by all tenants of a run)."""

    dp: bool = True  # False: no clipping, no noise (non-private baseline)
    local_epochs: float = 1.0  # expected passes over the tenant's users per round
    batch_users: int = 64  # expected users per step (sets the Poisson rate)
    lr: float = 3e-3  # Adam learning rate
    max_grad_norm: float = 1.0  # per-user L2 clipping bound C
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "cpu"
    clipping: str = "fast"  # "fast": one-backward clipping (client/fastdp.py); "ghost": Opacus ghost
    # "adam" (local-steps rounds) | "sgd" (a cohort round: one step of size lr = 1 is exactly minus the
    # noisy clipped sum over the expected cohort, so the update is linear in the noisy sum)
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        if self.local_epochs <= 0:
            raise ValueError(f"local_epochs must be > 0, got {self.local_epochs}")
        if self.batch_users < 1:
            raise ValueError(f"batch_users must be >= 1, got {self.batch_users}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {', '.join(CLIPPING_MODES)}, got {self.clipping!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")

    def make_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.Adam(params, lr=self.lr)


@dataclass(frozen=True)
class StepPlan:
    """Sampling rate and steps of one round for a tenant of ``n_users`` users."""

    n_users: int
    sample_rate: float
    steps: int

    @property
    def expected_batch(self) -> int:
        return max(1, int(self.n_users * self.sample_rate))


def plan_cohort(n_users: int, sample_rate: float) -> StepPlan:
    """A cohort round (dp-mode cohort): Poisson rate ``sample_rate`` (the run's cohort-rate), one step.

    The expected cohort ⌊n·q⌋ is what Opacus divides the noisy sum by, and the weight the tenant's
    update carries in the server's mean; it must be ≥ 1.
    """
    if n_users < 1:
        raise ValueError("a tenant needs at least one user to train")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"cohort rate must be in (0, 1], got {sample_rate}")
    if int(n_users * sample_rate) < 1:
        raise ValueError(
            f"cohort rate {sample_rate:g} expects fewer than one user of this tenant per round: raise cohort-rate"
        )
    return StepPlan(n_users=n_users, sample_rate=sample_rate, steps=1)


def share_noise_multiplier(sigma: float, shares: int) -> float:
    """σ of one tenant's share when the noise of a sum is split into ``shares`` equal-variance shares:
    σ/√shares, so that ``shares`` of them add up to variance σ² (distributed DP under SecAgg+)."""
    if isinstance(shares, bool) or not isinstance(shares, int) or shares < 1:
        raise ValueError(f"shares must be an integer ≥ 1, got {shares!r}")
    return sigma / math.sqrt(shares)


def plan_round(n_users: int, cfg: LocalTrainConfig) -> StepPlan:
    """q = 1/ceil(n/B) (as Opacus derives it from a loader of batch size B); steps = epochs / q."""
    if n_users < 1:
        raise ValueError("a tenant needs at least one user to train")
    q = 1.0 / math.ceil(n_users / min(cfg.batch_users, n_users))
    steps = max(1, round(cfg.local_epochs / q))
    return StepPlan(n_users=n_users, sample_rate=q, steps=steps)


@dataclass(frozen=True)
class RoundStats:
    steps: int
    users_seen: int  # sum of Poisson batch sizes over the round
    empty_batches: int
    mean_loss: float
    seconds: float


def make_private(
    model: HistoryMLP, cfg: LocalTrainConfig, plan: StepPlan, noise_multiplier: float, seed: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Wrap model + Adam with Opacus (ghost clipping) for the planned sample rate."""
    opt = cfg.make_optimizer(model.parameters())
    batch = math.ceil(plan.n_users * plan.sample_rate)
    loader = DataLoader(TensorDataset(torch.arange(plan.n_users)), batch_size=batch)
    assert abs(1.0 / len(loader) - plan.sample_rate) < 1e-12, "loader must give Opacus the planned rate"
    with warnings.catch_warnings():
        # "Secure RNG turned off": expected, see the module docstring.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        dp_model, dp_opt, _criterion, _loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="ghost",
            criterion=torch.nn.BCEWithLogitsLoss(),
        )
    torch.manual_seed(seed)  # noise stream of this round (torch default generator; not secure_mode)
    return dp_model, dp_opt


@dataclass
class PrivateTrainer:
    """What a DP training loop needs: the module to call, Opacus' DP optimizer, the clipping backward."""

    module: torch.nn.Module  # call forward on this one
    optimizer: DPOptimizerFastGradientClipping  # Opacus: noise σ·C, scale by 1/expected batch, step
    backward: Callable[[torch.Tensor], None]  # (B,) per-user losses → p.grad = Σ_b clip_C(∇ loss_b)
    close: Callable[[], None]  # remove hooks; the plain model is usable again afterwards


def make_private_trainer(
    model: HistoryMLP, cfg: LocalTrainConfig, plan: StepPlan, *, noise_multiplier: float, seed: int
) -> PrivateTrainer:
    """DP training for ``cfg.clipping``; noise always from Opacus' optimizer, seeded by ``seed``."""
    if cfg.clipping == "ghost":
        dp_model, dp_opt = make_private(model, cfg, plan, noise_multiplier, seed)
        assert isinstance(dp_opt, DPOptimizerFastGradientClipping)

        def close_ghost() -> None:
            dp_model.to_standard_module()  # type: ignore[operator]
            _drop_summed_grads(model)

        return PrivateTrainer(
            module=dp_model,
            optimizer=dp_opt,
            backward=lambda loss: clipped_backward(dp_model, dp_opt, loss),
            close=close_ghost,
        )
    clipper = FastClipper(model, max_grad_norm=cfg.max_grad_norm)
    opt = DPOptimizerFastGradientClipping(
        cfg.make_optimizer(model.parameters()),
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        # What PrivacyEngine.make_private derives for Poisson sampling: int(n_users · q).
        expected_batch_size=int(plan.n_users * plan.sample_rate),
        loss_reduction="mean",
        secure_mode=False,
    )
    torch.manual_seed(seed)  # noise stream of this round (torch default generator; not secure_mode)

    def backward(loss: torch.Tensor) -> None:
        clipper.clipped_backward(loss)

    def close() -> None:
        clipper.remove()
        _drop_summed_grads(model)

    return PrivateTrainer(module=model, optimizer=opt, backward=backward, close=close)


#: (model, cfg, plan, *, noise_multiplier, seed) → the DP trainer of a round (:func:`make_private_trainer`).
TrainerFactory = Callable[..., PrivateTrainer]


class RoundCanaries(Protocol):
    """Audit canaries: ``count`` users Poisson-sampled after the split's users, with no data in the split.

    ``attach`` is called once per round with the round's trainer (e.g. to add an Opacus step hook);
    ``backward`` with the sampled canaries (0 … count − 1) after the real users' clipped backward, to
    add the canaries' clipped gradients through ``trainer.backward``.
    """

    @property
    def count(self) -> int: ...

    def attach(self, trainer: PrivateTrainer) -> None: ...

    def backward(self, trainer: PrivateTrainer, canaries: np.ndarray) -> None: ...


def _zero_missing_grads(dp_opt: torch.optim.Optimizer) -> None:
    """A parameter no sampled user touched gets a zero clipped sum (Opacus then noises it like any other)."""
    for p in dp_opt.params:  # type: ignore[attr-defined]
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _drop_summed_grads(model: torch.nn.Module) -> None:
    """Remove the attribute Opacus' optimizer hangs on each parameter (the module is reused afterwards)."""
    for p in model.parameters():
        if hasattr(p, "summed_grad"):
            del p.summed_grad


def clipped_backward(
    dp_model: torch.nn.Module, dp_opt: torch.optim.Optimizer, batch_loss: torch.Tensor
) -> None:
    """Two-pass ghost clipping: afterwards every ``p.grad`` holds Σ_users clip_C(∇ loss_user)."""
    DPTensorFastGradientClipping(dp_model, dp_opt, batch_loss, "mean").backward()


def _noise_only_step(dp_opt: torch.optim.Optimizer) -> None:
    """Step for an empty Poisson batch: zero clipped sum + the same Gaussian noise, then scale."""
    for p in dp_opt.params:  # type: ignore[attr-defined]
        p.summed_grad = None
        p.grad = torch.zeros_like(p)
    dp_opt.accumulate()  # type: ignore[attr-defined]
    dp_opt.add_noise()  # type: ignore[attr-defined]
    dp_opt.scale_grad()  # type: ignore[attr-defined]
    if getattr(dp_opt, "step_hook", None):  # as Opacus' pre_step does after noise and scaling
        dp_opt.step_hook(dp_opt)  # type: ignore[attr-defined]
    dp_opt.original_optimizer.step()  # type: ignore[attr-defined]


#: torch warns when Opacus' backward hooks fire on nn.Embedding, whose inputs (ids) need no gradient.
_EMBEDDING_HOOK_WARNING = (
    "Full backward hook is firing when gradients are computed with respect to module outputs"
)
warnings.filterwarnings("ignore", message=_EMBEDDING_HOOK_WARNING, category=UserWarning)


def train_round(
    model: HistoryMLP,
    split: UserSplit,
    cfg: LocalTrainConfig,
    *,
    noise_multiplier: float,
    seed: int,
    plan: StepPlan | None = None,
    canaries: RoundCanaries | None = None,
    make_trainer: TrainerFactory = make_private_trainer,
) -> RoundStats:
    """Run one round of local training in place on ``model``; returns what happened.

    With ``cfg.dp`` the caller must have checked and will charge the budget for
    (``noise_multiplier``, ``plan.sample_rate``, ``plan.steps``). ``plan`` (default: from the exact
    user count) may be planned from the tenant's noisy count ñ instead (``fedrec.privacy.mechanisms``):
    every user is still sampled with rate ``plan.sample_rate``; ñ only sets q, the steps and the
    expected batch size the noisy sum is divided by — all public then. ``canaries`` and
    ``make_trainer`` are the audit's hooks (module docstring); with canaries the plan counts them
    among the users (the audit plans its own round: no ``plan`` with canaries).
    """
    t0 = time.perf_counter()
    n_real = split.n_users
    if canaries is not None and not cfg.dp:
        raise ValueError("audit canaries need DP training (they go through the DP optimizer)")
    if canaries is not None and plan is not None:
        raise ValueError("audit canaries plan their own round (the plan counts them among the users)")
    plan = plan or plan_round(n_real + (canaries.count if canaries is not None else 0), cfg)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(
        # every real user (and every audit canary) is sampled at rate q, whatever count planned q
        num_samples=n_real + (canaries.count if canaries is not None else 0),
        sample_rate=plan.sample_rate,
        generator=gen,
        steps=plan.steps,
    )
    neg_probs = model.negative_probs()  # None: uniform negatives
    model.to(cfg.device).train()
    losses: list[float] = []
    seen = empty = 0
    if cfg.dp:
        trainer = make_trainer(model, cfg, plan, noise_multiplier=noise_multiplier, seed=seed)
        if canaries is not None:
            canaries.attach(trainer)
        try:
            for users in sampler:
                trainer.optimizer.zero_grad(set_to_none=True)
                if len(users) == 0:
                    empty += 1
                    _noise_only_step(trainer.optimizer)
                    continue
                ids = np.asarray(users)
                real = ids[ids < n_real] if canaries is not None else ids
                if len(real):
                    batch = make_user_batch(split, real, cfg.sampling, rng, neg_probs).to(cfg.device)
                    loss = per_user_loss(trainer.module, batch)  # (B,)
                    trainer.backward(loss)
                    losses.append(float(loss.detach().mean()))
                if canaries is not None:
                    if len(real) < len(ids):
                        canaries.backward(trainer, ids[ids >= n_real] - n_real)
                    _zero_missing_grads(trainer.optimizer)
                trainer.optimizer.step()
                seen += len(users)
        finally:
            # Remove hooks and per-parameter attributes: the caller reuses the plain module.
            trainer.close()
    else:
        opt = cfg.make_optimizer(model.parameters())
        for users in sampler:
            if len(users) == 0:
                empty += 1
                continue
            batch = make_user_batch(split, np.asarray(users), cfg.sampling, rng, neg_probs).to(cfg.device)
            loss = per_user_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
            losses.append(float(loss.detach().mean()))
            seen += len(users)
    model.eval()
    return RoundStats(
        steps=plan.steps,
        users_seen=seen,
        empty_batches=empty,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        seconds=time.perf_counter() - t0,
    )

"""Planted broken DP-SGD trainers for the mutation tests of the white-box DP-SGD audit.

Each has the signature of ``fedrec.client.train.make_private_trainer`` (the product's trainer factory)
and is injected through the audit's documented hook, ``--dpsgd-trainer tests.dpsgd_mutants:NAME``
(``train_round``'s ``make_trainer``); nothing of the product is patched. Each breaks DP-SGD in one way
a real bug could:

* ``halved_noise`` — the optimizer adds noise of std σ·C/2 (e.g. σ/2 passed on, or a variance used as
  a standard deviation);
* ``unclipped`` — the per-user clipping bound is not enforced (the clipper gets a bound of 10⁹ while
  the optimizer still calibrates its noise to C).
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from fedrec.client.fastdp import FastClipper
from fedrec.client.train import LocalTrainConfig, PrivateTrainer, StepPlan, make_private_trainer
from fedrec.shared_model.model import HistoryMLP


def halved_noise(
    model: HistoryMLP, cfg: LocalTrainConfig, plan: StepPlan, *, noise_multiplier: float, seed: int
) -> PrivateTrainer:
    return make_private_trainer(model, cfg, plan, noise_multiplier=noise_multiplier / 2, seed=seed)


def unclipped(
    model: HistoryMLP, cfg: LocalTrainConfig, plan: StepPlan, *, noise_multiplier: float, seed: int
) -> PrivateTrainer:
    clipper = FastClipper(model, max_grad_norm=1e9)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.Adam(model.parameters(), lr=cfg.lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=int(plan.n_users * plan.sample_rate),
        loss_reduction="mean",
        secure_mode=False,
    )
    torch.manual_seed(seed)

    def close() -> None:
        clipper.remove()
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad

    def backward(loss: Any) -> None:
        clipper.clipped_backward(loss)

    return PrivateTrainer(module=model, optimizer=opt, backward=backward, close=close)

"""The frontier's "DP MLP" column: the DP-SGD head on top of the DP item release, in process.

The recipe is the one docs/FEDERATION.md chose on VALIDATION (issue 16 item 2, "PN0"):

* round 1: every tenant releases ONE DP popularity vector (ρ = 1) with σ calibrated alone to
  ``RELEASE_SHARE`` (0.9) of ε, at sensitivity 1 (``client.task.release_message``);
* the server sums the releases and builds the model (``server.release_init.init_from_release``): the DP
  log-prior, a frozen item table of public unit-norm genre vectors (no ε), score = prior + w · u·v;
* 5 DP-SGD rounds × 1 local epoch (``client.train.train_round``: Opacus, Poisson sampling at
  q = 1/ceil(n/64), per-user clipping at C = 0.05, Adam lr 0.3, negatives drawn from the DP prior)
  train only the scalar ``w``; σ of DP-SGD is calibrated with the release already in the accountant
  history (PRV), so release + rounds compose to exactly ε per tenant (user-level, δ);
* FedAvg of the tenants' deltas, weighted by users.

What it leaves out next to ``fedrec simulate``: the issue-20 round-0 noisy user count and the DP
evaluation (the other frontier columns leave them out too: every column is one ε spent on the model).
DP noise is fresh OS entropy, never the public seed (the seed fixes partition and initialisation).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedrec.client.task import local_config, release_message
from fedrec.client.train import plan_round, train_round
from fedrec.privacy import gram
from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.server.loop import model_config
from fedrec.server.release import sum_noise
from fedrec.server.release_init import init_from_release, init_model_config
from fedrec.shared_model.codec import load_weights, parameter_weights
from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.runconfig import RunConfig
from fedrec.shared_model.training import ModelScorer

#: The recipe of docs/FEDERATION.md ("PN0", chosen on validation), as run-config keys.
RECIPE: dict[str, Any] = {
    "approach": "mlp",
    "release-init": 0.9,
    "release-init-items": "genres",
    "release-init-pop": 1.0,
    "dot-mix": 0.0,
    "dp-train": "mix",
    "prior-negatives": True,
    "lr": 0.3,
    "max-grad-norm": 0.05,
}


@dataclass
class MLPPoint:
    model: HistoryMLP
    scorer: ModelScorer
    facts: dict[str, Any]


def train_dp_mlp(
    tenants: Sequence[UserSplit],
    catalog: Catalog,
    *,
    epsilon_target: float,
    delta: float,
    seed: int,
    accountant: str = "prv",
) -> MLPPoint:
    """The recipe at ``epsilon_target`` per tenant over ``tenants`` (each a tenant's own users)."""
    t0 = time.perf_counter()
    cfg = RunConfig.from_mapping(
        {**RECIPE, "fed-dir": "-", "seed": seed, "epsilon": epsilon_target, "delta": delta}
    )
    n_items = catalog.n_items
    rng = np.random.default_rng(secrets.randbits(128))  # release noise: fresh, never the seed
    share = cfg.release_init
    sig_rel = gram.calibrate_release_sigma(
        target_epsilon=epsilon_target * share,
        delta=delta,
        accountant=accountant,  # type: ignore[arg-type]
    )
    total: dict[str, np.ndarray] = {}
    for sp in tenants:
        msg = release_message(
            sp.indptr, sp.train_items, n_items, gram.ReleaseNoise(sigma=sig_rel, pop_share=1.0), rng
        )
        for k, v in msg.items():
            total[k] = total[k] + v.astype(np.float64) if k in total else v.astype(np.float64)
    users = sum(sp.n_users for sp in tenants)
    emb, prior, init_facts = init_from_release(
        total, n_items=n_items, users=users, sigma_sum=sum_noise([sig_rel] * len(tenants), 1), dim=cfg.dim,
        pop_share=1.0, source=cfg.release_init_items, genres=catalog.genres,
    )  # fmt: skip
    mcfg = init_model_config(
        model_config(catalog, cfg),
        dot_mix=cfg.dot_mix,
        trainable=cfg.train_modules(),
        prior_negatives=cfg.prior_negatives,
    )
    torch.manual_seed(seed)
    model = HistoryMLP(mcfg, catalog.genres)
    model.set_item_embeddings(emb)
    model.set_prior(prior)
    local = replace(local_config(cfg), device="cpu", dp=True)
    rounds = cfg.planned_rounds() - 1  # the DP-SGD rounds after the release round
    hist = [(sig_rel, 1.0, 1)]
    sig_sgd: list[float] = []
    eps_all: list[float] = []
    for sp in tenants:
        plan = plan_round(sp.n_users, local)
        s = calibrate_noise(
            target_epsilon=epsilon_target, delta=delta, sample_rate=plan.sample_rate,
            steps=plan.steps * rounds, accountant=accountant, history_before=hist,  # type: ignore[arg-type]
        )  # fmt: skip
        sig_sgd.append(s)
        eps_all.append(epsilon(history=[*hist, (s, plan.sample_rate, plan.steps * rounds)], delta=delta))
    buffers = {k: b.detach().cpu().numpy() for k, b in model.named_buffers()}
    for _ in range(rounds):
        global_w = parameter_weights(model)
        acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_w.items()}
        for sp, s in zip(tenants, sig_sgd, strict=True):
            local_model = HistoryMLP(mcfg, catalog.genres)
            load_weights(local_model, {**buffers, **global_w})
            train_round(local_model, sp, local, noise_multiplier=s, seed=secrets.randbits(63))
            for k, v in parameter_weights(local_model).items():
                acc[k] += (v.astype(np.float64) - global_w[k]) * (sp.n_users / users)  # FedAvg of deltas
        load_weights(model, {k: (global_w[k] + acc[k]).astype(np.float32) for k in acc})
    facts: dict[str, Any] = {
        "sigma_release": round(sig_rel, 4),
        "sigma_sgd": round(float(np.median(sig_sgd)), 4),
        "release_share": share,
        "sgd_rounds": rounds,
        "genre_columns": init_facts["genre_columns"],
        "epsilon_spent": round(max(eps_all), 4),
        "train_s": round(time.perf_counter() - t0, 2),
    }
    if model.mix is not None:
        facts["w"] = round(float(model.mix.weight.detach()[0, 0]), 4)
    return MLPPoint(model, ModelScorer(model, local.sampling), facts)

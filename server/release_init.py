"""The MLP initialised from a DP item release (issue 16, item 2): post-processing, no extra ε.

With ``release-init`` = s > 0 (approach ``mlp``), round 1 of the run is one item release per tenant
(``fedrec.privacy.gram``, popularity and Gram, ρ = :data:`POP_SHARE`), calibrated by each tenant
ALONE to s·cap and charged and logged before it leaves the tenant; the DP-SGD rounds that follow are
calibrated on the rest (the accountant composes the release segment (σ_rel, q = 1, 1 step) with
them, so the total stays within the cap). From the server's sum of the releases — post-processing
only — the global model gets:

* a fixed per-item log-prior ``log_prior(p̃, s_pop) + log(N / negatives)`` (``fedrec.shared_model.priors``):
  the model starts ranking like DP popularity;
* item embeddings = the top ≤ d EigenGram components of the noisy Gram above its noise edge, each
  scaled by √shrink, rows of the support scaled to mean L2 norm :data:`EMB_NORM` (others 0). They
  stay FROZEN: DP-SGD then trains only the small rest (MLP, genre projection, user-feature and context
  embeddings), so its noise is spread over ~5 k parameters instead of ~60 k; with the dot term the
  model starts at prior + a (scaled) EigenGram score, and the output layer starts at 0.

Nothing here sees a user: the inputs are the summed release and the public noise figures.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from fedrec.privacy import gram
from fedrec.server.release import shape_problem
from fedrec.shared_model.codec import Weights
from fedrec.shared_model.dp_item import DPEASERule, EigenGram
from fedrec.shared_model.model import ModelConfig
from fedrec.shared_model.priors import log_prior
from fedrec.shared_model.training import SamplingConfig

#: ρ of the initialising release: half the sensitivity to popularity (the prior), half to the Gram.
POP_SHARE = 0.5
#: Mean L2 norm of the initialised item embeddings on the Gram's support.
EMB_NORM = 1.0


def init_model_config(base: ModelConfig) -> ModelConfig:
    """The MLP trained on top of the release: fixed prior, frozen item table, no item bias, output at 0."""
    return replace(base, fixed_prior=True, freeze_item_emb=True, zero_init_output=True, item_bias=False)


def init_problem(weights: Weights, n_items: int, users: int, max_users: int | None) -> str | None:
    """Why a tenant's initialising release must not be summed, or None (it holds both parts)."""
    return shape_problem(weights, ("popularity", "gram"), n_items, users, max_users)


def init_from_release(
    total: dict[str, np.ndarray], *, n_items: int, users: int, sigma_sum: float, dim: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(item embeddings (n, dim), log-prior (n,), facts) from the SUMMED release (natural units).

    ``sigma_sum`` is the noise multiplier of the sum (0 without DP: the exact statistics).
    """
    noise = gram.ReleaseNoise(sigma=sigma_sum, pop_share=POP_SHARE)
    pop_std = noise.pop_std() if sigma_sum > 0 else 0.0
    offdiag = noise.offdiag_std() if sigma_sum > 0 else 0.0
    diag = noise.diag_std() if sigma_sum > 0 else 0.0
    prior = log_prior(np.asarray(total["popularity"], dtype=np.float64), pop_std)
    prior = prior + math.log(n_items / SamplingConfig().negatives)
    g = gram.unpack_gram(np.asarray(total["gram"], dtype=np.float64), n_items)
    eig = EigenGram(DPEASERule()).fit_gram(g, offdiag_std=offdiag, diag_std=diag, users=users)
    assert eig.vectors is not None and eig.shrink is not None and eig.items is not None
    k = min(dim, eig.components)
    emb = np.zeros((n_items, dim), dtype=np.float64)
    if k:
        v = eig.vectors[:, -k:] * np.sqrt(eig.shrink[-k:])[None, :]  # eigh is ascending: the top k
        emb[eig.items, :k] = EMB_NORM * v / max(float(np.linalg.norm(v, axis=1).mean()), 1e-12)
    facts = {"components": int(eig.components), "used": int(k), "support": len(eig.items)}
    return emb.astype(np.float32), prior.astype(np.float32), facts

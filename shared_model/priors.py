"""The DP popularity prior: a fixed per-item log-prior from the released user-level popularity vector.

``log_prior(p̃, noise_std)`` turns the noisy release ``p̃ = Σ_u x_u + N(0, s²)`` into log-probabilities:
values are floored at one noise std (below that the release cannot tell an item from an unseen one)
and normalised, so ``exp(prior)`` sums to 1. It is post-processing of a DP release: free.

A model then scores ``prior_i + personalization(u, i)`` with the learned part starting at zero
(:class:`PriorPlus` for any Scorer; ``ModelConfig.fixed_prior`` for :class:`HistoryMLP`), so before any
training — or when the learned part is pure noise and gets weight 0 — it ranks exactly like DP
popularity, the floor every DP model must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.evaluate import Scorer


def log_prior(released: np.ndarray, noise_std: float) -> np.ndarray:
    """(n,) float64 log-probabilities from a noisy popularity vector, floored at one noise std."""
    p = np.asarray(released, dtype=np.float64)
    floor = max(float(noise_std), 1e-12)
    clipped = np.maximum(p, floor)
    out: np.ndarray = np.log(clipped) - np.log(clipped.sum())
    return out


@dataclass
class PriorScorer:
    """Ranks by the fixed prior only (= DP popularity order, up to ties among floored items)."""

    prior: np.ndarray  # (n_items,)

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        return np.broadcast_to(self.prior, (len(users), split.n_items)).copy()


@dataclass
class PriorPlus:
    """``prior + weight · personalization``: a Scorer; ``weight = 0`` is exactly the prior."""

    prior: np.ndarray  # (n_items,)
    personalization: Scorer
    weight: float = 1.0

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        base = np.broadcast_to(self.prior, (len(users), split.n_items)).astype(np.float64)
        if self.weight == 0.0:
            return base.copy()
        learned = np.asarray(self.personalization.score(split, users, histories, which), dtype=np.float64)
        return base + self.weight * learned

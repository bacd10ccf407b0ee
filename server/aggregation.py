"""Aggregation rules over the accepted (validated) updates of a round.

* ``fedavg`` — Σ_t n_t·w_t / Σ_t n_t (n_t = users trained); the only rule SecAgg+ can compute.
* ``median`` — coordinate-wise median (Flower's ``aggregate_median``), unweighted: one tenant cannot
  drag a coordinate past the honest majority, whatever the size of its update.
* ``trimmed:β`` — coordinate-wise mean after cutting the β·T largest and smallest values (Flower's
  ``aggregate_trimmed_avg``), unweighted; with T tenants it trims ⌊β·T⌋ at each end, so β·T < 1
  trims nothing.

Robust rules see every update, so they are refused together with SecAgg+ (RunConfig says so).
"""

from __future__ import annotations

import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from fedrec.shared_model.codec import Weights


def fedavg(updates: list[tuple[Weights, int]]) -> Weights:
    """Σ_t n_t·w_t / Σ_t n_t over the accepted updates (n_t = users trained)."""
    total = float(sum(n for _, n in updates))
    keys = updates[0][0].keys()
    out: Weights = {}
    for k in keys:
        acc = np.zeros(updates[0][0][k].shape, dtype=np.float64)
        for w, n in updates:
            acc += w[k].astype(np.float64) * n
        out[k] = (acc / total).astype(np.float32)
    return out


def aggregate(updates: list[tuple[Weights, int]], method: str, cut: float = 0.0) -> Weights:
    """Aggregate ``updates`` (weights, users) with ``method`` ∈ fedavg | median | trimmed (cut β)."""
    if not updates:
        raise ValueError("aggregate needs at least one update")
    if method == "fedavg":
        return fedavg(updates)
    keys = list(updates[0][0])
    results = [([w[k] for k in keys], n) for w, n in updates]
    if method == "median":
        arrays = aggregate_median(results)
    elif method == "trimmed":
        arrays = aggregate_trimmed_avg(results, cut)
    else:
        raise ValueError(f"unknown aggregation {method!r}")
    return {k: np.asarray(a, dtype=np.float32) for k, a in zip(keys, arrays, strict=True)}

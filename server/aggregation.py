"""Aggregation rules over the accepted (validated) updates of a round.

* ``fedavg`` — Σ_t n_t·w_t / Σ_t n_t (n_t = users trained); the only rule SecAgg+ can compute.
* ``median`` — coordinate-wise median (Flower's ``aggregate_median``), unweighted: one tenant cannot
  drag a coordinate past the honest majority, whatever the size of its update.
* ``trimmed:β`` — coordinate-wise mean after cutting the β·T largest and smallest values (Flower's
  ``aggregate_trimmed_avg``), unweighted; with T tenants it trims ⌊β·T⌋ at each end, so β·T < 1
  trims nothing.

Robust rules see every update, so they are refused together with SecAgg+ (RunConfig says so).

:class:`ServerOptimizer` then turns the aggregated delta Δ (aggregate − global) into the server's step,
with the math of Flower's strategies (``flwr.serverapp.strategy``), written over our dicts of arrays
because our loop validates, aggregates and checkpoints itself:

* ``fedavg`` — step = η·Δ (η = 1: plain FedAvg);
* ``fedavgm`` — Flower's FedAvgM (Hsu et al. 2019): pseudo-gradient g = −Δ, v ← μ·v + g (v = g in the
  first step), step = −η·v;
* ``fedadam`` — Flower's FedAdam (Reddi et al. 2021): m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ²,
  step = η·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + τ) at the t-th server step.

The same step applies to a SecAgg+ mean delta: the optimizer only ever sees the aggregate.
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


class ServerOptimizer:
    """The server's optimizer over aggregated deltas (module docstring); its state is checkpointed."""

    def __init__(
        self,
        name: str,
        lr: float = 1.0,
        momentum: float = 0.0,
        *,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if name not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown server optimizer {name!r}")
        self.name, self.lr, self.momentum = name, lr, momentum
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau
        self.t = 0  # server steps taken
        self.m: Weights = {}  # FedAvgM: momentum of the pseudo-gradient; FedAdam: first moment
        self.v: Weights = {}  # FedAdam: second moment

    def step(self, delta: Weights) -> Weights:
        """The change to add to the global weights for the aggregated ``delta``."""
        self.t += 1
        d = {k: np.asarray(v, dtype=np.float64) for k, v in delta.items()}
        if self.name == "fedavg":
            out = {k: self.lr * v for k, v in d.items()}
        elif self.name == "fedavgm":
            g = {k: -v for k, v in d.items()}  # updates are the opposite of gradients
            if self.momentum > 0:
                self.m = g if not self.m else {k: self.momentum * self.m[k] + g[k] for k in g}
                g = self.m
            out = {k: -self.lr * v for k, v in g.items()}
        else:
            b1, b2 = self.beta_1, self.beta_2
            self.m = {k: b1 * self.m.get(k, 0.0) + (1 - b1) * v for k, v in d.items()}
            self.v = {k: b2 * self.v.get(k, 0.0) + (1 - b2) * v**2 for k, v in d.items()}
            eta = self.lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
            out = {k: eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau) for k in d}
        return {k: v.astype(np.float32) for k, v in out.items()}

    def state(self) -> dict[str, object]:
        """Everything :meth:`restore` needs (arrays as float64 numpy)."""
        return {"name": self.name, "t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def restore(self, state: dict[str, object]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpointed server optimizer {state.get('name')!r} is not {self.name!r}")
        self.t = int(state["t"])  # type: ignore[call-overload]
        self.m = {k: np.asarray(v, dtype=np.float64) for k, v in dict(state["m"]).items()}  # type: ignore[call-overload]
        self.v = {k: np.asarray(v, dtype=np.float64) for k, v in dict(state["v"]).items()}  # type: ignore[call-overload]


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

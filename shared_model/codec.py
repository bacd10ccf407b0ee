"""Weights ↔ Flower records.

The server sends the full state dict (parameters + the static genre buffer); a tenant replies with
the *shared parameters* only — the model has no per-user or tenant-local parameter, so that is every
``nn.Parameter`` and nothing else. Arrays are float32 numpy on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

Weights = dict[str, np.ndarray]


def state_weights(model: torch.nn.Module) -> Weights:
    """Full state dict as numpy (what the server broadcasts)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def parameter_weights(model: torch.nn.Module) -> Weights:
    """Shared parameters only (what a tenant sends back)."""
    return {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters()}


def to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> Weights:
    return {k: arr.numpy() for k, arr in record.items()}


def load_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load (a subset of) weights into ``model``; unknown keys or shape mismatches are errors."""
    state = model.state_dict()
    unknown = set(weights) - set(state)
    if unknown:
        raise ValueError(f"weights have keys the model does not: {sorted(unknown)[:5]}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} != model's {tuple(state[k].shape)}")
        state[k] = torch.from_numpy(np.asarray(v, dtype=np.float32)).to(state[k].dtype)
    model.load_state_dict(state)


# Typed reads of Flower records (their values are unions; a wrong type is a protocol error).
def arrays_of(content: RecordDict, key: str = "arrays") -> Weights:
    return from_record(content.array_records[key])


def config_of(content: RecordDict, key: str) -> ConfigRecord:
    return content.config_records[key]


def metrics_of(content: RecordDict, key: str) -> MetricRecord:
    return content.metric_records[key]


def as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return int(value)


def as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


def update_problem(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    users: int,
    *,
    max_users: int | None = None,
    max_norm: float | None = None,
) -> str | None:
    """Why a tenant's update must not be aggregated, or None.

    The same checks run on the server (each visible update) and on a tenant before SecAgg+ masks it:
    exactly the declared keys; exact shapes and dtypes (a broadcastable shape is still refused);
    finite values; ‖update − reference‖₂ ≤ ``max_norm``; 0 < ``users`` ≤ ``max_users``.
    """
    if set(update) != set(reference):
        extra, missing = sorted(set(update) - set(reference)), sorted(set(reference) - set(update))
        return f"keys differ from the shared parameters (extra {extra[:3]}, missing {missing[:3]})"
    sq = 0.0
    for k, ref in reference.items():
        w = update[k]
        if not isinstance(w, np.ndarray):
            return f"{k}: not an array ({type(w).__name__})"
        if w.shape != ref.shape:
            return f"{k}: shape {w.shape} != {ref.shape}"
        if w.dtype != ref.dtype:
            return f"{k}: dtype {w.dtype} != {ref.dtype}"
        if not np.isfinite(w).all():
            return f"{k}: non-finite values"
        sq += float(np.square(w.astype(np.float64) - ref.astype(np.float64)).sum())
    if max_norm is not None and not np.sqrt(sq) <= max_norm:
        return f"update L2 norm {np.sqrt(sq):.4g} exceeds the bound {max_norm:g}"
    if users <= 0 or (max_users is not None and users > max_users):
        bound = f" (1..{max_users})" if max_users is not None else " (must be > 0)"
        return f"user count {users} out of range{bound}"
    return None

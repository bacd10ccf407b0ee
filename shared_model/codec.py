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

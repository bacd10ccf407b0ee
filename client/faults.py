"""Simulated faults and adversaries for robustness studies (``fedrec simulate --dropout/--crash/…``).

They act only on *simulated* nodes (``partition-id`` in ``node_config``): a real SuperNode ignores
them, whatever the run config says. The plan itself (who drops, crashes or lies in which round) is
parsed and drawn in :class:`fedrec.shared_model.runconfig.RunConfig`, so the server can record it per round.

* dropout — the tenant misses the round before training (nothing charged, no reply but an error);
* crash — the tenant's client process dies mid-round: *after* the round was charged and logged,
  *before* the update leaves. It is an unhandled :class:`SimulatedCrash`, not ``os._exit``: Flower
  1.42's Ray actor pool keeps routing messages to a dead actor (after one ``os._exit`` every tenant
  failed every later round), while an exception gives the server the same view — an error reply,
  the update lost, nothing of the node's in-memory state saved — and the round goes on. What persists
  (budget, ledger, on disk) is exactly what a real crash leaves;
* adversary — the honest update is corrupted before it is sent (see :func:`corrupt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedrec.shared_model.codec import Weights
from fedrec.shared_model.runconfig import RunConfig


class SimulatedDropout(RuntimeError):
    """Raised by a tenant that misses a round (the server sees an error reply, like a lost node)."""


class SimulatedCrash(RuntimeError):
    """Raised by a tenant whose process 'dies' after charging a round, before its update leaves."""


def simulated(node_config: Mapping[str, Any]) -> bool:
    return "partition-id" in node_config and "tenant-dir" not in node_config


def maybe_drop(cfg: RunConfig, node_config: Mapping[str, Any], tenant: str, round_: int) -> None:
    if simulated(node_config) and cfg.drops_out(tenant, round_):
        raise SimulatedDropout(f"{tenant} dropped out of round {round_} (simulated, fault-dropout)")


def maybe_crash(cfg: RunConfig, node_config: Mapping[str, Any], tenant: str, round_: int) -> None:
    if simulated(node_config) and round_ in cfg.crash_rounds().get(tenant, set()):
        raise SimulatedCrash(
            f"{tenant} crashed mid-round {round_}, after charging it (simulated, fault-crash)"
        )


def adversary_kind(cfg: RunConfig, node_config: Mapping[str, Any], tenant: str) -> str | None:
    return cfg.adversaries().get(tenant) if simulated(node_config) else None


def corrupt(kind: str, update: Weights, base: Mapping[str, np.ndarray], users: int) -> tuple[Weights, int]:
    """The update (and user count) an adversary of ``kind`` sends instead of the honest ``update``.

    ``base`` is what the update moves away from (the global weights; zeros for a delta).
    ``scale=F`` sends base + F·Δ, ``signflip`` base − Δ, ``users=N`` claims N users; the rest are
    malformed: NaN / ±Inf values, a broadcastable wrong shape, float64, an undeclared extra key.
    """
    out = {k: np.array(v, copy=True) for k, v in update.items()}
    first = next(iter(out))
    if kind == "nan":
        out[first].flat[::2] = np.nan
    elif kind == "inf":
        out[first].flat[0::3] = np.inf
        out[first].flat[1::3] = -np.inf
    elif kind.startswith("scale="):
        f = float(kind.split("=", 1)[1])
        out = {k: (base[k] + f * (v - base[k])).astype(v.dtype) for k, v in out.items()}
    elif kind == "signflip":
        out = {k: (base[k] - (v - base[k])).astype(v.dtype) for k, v in out.items()}
    elif kind == "shape":
        out[first] = out[first][:1].copy()  # (1, …): numpy would broadcast it
    elif kind == "dtype":
        out[first] = out[first].astype(np.float64)
    elif kind == "keys":
        out["extra.weight"] = np.zeros(3, np.float32)
    elif kind.startswith("users="):
        users = int(kind.split("=", 1)[1])
    else:
        raise ValueError(f"unknown adversary kind {kind!r}")
    return out, users

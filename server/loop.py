"""The coordinator's work, as a plain function over a Flower ``Grid``.

Per round: broadcast the global weights → each tenant trains (or refuses: capped) → validate each
visible update → FedAvg weighted by users trained → federated validation from running sums →
``rounds.jsonl`` line, ledger copies and head hashes, atomic checkpoint. At the end: test metrics
from sums (never an average of averages), ``privacy.json``, ``model.pt``/``model.json``, plots.

The server never sees a user id or an interaction; what it learns per tenant is the update, the
number of users trained and budget figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared_model.artifacts import save_model, write_json_atomic
from shared_model.codec import (
    Weights,
    arrays_of,
    as_float,
    as_int,
    config_of,
    metrics_of,
    state_weights,
    to_record,
)
from shared_model.data import Catalog
from shared_model.errors import FedrecError
from shared_model.evaluate import EvalResult
from shared_model.model import HistoryMLP, ModelConfig
from shared_model.runconfig import RunConfig
from shared_model.training import SamplingConfig

Log = Callable[[str], None]


# ------------------------------------------------------------------ inputs
def load_catalog(cfg: RunConfig) -> Catalog:
    path = Path(cfg.catalog) if cfg.catalog else Path(cfg.fed_dir) / "catalog.json"
    if not path.is_file():
        raise FedrecError(f"catalogue {path} not found (set run-config catalog or fed-dir)")
    return Catalog.from_json(json.loads(path.read_text(encoding="utf-8")))


def federation_tenants(cfg: RunConfig) -> list[str]:
    path = Path(cfg.fed_dir) / "federation.json" if cfg.fed_dir else None
    if path is None or not path.is_file():
        return []
    return [str(t) for t in json.loads(path.read_text(encoding="utf-8")).get("tenants", [])]


def model_config(catalog: Catalog, cfg: RunConfig) -> ModelConfig:
    return ModelConfig(
        n_items=catalog.n_items,
        n_genres=len(catalog.genre_names),
        user_cardinalities=catalog.cardinalities(),
        dim=cfg.dim,
        hidden=cfg.hidden_sizes(),
    )


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes[:expected] if expected else nodes
        if time.monotonic() > deadline:
            raise FedrecError(
                f"only {len(nodes)} of {expected} tenant node(s) connected within {timeout:g} s"
            )
        time.sleep(0.5)


# ------------------------------------------------------------------ validation + aggregation
def validate_update(
    weights: Weights, reference: Weights, users: int, max_users: int | None = None
) -> str | None:
    """Why an update must be rejected, or None. Exact keys, shapes and dtypes; finite; users > 0."""
    if set(weights) != set(reference):
        extra, missing = sorted(set(weights) - set(reference)), sorted(set(reference) - set(weights))
        return f"keys differ from the shared parameters (extra {extra[:3]}, missing {missing[:3]})"
    for k, ref in reference.items():
        w = weights[k]
        if w.shape != ref.shape:
            return f"{k}: shape {w.shape} != {ref.shape}"
        if w.dtype != ref.dtype:
            return f"{k}: dtype {w.dtype} != {ref.dtype}"
        if not np.isfinite(w).all():
            return f"{k}: non-finite values"
    if users <= 0 or (max_users is not None and users > max_users):
        return f"user count {users} out of range"
    return None


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


# ------------------------------------------------------------------ messaging
def _messages(
    nodes: Iterable[int], kind: str, weights: Weights, config: dict[str, Any], group: str
) -> list[Message]:
    out = []
    for nid in nodes:
        content = RecordDict({"arrays": to_record(weights), "config": ConfigRecord(config)})
        out.append(Message(content=content, message_type=kind, dst_node_id=nid, group_id=group))
    return out


@dataclass
class TenantStatus:
    users: int = 0
    rounds_trained: int = 0
    epsilon: float | None = None
    cap: float | None = None
    status: str = "ok"
    ledger_head: str = "0" * 64
    history: list[tuple[int, float]] = field(default_factory=list)  # (round, ε)


def federated_eval(
    grid: Grid, nodes: list[int], weights: Weights, model_json: str, which: str, timeout: float, group: str
) -> tuple[dict[str, Any], list[str]]:
    """Merge the tenants' running sums and divide once."""
    replies = grid.send_and_receive(
        _messages(nodes, MessageType.EVALUATE, weights, {"which": which, "model-config": model_json}, group),
        timeout=timeout,
    )
    total: EvalResult | None = None
    errors = []
    for rep in replies:
        if rep.has_error():
            errors.append(f"node {rep.metadata.src_node_id}: {_short(rep.error.reason or '')}")
            continue
        part = EvalResult.from_record(dict(metrics_of(rep.content, "sums")))
        total = part if total is None else total + part
    if total is None:
        return {}, errors
    return total.to_metrics(), errors


def _short(reason: str, limit: int = 300) -> str:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    last = [ln for ln in text.splitlines() if ln.strip()]
    return (last[-1] if last else text)[:limit]


# ------------------------------------------------------------------ the run
def run_federation(grid: Grid, cfg: RunConfig, *, log: Log = print) -> dict[str, Any]:
    """Run all rounds and write RUN_DIR (``cfg.run_dir``). Returns the final metrics."""
    if not cfg.run_dir:
        raise FedrecError("run-config run-dir is required (where the server writes the run's files)")
    t0 = time.perf_counter()
    out = Path(cfg.run_dir)
    (out / "ledger").mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(cfg)
    tenants = federation_tenants(cfg)
    mcfg = model_config(catalog, cfg)
    model_json = json.dumps(mcfg.to_json())
    torch.manual_seed(cfg.seed)
    model = HistoryMLP(mcfg, catalog.genres if mcfg.n_genres else None)
    global_w = state_weights(model)
    param_keys = [k for k, _ in model.named_parameters()]
    expected = cfg.num_tenants or len(tenants) or 1
    nodes = wait_for_nodes(grid, expected, cfg.node_wait_timeout)
    log(
        f"{len(nodes)} tenant node(s) connected; {cfg.num_server_rounds} round(s), "
        f"dp={'on' if cfg.dp else 'off'}"
    )

    status: dict[str, TenantStatus] = {}
    rounds_path = out / "rounds.jsonl"
    for rnd in range(1, cfg.num_server_rounds + 1):
        r0 = time.perf_counter()
        replies = grid.send_and_receive(
            _messages(
                nodes, MessageType.TRAIN, global_w, {"round": rnd, "model-config": model_json}, str(rnd)
            ),
            timeout=cfg.round_timeout,
        )
        accepted: list[tuple[Weights, int]] = []
        row: dict[str, Any] = {"round": rnd, "tenants": {}, "failures": []}
        seen_nodes = set()
        for rep in replies:
            nid = rep.metadata.src_node_id
            seen_nodes.add(nid)
            if rep.has_error():
                row["failures"].append({"node": nid, "reason": _short(rep.error.reason or "")})
                continue
            st = config_of(rep.content, "status")
            met = metrics_of(rep.content, "metrics")
            tenant = str(st["tenant"])
            ts = status.setdefault(tenant, TenantStatus())
            ts.users = as_int(met["users"])
            eps, cap = as_float(met["epsilon"]), as_float(met["cap"])
            ts.epsilon = eps if eps >= 0 else None
            ts.cap = cap if cap >= 0 else None
            entry_json = str(st["ledger-entry"])
            info: dict[str, Any] = {"status": str(st["status"]), "users": ts.users, "epsilon": ts.epsilon}
            if entry_json:
                entry = json.loads(entry_json)
                if entry.get("prev_hash") != ts.ledger_head:
                    info["ledger_problem"] = "entry does not continue the chain the server recorded"
                with open(out / "ledger" / f"{tenant}.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
                ts.ledger_head = str(entry["hash"])
            info["ledger_head"] = ts.ledger_head
            if str(st["message"]):
                info["message"] = str(st["message"])
            if str(st["status"]) == "ok":
                weights = arrays_of(rep.content)
                n_examples = as_int(met["num-examples"])
                problem = validate_update(weights, {k: global_w[k] for k in param_keys}, n_examples)
                if problem:
                    info["status"] = "rejected"
                    info["reason"] = problem
                else:
                    accepted.append((weights, n_examples))
                    ts.rounds_trained += 1
                    ts.status = "ok"
            else:
                ts.status = str(st["status"])
            if ts.epsilon is not None:
                ts.history.append((rnd, ts.epsilon))
            row["tenants"][tenant] = info
        for nid in sorted(set(nodes) - seen_nodes):
            row["failures"].append({"node": nid, "reason": f"no reply within {cfg.round_timeout:g} s"})
        if len(accepted) >= max(1, cfg.min_tenants):
            global_w.update(fedavg(accepted))
            row["aggregated"] = len(accepted)
        else:
            row["aggregated"] = 0
            log(f"round {rnd}: only {len(accepted)} valid update(s); the global model is unchanged")
        if rnd % max(1, cfg.eval_every) == 0 or rnd == cfg.num_server_rounds:
            val, errs = federated_eval(
                grid, nodes, global_w, model_json, "val", cfg.round_timeout, f"val-{rnd}"
            )
            row["val"] = val.get("full", {})
            row["failures"] += [{"reason": e, "phase": "val"} for e in errs]
        row["seconds"] = round(time.perf_counter() - r0, 3)
        with open(rounds_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        _checkpoint(out, model, global_w, catalog, cfg, rnd)
        eps_now = [t.epsilon for t in status.values() if t.epsilon is not None]
        capped = sum(1 for t in status.values() if t.status == "capped")
        val_hr = row.get("val", {}).get("hr@10")
        log(
            f"round {rnd}/{cfg.num_server_rounds}: "
            + (f"val HR@10 {val_hr:.4f}  " if val_hr is not None else "")
            + (f"max ε {max(eps_now):.3f}  " if eps_now else "")
            + f"updates {len(accepted)}  capped {capped}  failures {len(row['failures'])}  "
            + f"({row['seconds']:.1f} s)"
        )

    test, errs = federated_eval(grid, nodes, global_w, model_json, "test", cfg.round_timeout, "test")
    if not test:
        raise FedrecError("final test evaluation got no result from any tenant: " + "; ".join(errs[:3]))
    metrics: dict[str, Any] = dict(test)
    metrics["dataset"] = {
        "source": "federation",
        "users": sum(t.users for t in status.values()),
        "items": catalog.n_items,
    }
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "privacy.json", privacy_report(cfg, status))
    write_json_atomic(out / "config.json", {"command": "simulate", "run_config": cfg.to_mapping()})
    _load(model, global_w)
    save_model(
        out, model, catalog, _sampling(cfg), run_id=cfg.run_name, extra={"run_config": cfg.to_mapping()}
    )
    from server.plots import plot_run

    plot_run(out)
    return metrics


def privacy_report(cfg: RunConfig, status: dict[str, TenantStatus]) -> dict[str, Any]:
    return {
        "unit": "user",
        "accountant": cfg.accountant if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None,
        "dp": cfg.dp,
        "rounds": cfg.num_server_rounds,
        "noise": "local: each tenant's DP-SGD adds its own Gaussian noise" if cfg.dp else "none",
        "poisson": True,
        "secure_mode": False,
        "tenants": {
            t: {
                "epsilon": s.epsilon,
                "cap": s.cap,
                "rounds_trained": s.rounds_trained,
                "users": s.users,
                "status": s.status,
                "ledger_head": s.ledger_head,
            }
            for t, s in sorted(status.items())
        },
    }


def _sampling(cfg: RunConfig) -> SamplingConfig:
    return SamplingConfig(max_history=cfg.max_history, targets=cfg.targets, negatives=cfg.negatives)


def _load(model: HistoryMLP, weights: Weights) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})


def _checkpoint(
    out: Path, model: HistoryMLP, weights: Weights, catalog: Catalog, cfg: RunConfig, rnd: int
) -> None:
    """Global model after round ``rnd``, written atomically (a crash loses at most one round)."""
    _load(model, weights)
    ck = out / "checkpoint"
    save_model(ck, model, catalog, _sampling(cfg), run_id=cfg.run_name, extra={"round": rnd})
    write_json_atomic(ck / "round.json", {"round": rnd})

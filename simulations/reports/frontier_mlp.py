"""The frontier's "DP MLP" column: the MLP as ``approach auto`` would train it, through the product's loop.

One point is one real federated run, in process: the data set is cut into ``tenants`` tenants (iid, the
seed) and written as an encrypted federation folder (``prepare_federation``, as ``fedrec prepare``), and
the project's ServerApp loop (``fedrec.server.loop.run_federation``) drives the project's ClientApp on
the in-process grid (``LoopbackGrid``: no Ray, the same messages, ledgers and SecAgg+ stages as
``fedrec simulate``). So the column measures the code partners run, not a re-implementation of it.
Its figures are the run's own exact federated evaluation over every tenant's test (and validation)
users, on the tenants' anonymized partitions the model was trained for; the other columns score a
sample of at most ``eval_users`` of the same users.

Which MLP: the one ``auto`` trains when it trains the MLP (``RunConfig.with_approach``):

* the EASE-table head (``head = "ease"``: cohort rounds, release-init 0.95 of ε with DP-EASE's item table,
  DP-SGD on the head and on the rows of the 100 items the release ranks highest) where ``auto`` would
  swap DP-EASE for it: at least ``EASE_HEAD_MIN_USERS`` users and a catalogue within the gram limit;
* else approach ``mlp``'s own DP recipe (the DP head on a frozen table of public genre vectors).

Noise: ``local`` (each tenant adds its whole DP-SGD noise) or ``distributed`` (SecAgg+: each tenant adds
its share, the masked sum carries one noise). Each run spends at most ε per tenant in total, every stage
of the run included; evaluation is exact (``eval-privacy exact``), as in the other columns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.privacy.gram import MAX_GRAM_ITEMS
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.runconfig import RunConfig

MODES = ("local", "distributed")


@dataclass
class MLPPoint:
    hr: float  # full HR@10 on test, every tenant's test users
    ndcg: float
    val_hr: float  # full HR@10 on validation, the last round's (the model a DP run keeps)
    facts: dict[str, Any]


@contextlib.contextmanager
def _quiet_flower() -> Any:
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def mlp_head(users: int, items: int, gram_limit: int = MAX_GRAM_ITEMS) -> tuple[str, str]:
    """The head ``auto`` trains the MLP with for ``users`` users and ``items`` items, and why."""
    from fedrec.server.release import ease_head_applies

    if items > gram_limit:
        return "", f"{items} items > the gram limit ({gram_limit}): no DP-EASE table, the genres head"
    why_not = ease_head_applies(users=users)
    if why_not is not None:
        return "", f"the genres head ({why_not})"
    return "ease", "the EASE-table head"


def run_dp_mlp(
    data: Any,
    *,
    epsilon_target: float,
    delta: float,
    seed: int,
    tenants: int,
    mode: str,
) -> MLPPoint:
    """Train the column's MLP on ``data`` (``PreparedData``) at ``epsilon_target`` per tenant.

    The federation folder and run dir live in a temporary folder (``tempfile``) that is removed
    afterwards: they hold the tenants' encrypted partitions and keys, which must not outlive the point.
    """
    from fedrec.client.app import app
    from fedrec.server.loop import run_federation
    from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
    from fedrec.simulations.driver.loopback import LoopbackGrid

    if mode not in MODES:
        raise FedrecError(f"DP MLP noise mode must be one of {', '.join(MODES)}, got {mode!r}")
    head, why = mlp_head(data.split.n_users, data.split.n_items)
    root = Path(tempfile.mkdtemp(prefix="fedrec-frontier-mlp-"))
    try:
        t0 = time.perf_counter()
        prepare_federation(
            data, root / "fed", PrepareConfig(tenants=tenants, partition="iid", seed=seed, min_users=1)
        )
        base = RunConfig.from_mapping(
            {
                "fed-dir": str(root / "fed"),
                "run-dir": str(root / "run"),
                "run-name": "frontier",
                "num-tenants": tenants,
                "approach": "auto",
                "seed": seed,
                "epsilon": epsilon_target,
                "delta": delta,
                "secagg": mode == "distributed",
                "eval-privacy": "exact",
            }
        )
        cfg = base.with_approach("mlp", head)
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "eval-every": cfg.planned_rounds()})
        t1 = time.perf_counter()
        with _quiet_flower():  # Flower logs every SecAgg+ stage of every round: the frontier logs per point
            metrics = run_federation(LoopbackGrid(app, cfg.to_mapping(), tenants), cfg, log=lambda _: None)
        t_train = time.perf_counter() - t1
        rounds = [json.loads(x) for x in (root / "run" / "rounds.jsonl").read_text().splitlines()]
        val = next(r["val"]["hr@10"] for r in reversed(rounds) if "hr@10" in r.get("val", {}))
        privacy = json.loads((root / "run" / "privacy.json").read_text(encoding="utf-8"))
        spent = [float(t["epsilon"] or 0.0) for t in privacy["tenants"].values()]
        facts: dict[str, Any] = {
            "head": head or "genres",
            "head_reason": why,
            "rounds": cfg.planned_rounds(),
            "dp_mode": cfg.dp_mode,
            "dp_rows": cfg.dp_rows,
            "dim": cfg.dim,
            "epsilon_spent": round(max(spent), 4),
            "prepare_s": round(t1 - t0, 2),
            "train_s": round(t_train, 2),
        }
        full = metrics["full"]
        return MLPPoint(float(full["hr@10"]), float(full["ndcg@10"]), float(val), facts)
    finally:
        shutil.rmtree(root, ignore_errors=True)

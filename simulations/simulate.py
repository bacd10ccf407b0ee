"""``fedrec simulate``: a multi-tenant DP run on Flower's Simulation Engine, end to end.

1. the federation: prepared from ``--data`` into a private temp folder (deleted afterwards, keys
   with it), or an existing ``--federation FED_DIR``;
2. pre-flight checks that fail fast with one line (δ < 1/users of every tenant, caps > 0, …);
3. the Flower run (one virtual SuperNode per tenant, 1 CPU each; the ServerApp writes RUN_DIR);
4. baselines in the same harness: popularity, and DP popularity at each tenant's cap (each tenant
   releases its user-level item vector once with the Gaussian mechanism; the server sums);
5. RUN_DIR is written into a temp dir and renamed at the end: a failed run is never half-reported as
   a success. Ray is shut down and temp folders removed even on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.vault import load_tenant
from privacy.accounting import calibrate_noise, check_delta
from shared_model.artifacts import write_json_atomic
from shared_model.baselines import DPPopularity, Popularity
from shared_model.data import Catalog, UserSplit, concat_splits
from shared_model.evaluate import evaluate
from shared_model.runconfig import RunConfig
from simulations.errors import DataError
from simulations.flower_runner import run_simulation
from simulations.rundir import atomic_dir


@dataclass(frozen=True)
class Federation:
    fed_dir: Path
    tenants: list[str]
    catalog: Catalog
    manifests: dict[str, dict[str, Any]]


def open_federation(fed_dir: Path) -> Federation:
    """Read the public parts of a federation folder (no decryption)."""
    meta_path = fed_dir / "federation.json"
    if not meta_path.is_file():
        raise DataError(
            f"{fed_dir} is not a federation folder (federation.json is missing); run `fedrec prepare`"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tenants = [str(t) for t in meta.get("tenants", [])]
    if not tenants:
        raise DataError(f"{meta_path} lists no tenants")
    manifests = {}
    for t in tenants:
        m = fed_dir / t / "manifest.json"
        if not m.is_file():
            raise DataError(f"tenant folder {fed_dir / t} is missing or incomplete (no manifest.json)")
        manifests[t] = json.loads(m.read_text(encoding="utf-8"))
    catalog = Catalog.from_json(json.loads((fed_dir / "catalog.json").read_text(encoding="utf-8")))
    return Federation(fed_dir=fed_dir, tenants=tenants, catalog=catalog, manifests=manifests)


def tenant_users(manifest: dict[str, Any]) -> int:
    counts = manifest.get("counts", {})
    return int(counts.get("users", 0))


def preflight(fed: Federation, cfg: RunConfig) -> None:
    """Refuse a run that cannot honour its privacy configuration, before anything starts."""
    for t in fed.tenants:
        n = tenant_users(fed.manifests[t])
        if n < 1:
            raise DataError(f"tenant {t} has no users to train on")
        if cfg.dp:
            check_delta(delta=cfg.delta, n_users=n)


def load_tenant_splits(fed: Federation, keys_dir: Path | None = None) -> dict[str, UserSplit]:
    """Decrypt every tenant in memory (the simulation harness holds all keys; baselines only)."""
    keys = keys_dir or fed.fed_dir / "keys"
    return {t: load_tenant(fed.fed_dir / t, keys / f"{t}.key", expected_tenant=t).split for t in fed.tenants}


def baselines(fed: Federation, splits: dict[str, UserSplit], cfg: RunConfig) -> dict[str, Any]:
    """Popularity and (with DP) DP popularity at each tenant's cap, on the test protocol."""
    union = concat_splits(list(splits.values()))
    out: dict[str, Any] = {}
    pop = evaluate(Popularity().fit(union), union, fed.catalog, which="test", seed=cfg.seed).to_metrics()
    out["popularity"] = {"full": pop["full"], "sampled": pop["sampled"]}
    if cfg.dp:
        rng = np.random.default_rng()  # release noise: fresh, never from the public seed
        total = np.zeros(fed.catalog.n_items)
        sigmas = {}
        for t, split in splits.items():
            sigma = calibrate_noise(
                target_epsilon=cfg.cap_for(t),
                delta=cfg.delta,
                sample_rate=1.0,
                steps=1,
                accountant=cfg.accountant,  # type: ignore[arg-type]
            )
            sigmas[t] = sigma
            total += DPPopularity.release(split, sigma, rng)
        dp = evaluate(
            DPPopularity().fit_released(total), union, fed.catalog, which="test", seed=cfg.seed
        ).to_metrics()
        out["dp_popularity"] = {
            "full": dp["full"],
            "sampled": dp["sampled"],
            "mechanism": "Gaussian: each tenant releases Σ_u 1/√n_u·1[items of u] once "
            "(L2 sensitivity 1); the server sums the releases",
            "epsilon": {t: cfg.cap_for(t) for t in splits},
            "delta": cfg.delta,
            "sigma": sigmas,
        }
    return out


def simulate(
    cfg: RunConfig,
    out: Path,
    *,
    federation: Path | None,
    prepare: Callable[[Path], None] | None,
    overwrite: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a federation into ``out`` (see module docstring). ``prepare(fed_dir)`` builds a federation."""
    t0 = time.perf_counter()
    tmp_fed: Path | None = None
    try:
        if federation is None:
            if prepare is None:
                raise DataError("give --data SRC or --federation FED_DIR")
            tmp_fed = Path(tempfile.mkdtemp(prefix="fedrec-fed-"))
            fed_dir = tmp_fed / "fed"
            prepare(fed_dir)
        else:
            fed_dir = federation
        fed = open_federation(fed_dir)
        with atomic_dir(out, overwrite=overwrite) as run_tmp:
            run_cfg = RunConfig.from_mapping(
                {
                    **cfg.to_mapping(),
                    "fed-dir": str(fed_dir.resolve()),
                    "run-dir": str(run_tmp.resolve()),
                    "run-name": cfg.run_name if cfg.run_name != "run" else f"sim-{uuid.uuid4().hex[:10]}",
                    "num-tenants": len(fed.tenants),
                }
            )
            preflight(fed, run_cfg)
            try:
                run_simulation(run_cfg.to_mapping(), len(fed.tenants), verbose=verbose)
            finally:
                _shutdown_ray()
            if not (run_tmp / "metrics.json").is_file():
                raise DataError("the federated run ended without writing its metrics (see the log above)")
            log("baselines (popularity, DP popularity) …")
            splits = load_tenant_splits(fed)
            metrics = json.loads((run_tmp / "metrics.json").read_text(encoding="utf-8"))
            metrics["baselines"] = baselines(fed, splits, run_cfg)
            union_users = sum(s.n_users for s in splits.values())
            metrics["dataset"] = {
                "source": json.loads((fed_dir / "federation.json").read_text(encoding="utf-8")).get(
                    "source", ""
                ),
                "users": union_users,
                "items": fed.catalog.n_items,
                "interactions": int(
                    sum(s.n_train + 2 * int((s.test_item >= 0).sum()) for s in splits.values())
                ),
                "tenants": len(fed.tenants),
            }
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
            write_json_atomic(run_tmp / "metrics.json", metrics)
        return metrics
    finally:
        if tmp_fed is not None:
            shutil.rmtree(tmp_fed, ignore_errors=True)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass

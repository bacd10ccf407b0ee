"""``fedrec simulate``: a multi-tenant DP run on Flower's Simulation Engine, end to end.

1. the federation: prepared from ``--data`` into a private temp folder (deleted afterwards, keys
   with it), or an existing ``--federation FED_DIR``;
2. pre-flight checks that fail fast with one line (δ < 1/users of every tenant, caps > 0, …);
3. the Flower run (one virtual SuperNode per tenant, 1 CPU each; the ServerApp writes RUN_DIR);
4. baselines in the same harness: popularity, and DP popularity at each tenant's cap (each tenant
   releases its user-level item vector once with the Gaussian mechanism; the server sums);
5. RUN_DIR is written into a work dir beside it, ``.<name>.partial/``, renamed at the end: a failed
   run is never half-reported as a success. Ray is shut down even on Ctrl-C or failure.

Crash-resume: the work dir has a stable name and holds ``resume.json`` (the resolved run config and
where the federation is) from the start. A run killed or failed after its first checkpoint leaves the
work dir — and a ``--data`` federation in its private temp folder, keys with it — in place;
``fedrec simulate --resume RUN_DIR`` continues it from the last complete round (the tenants' budget
state and ledgers live in the federation folder, so they persist too). A run that stops before any
round completed is cleaned up as before. Only a completed run deletes a ``--data`` federation; for runs
that must survive a reboot (which may clear /tmp), prepare with ``fedrec prepare`` and use
``--federation``.
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

from fedrec.client.vault import load_tenant
from fedrec.privacy.accounting import calibrate_noise, check_delta
from fedrec.server.release_init import public_item_text
from fedrec.shared_model.artifacts import write_json_atomic
from fedrec.shared_model.baselines import DPPopularity, Popularity
from fedrec.shared_model.data import Catalog, UserSplit, concat_splits
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.driver.flower_runner import run_simulation
from fedrec.simulations.driver.rundir import check_out_dir
from fedrec.simulations.errors import DataError

RESUME_MARKER = "resume.json"


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
    named = set(cfg.crash_rounds()) | set(cfg.adversaries())
    unknown = sorted(named - set(fed.tenants))
    if unknown:
        raise DataError(f"--crash/--adversary name unknown tenant(s) {unknown}; tenants: {fed.tenants}")
    if cfg.secagg and len(fed.tenants) < 2:
        raise DataError("--secagg needs at least 2 tenants (3 or more to tolerate a dropout)")
    # public title embeddings (release-init-items text): a missing titles file or model package stops the
    # run here, before Ray; the embeddings are cached beside the catalogue for the server to read
    public_item_text(cfg, fed.catalog)


def load_tenant_splits(fed: Federation, keys_dir: Path | None = None) -> dict[str, UserSplit]:
    """Decrypt every tenant in memory (the simulation harness holds all keys; baselines only)."""
    keys = keys_dir or fed.fed_dir / "keys"
    return {t: load_tenant(fed.fed_dir / t, keys / f"{t}.key", expected_tenant=t).split for t in fed.tenants}


def baselines(
    fed: Federation, splits: dict[str, UserSplit], cfg: RunConfig, which: str = "test"
) -> dict[str, Any]:
    """Popularity and (with DP) DP popularity at each tenant's cap, on the ``which`` split (test or val)."""
    union = concat_splits(list(splits.values()))
    out: dict[str, Any] = {}
    pop = evaluate(Popularity().fit(union), union, fed.catalog, which=which, seed=cfg.seed).to_metrics()
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
            DPPopularity().fit_released(total), union, fed.catalog, which=which, seed=cfg.seed
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


def work_dir(out: Path) -> Path:
    """Where a run to ``out`` is written until it completes (a stable name, so it can be resumed)."""
    return out.parent / f".{out.name}.partial"


def simulate(
    cfg: RunConfig,
    out: Path,
    *,
    federation: Path | None,
    prepare: Callable[[Path], None] | None,
    overwrite: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = print,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run a federation into ``out`` (see module docstring). ``prepare(fed_dir)`` builds a federation."""
    t0 = time.perf_counter()
    check_out_dir(out, overwrite=overwrite)
    work = work_dir(out)
    if work.exists():
        if not overwrite:
            raise DataError(
                f"an interrupted run to {out} is waiting in {work}; continue it with "
                f"`fedrec simulate --resume {out}` or pass --overwrite to start over"
            )
        _discard(work)
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
        run_cfg = RunConfig.from_mapping(
            {
                **cfg.to_mapping(),
                "fed-dir": str(fed_dir.resolve()),
                "run-dir": str(work.resolve()),
                "run-name": cfg.run_name if cfg.run_name != "run" else f"sim-{uuid.uuid4().hex[:10]}",
                "num-tenants": len(fed.tenants),
                # absolute: the server may run in another working directory (Ray)
                "item-titles": str(Path(cfg.item_titles).resolve()) if cfg.item_titles else "",
            }
        )
        preflight(fed, run_cfg)
        work.mkdir(parents=True)
        marker = {
            "out": str(out.resolve()),
            "fed_dir": str(fed_dir.resolve()),
            "temp_fed": str(tmp_fed) if tmp_fed else None,
            "run_config": run_cfg.to_mapping(),
        }
        write_json_atomic(work / RESUME_MARKER, marker)
    except BaseException:
        if tmp_fed is not None:
            shutil.rmtree(tmp_fed, ignore_errors=True)
        raise
    return _run_to_completion(
        fed, run_cfg, out, work, tmp_fed, t0, verbose=verbose, log=log, ray_address=ray_address
    )


def resume(
    out: Path,
    *,
    verbose: bool = False,
    log: Callable[[str], None] = print,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Continue the interrupted run to ``out`` from its last complete round."""
    t0 = time.perf_counter()
    work = work_dir(out)
    marker_path = work / RESUME_MARKER
    if not marker_path.is_file():
        if out.is_dir() and (out / "metrics.json").is_file():
            raise DataError(f"{out} is a completed run; there is nothing to resume")
        raise DataError(f"nothing to resume for {out}: {marker_path} does not exist")
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    fed_dir = Path(marker["fed_dir"])
    if not (fed_dir / "federation.json").is_file():
        raise DataError(
            f"cannot resume {out}: its federation {fed_dir} is gone (and with it the tenants' state)"
        )
    check_out_dir(out, overwrite=False)
    run_cfg = RunConfig.from_mapping({**marker["run_config"], "resume": True})
    fed = open_federation(fed_dir)
    preflight(fed, run_cfg)
    done = _checkpoint_round(work)
    log(f"resuming {out} after round {done} of {run_cfg.num_server_rounds}")
    tmp_fed = Path(marker["temp_fed"]) if marker.get("temp_fed") else None
    return _run_to_completion(
        fed, run_cfg, out, work, tmp_fed, t0, verbose=verbose, log=log, ray_address=ray_address
    )


def gpu_fraction(n_tenants: int) -> float:
    """Share of a GPU per virtual SuperNode: the tenants split the local GPUs; 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return min(1.0, torch.cuda.device_count() / max(1, n_tenants))


def _checkpoint_round(work: Path) -> int:
    path = work / "checkpoint" / "round.json"
    return int(json.loads(path.read_text(encoding="utf-8"))["round"]) if path.is_file() else 0


def _run_to_completion(
    fed: Federation,
    run_cfg: RunConfig,
    out: Path,
    work: Path,
    tmp_fed: Path | None,
    t0: float,
    *,
    verbose: bool,
    log: Callable[[str], None],
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The Flower run, baselines, then the rename; on failure keep what a resume needs."""
    fed_dir = fed.fed_dir
    try:
        try:
            run_simulation(
                run_cfg.to_mapping(),
                len(fed.tenants),
                gpus_per_client=gpu_fraction(len(fed.tenants)),
                ray_address=ray_address,
                verbose=verbose,
            )
        finally:
            _shutdown_ray()
        if not (work / "metrics.json").is_file():
            raise DataError("the federated run ended without writing its metrics (see the log above)")
        log("baselines (popularity, DP popularity) …")
        splits = load_tenant_splits(fed)
        metrics = json.loads((work / "metrics.json").read_text(encoding="utf-8"))
        metrics["baselines"] = baselines(fed, splits, run_cfg)
        union_users = sum(s.n_users for s in splits.values())
        metrics["dataset"] = {
            "source": json.loads((fed_dir / "federation.json").read_text(encoding="utf-8")).get("source", ""),
            "users": union_users,
            "items": fed.catalog.n_items,
            "interactions": int(sum(s.n_train + 2 * int((s.test_item >= 0).sum()) for s in splits.values())),
            "tenants": len(fed.tenants),
        }
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(work / "metrics.json", metrics)
    except BaseException as e:
        done = _checkpoint_round(work)
        if done == 0:
            _discard(work)
            raise
        if isinstance(e, Exception):
            raise DataError(
                f"the run stopped after round {done} ({type(e).__name__}: {_first_line(e)}); "
                f"continue it with `fedrec simulate --resume {out}`"
            ) from e
        log(f"interrupted after round {done}; continue with `fedrec simulate --resume {out}`")
        raise
    (work / RESUME_MARKER).unlink()
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    if tmp_fed is not None:
        shutil.rmtree(tmp_fed, ignore_errors=True)
    return metrics


def _discard(work: Path) -> None:
    """Remove a work dir and the private temp federation it points to (if any)."""
    marker = work / RESUME_MARKER
    if marker.is_file():
        temp = json.loads(marker.read_text(encoding="utf-8")).get("temp_fed")
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:200] if text else ""


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass

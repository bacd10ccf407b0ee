"""Robustness benchmarks for the closing note of issue 6 (results as JSON lines in --out).

    python scripts/bench_robustness.py malformed --out bench.jsonl
    python scripts/bench_robustness.py matrix --fed /tmp/fed100k --rounds 10 --out bench.jsonl
    python scripts/bench_robustness.py secagg --fed /tmp/fed100k --rounds 10 --out bench.jsonl
    python scripts/bench_robustness.py kills --n 20 --out bench.jsonl

* malformed — every malformed-update kind injected by one tenant each, plain and under SecAgg+
  (in-process grid): injected / accepted, global model finite.
* matrix — HR@10 on a federation (ml-100k, 5 tenants, no DP) clean vs one adversarial tenant
  (scale ×1e6, sign flip) under fedavg+validation, median, trimmed:0.2. In-process grid (the same
  ClientApp and round loop as the Simulation Engine; no Ray) — the arithmetic is what is measured.
* secagg — `fedrec simulate` (Ray) with and without --secagg, same seed: HR@10 and wall time.
* kills — `fedrec simulate` SIGKILLed (process group: driver + Ray) at a random moment, then
  `--resume`, N times: completed, ledgers valid (chain, copy = tenant's own), rounds charged twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEDREC = [sys.executable, "-m", "fedrec"]


def emit(out: Path, record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def env(home: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home / "flwr-home"),
        COLUMNS="200",
    )
    return e


def small_fed(root: Path, tenants: int, users_each: int, seed: int) -> Path:
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
    from fedrec.simulations.data.sources import load

    data = prepare_dataset(load("synthetic", synth_users=users_each * tenants, synth_items=80, seed=seed))
    fed = root / f"fed-{tenants}x{users_each}"
    prepare_federation(data, fed, PrepareConfig(tenants=tenants, partition="iid", seed=seed, k_anonymity=2))
    return fed


def loopback_run(cfg: Any, tenants: int) -> dict[str, Any]:
    from fedrec.client.app import app
    from fedrec.server.loop import run_federation
    from fedrec.simulations.driver.loopback import LoopbackGrid

    return run_federation(LoopbackGrid(app, cfg.to_mapping(), tenants), cfg, log=lambda _: None)


# ---------------------------------------------------------------- malformed
KINDS = ["nan", "inf", "shape", "dtype", "keys", "scale=1e6", "users=0", "users=-3", "users=100000"]


def bench_malformed(args: argparse.Namespace) -> None:
    import torch

    from fedrec.shared_model.artifacts import load_model
    from fedrec.shared_model.runconfig import RunConfig

    root = Path(tempfile.mkdtemp(prefix="bench-malformed-"))
    n = len(KINDS) + 1
    fed = small_fed(root, n, 30, seed=4)
    for secagg in (False, True):
        run = root / f"run-{int(secagg)}"
        cfg = RunConfig(
            fed_dir=str(fed),
            run_dir=str(run),
            run_name=f"malformed-{int(secagg)}",
            num_server_rounds=args.rounds,
            num_tenants=n,
            dp=False,
            batch_users=16,
            secagg=secagg,
            fault_adversary=",".join(f"tenant-{i}:{k}" for i, k in enumerate(KINDS)),
        )
        loopback_run(cfg, n)
        rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
        per_kind: dict[str, dict[str, int]] = {}
        for row in rows:
            for i, kind in enumerate(KINDS):
                info = row["tenants"][f"tenant-{i}"]
                d = per_kind.setdefault(kind, {"injected": 0, "accepted": 0})
                d["injected"] += 1
                d["accepted"] += int(info.get("aggregated") is True)
        honest = sum(r["tenants"][f"tenant-{n - 1}"].get("aggregated") is True for r in rows)
        state = load_model(run).model.state_dict()
        finite = all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
        emit(
            args.out,
            {
                "bench": "malformed",
                "secagg": secagg,
                "rounds": args.rounds,
                "injected": sum(d["injected"] for d in per_kind.values()),
                "accepted": sum(d["accepted"] for d in per_kind.values()),
                "per_kind": per_kind,
                "honest_aggregated": honest,
                "model_finite": finite,
            },
        )
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- matrix
def bench_matrix(args: argparse.Namespace) -> None:
    import numpy as np

    from fedrec.shared_model.artifacts import load_model
    from fedrec.shared_model.runconfig import RunConfig

    def params(run: Path) -> np.ndarray:
        model = load_model(run).model
        return np.concatenate([p.detach().numpy().ravel() for _, p in model.named_parameters()])

    root = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    clean: np.ndarray | None = None  # the clean fedavg model: what "not moved" means
    for adversary in ("", "tenant-0:scale=1e6", "tenant-0:signflip"):
        for aggregation in ("fedavg", "median", "trimmed:0.2"):
            run = root / f"{aggregation}-{adversary or 'clean'}".replace(":", "_")
            cfg = RunConfig(
                fed_dir=str(args.fed),
                run_dir=str(run),
                run_name=f"m-{run.name}-{time.time_ns()}",
                num_server_rounds=args.rounds,
                num_tenants=args.tenants,
                dp=False,
                eval_every=args.rounds,
                aggregation=aggregation,
                fault_adversary=adversary,
                seed=args.seed,
            )
            t0 = time.perf_counter()
            metrics = loopback_run(cfg, args.tenants)
            rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
            rejected = sum(1 for r in rows for i in r["tenants"].values() if i["status"] == "rejected")
            w = params(run)
            if clean is None:
                clean = w
            drift = float(np.linalg.norm(w - clean))
            emit(
                args.out,
                {
                    "bench": "matrix",
                    "aggregation": aggregation,
                    "adversary": adversary or "none",
                    "hr@10": metrics["full"]["hr@10"],
                    "ndcg@10": metrics["full"]["ndcg@10"],
                    "rejected_updates": rejected,
                    "l2_from_clean_fedavg_model": round(drift, 4),
                    "rounds": args.rounds,
                    "seconds": round(time.perf_counter() - t0, 1),
                },
            )
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- secagg on/off (Ray)
def bench_secagg(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    results = {}
    for secagg in (False, True):
        out = root / f"run-{int(secagg)}"
        cmd = [*FEDREC, "simulate", "--federation", str(args.fed), "--rounds", str(args.rounds), "--no-dp"]
        cmd += ["--seed", str(args.seed), "--round-timeout", "600", "--out", str(out)]
        if secagg:
            cmd.append("--secagg")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env(root), capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            emit(args.out, {"bench": "secagg", "secagg": secagg, "error": proc.stderr[-800:]})
            return
        m = json.loads((out / "metrics.json").read_text())
        results[secagg] = {"hr@10": m["full"]["hr@10"], "ndcg@10": m["full"]["ndcg@10"], "wall_s": wall}
        emit(args.out, {"bench": "secagg", "secagg": secagg, **results[secagg], "rounds": args.rounds})
    emit(
        args.out,
        {
            "bench": "secagg-summary",
            "hr@10_diff": results[True]["hr@10"] - results[False]["hr@10"],
            "wall_ratio": results[True]["wall_s"] / results[False]["wall_s"],
        },
    )
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- kill -9 + resume (Ray)
def ledger_check(run: Path, fed: Path) -> tuple[bool, int]:
    """(every ledger valid and equal to the tenant's own, rounds charged twice)."""
    from fedrec.privacy.ledger import read_entries, verify_chain

    config = json.loads((run / "config.json").read_text())["run_config"]
    privacy = json.loads((run / "privacy.json").read_text())
    ok, twice = True, 0
    for tenant, info in privacy["tenants"].items():
        copy, problems = read_entries(run / "ledger" / f"{tenant}.jsonl")
        own, own_problems = read_entries(fed / tenant / "state" / config["run-name"] / "ledger.jsonl")
        rounds = [e["round"] for e in own]
        twice += len(rounds) - len(set(rounds))
        ok &= not problems and not own_problems
        ok &= not verify_chain(copy, expected_head=info["ledger_head"]) and not verify_chain(own)
        ok &= [e["hash"] for e in copy] == [e["hash"] for e in own]
    return ok, twice


def bench_kills(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="bench-kills-"))
    fed = small_fed(root, 3, 100, seed=9)
    base = [*FEDREC, "simulate", "--federation", str(fed), "--rounds", str(args.rounds), "--epsilon", "8"]
    base += ["--batch-users", "32"]
    # one clean run to learn how long a run takes
    t0 = time.perf_counter()
    clean = subprocess.run(
        [*base, "--out", str(root / "clean")], env=env(root), capture_output=True, text=True, timeout=3600
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    duration = time.perf_counter() - t0
    emit(args.out, {"bench": "kills-clean-run", "seconds": round(duration, 1), "rounds": args.rounds})
    horizon = 0.9 * duration  # kill moments are drawn in [2 s, horizon]; shrunk when runs get faster
    for i in range(args.n):
        out = root / f"run-{i}"
        at = rng.uniform(2.0, horizon)
        proc = subprocess.Popen(
            [*base, "--out", str(out)],
            env=env(root),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started = time.perf_counter()
        try:
            proc.wait(timeout=at)
            finished_first = True
            horizon = min(horizon, 0.9 * (time.perf_counter() - started))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            finished_first = False
        work = out.parent / f".{out.name}.partial"
        ck = work / "checkpoint" / "round.json"
        killed_after = json.loads(ck.read_text())["round"] if ck.is_file() else 0
        resumes = 0
        note = ""
        if not finished_first:
            if (work / "resume.json").is_file():
                res = subprocess.run(
                    [*FEDREC, "simulate", "--resume", str(out)],
                    env=env(root),
                    capture_output=True,
                    text=True,
                    timeout=3600,
                )
                resumes = 1
                if res.returncode != 0:
                    note = res.stderr.strip().splitlines()[-1][:300] if res.stderr.strip() else "failed"
            else:
                note = "killed before the run's work dir existed: nothing to resume, rerun"
        completed = (out / "metrics.json").is_file()
        rounds_ok, valid, twice = False, False, -1
        if completed:
            rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
            rounds_ok = [r["round"] for r in rows] == list(range(1, args.rounds + 1))
            valid, twice = ledger_check(out, fed)
        emit(
            args.out,
            {
                "bench": "kill",
                "i": i,
                "kill_at_s": round(at, 1),
                "finished_before_kill": finished_first,
                "checkpoint_round_at_kill": killed_after,
                "resumed": resumes,
                "completed": completed,
                "rounds_ok": rounds_ok,
                "ledgers_valid": valid,
                "rounds_charged_twice": twice,
                "note": note,
            },
        )
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["malformed", "matrix", "secagg", "kills"])
    ap.add_argument("--out", type=Path, default=Path("bench_robustness.jsonl"))
    ap.add_argument("--fed", type=Path, help="federation folder (fedrec prepare) for matrix/secagg")
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--n", type=int, default=20, help="kills")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for k, v in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}.items():
        os.environ.setdefault(k, v)
    {"malformed": bench_malformed, "matrix": bench_matrix, "secagg": bench_secagg, "kills": bench_kills}[
        args.what
    ](args)


if __name__ == "__main__":
    main()

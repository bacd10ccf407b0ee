"""HR@10 of the shipped item-release path (approach auto / dp_ease / dp_popularity) through the real
ServerApp loop and ClientApp, over the in-process grid (no Ray; the same code as `fedrec simulate`).

Each seed prepares a fresh federation (iid partition into --tenants, pseudonymized, k-anonymized,
encrypted), then runs every (ε, approach, SecAgg) point on it; the table is the median over seeds.

    python scripts/measure_release.py --data ../shared/data/ml-100k --tenants 5 --eps 1,2,4,8 --seeds 3
    python scripts/measure_release.py --data synthetic --synth-users 100000 --synth-items 1000 --eps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.client.app import app
from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--synth-users", type=int, default=None)
    ap.add_argument("--synth-items", type=int, default=None)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eps", default="1,2,4,8")
    ap.add_argument("--approaches", default="auto,dp_ease,dp_popularity")
    ap.add_argument("--secagg", default="off,on", help="off, on or off,on")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    eps_list = [float(e) for e in args.eps.split(",")]
    approaches = args.approaches.split(",")
    modes = [m == "on" for m in args.secagg.split(",")]
    rows: list[dict] = []
    for seed in range(args.seeds):
        data = prepare_dataset(
            load(args.data, synth_users=args.synth_users, synth_items=args.synth_items, seed=seed)
        )
        root = Path(tempfile.mkdtemp(prefix="fedrec-release-"))
        fed = root / "fed"
        prepare_federation(
            data, fed, PrepareConfig(tenants=args.tenants, partition="iid", seed=seed, k_anonymity=2)
        )
        for eps in eps_list:
            for secagg in modes:
                for approach in approaches:
                    name = f"s{seed}-e{eps:g}-{approach}-{'sa' if secagg else 'loc'}"
                    cfg = RunConfig(
                        fed_dir=str(fed),
                        run_dir=str(root / name),
                        run_name=name,
                        num_tenants=args.tenants,
                        epsilon=eps,
                        approach=approach,
                        secagg=secagg,
                        seed=seed,
                    )
                    t0 = time.perf_counter()
                    m = run_federation(
                        LoopbackGrid(app, cfg.to_mapping(), args.tenants), cfg, log=lambda _: None
                    )
                    privacy = json.loads((root / name / "privacy.json").read_text())
                    row = {
                        "seed": seed,
                        "epsilon": eps,
                        "approach": approach,
                        "picked": privacy["approach"]["name"],
                        "noise": "distributed" if secagg else "local",
                        "hr@10": m["full"]["hr@10"],
                        "ndcg@10": m["full"]["ndcg@10"],
                        "max_eps": max(t["epsilon"] for t in privacy["tenants"].values()),
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print("| ε | noise | approach | picked | HR@10 (median) | per seed | s / run |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted(
        {(r["epsilon"], r["noise"], r["approach"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2])
    )
    for eps, noise, approach in keys:
        sel = [r for r in rows if (r["epsilon"], r["noise"], r["approach"]) == (eps, noise, approach)]
        hrs = [r["hr@10"] for r in sel]
        picked = "/".join(sorted({r["picked"] for r in sel}))
        print(
            f"| {eps:g} | {noise} | {approach} | {picked} | {statistics.median(hrs):.4f} | "
            f"{' '.join(f'{h:.3f}' for h in hrs)} | {statistics.median(r['seconds'] for r in sel):.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

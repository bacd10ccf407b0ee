"""Tune the federated MLP recipe through the real ServerApp loop and ClientApp on the in-process grid
(no Ray; the same code as `fedrec simulate`), choosing on federated VALIDATION only.

    python scripts/tune_federated.py --data ../shared/data/ml-100k --tenants 5 --partition dirichlet:0.5 \
        --seeds 0 1 2 --set dp=false --set local-epochs=5 [--set KEY=VALUE ...] [--out results.jsonl]

Each seed prepares a fresh federation (the partition depends on the seed), runs the configuration
(run-config keys as in pyproject.toml; unset keys keep their auto values) and prints one JSON line:
the best validation NDCG@10/HR@10 and its round, the test HR@10 of the final model, seconds. Test
figures are reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.client.app import app
from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid
from fedrec.simulations.driver.simulate import baselines, load_tenant_splits, open_federation


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], help="run-config KEY=VALUE (kebab-case)")
    ap.add_argument("--synth-users", type=int, default=None, help="--data synthetic: users")
    ap.add_argument("--synth-items", type=int, default=None, help="--data synthetic: items")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    overrides = {k: _value(v) for k, _, v in (s.partition("=") for s in args.set)}
    rows = []
    for seed in args.seeds:
        data = prepare_dataset(
            load(args.data, seed=seed, synth_users=args.synth_users, synth_items=args.synth_items)
        )
        root = Path(tempfile.mkdtemp(prefix="fedrec-tune-"))
        fed = root / "fed"
        pcfg = PrepareConfig(tenants=args.tenants, partition=args.partition, seed=seed, k_anonymity=5)
        prepare_federation(data, fed, pcfg)
        cfg = RunConfig.from_mapping(
            {
                "fed-dir": str(fed),
                "run-dir": str(root / "run"),
                "run-name": "tune",
                "num-tenants": args.tenants,
                "approach": "mlp",
                "seed": seed,
                **overrides,
            }
        )
        t0 = time.perf_counter()
        m = run_federation(LoopbackGrid(app, cfg.to_mapping(), args.tenants), cfg, log=lambda _: None)
        lines = (root / "run" / "rounds.jsonl").read_text().splitlines()
        vals = [json.loads(x).get("val", {}) for x in lines]
        best = max(range(len(vals)), key=lambda i: vals[i].get("ndcg@10", -1))
        row = {
            "tag": args.tag,
            "seed": seed,
            "set": overrides,
            "approach": m.get("approach", {}).get("name"),  # what auto picked (the head trains as mlp)
            "best_round": best + 1,
            "val_ndcg@10": round(vals[best].get("ndcg@10", float("nan")), 5),
            "val_hr@10": round(vals[best].get("hr@10", float("nan")), 5),
            "val_curve": [round(v.get("hr@10", float("nan")), 4) for v in vals],
            # the last validated round's HR@10: the model a DP run keeps (final-model last)
            "val_last_hr@10": round(
                next((v["hr@10"] for v in reversed(vals) if "hr@10" in v), float("nan")), 5
            ),
            "test_hr@10": round(m["full"]["hr@10"], 5),
            "final": m.get("final_model"),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        state = torch.load(root / "run" / "model.pt", weights_only=True)
        if "mix.weight" in state:  # the learned weight of the head's dot term
            row["mix"] = round(float(state["mix.weight"].flatten()[0]), 4)
        if cfg.dp:  # DP popularity at the same caps, as `fedrec simulate` reports it
            f = open_federation(fed)
            base = baselines(f, load_tenant_splits(f), cfg)
            row["dp_popularity_hr@10"] = round(base["dp_popularity"]["full"]["hr@10"], 5)
            vbase = baselines(f, load_tenant_splits(f), cfg, which="val")
            row["dp_popularity_val_hr@10"] = round(vbase["dp_popularity"]["full"]["hr@10"], 5)
            row["popularity_val_hr@10"] = round(vbase["popularity"]["full"]["hr@10"], 5)
            row["epsilon_max"] = max(
                t["epsilon"] or 0
                for t in json.loads((root / "run" / "privacy.json").read_text())["tenants"].values()
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    if len(rows) > 1:
        summary = {
            "tag": args.tag,
            "set": overrides,
            "median_val_ndcg@10": statistics.median(r["val_ndcg@10"] for r in rows),
            "median_test_hr@10": statistics.median(r["test_hr@10"] for r in rows),
        }
        if "dp_popularity_hr@10" in rows[0]:
            summary["median_dp_popularity_hr@10"] = statistics.median(r["dp_popularity_hr@10"] for r in rows)
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()

"""Wall time and peak RSS of a whole DP run at scale (issue 15 item 4): the ``scale`` synthetic set
(default 30 000 users × 40 000 items), prepared into tenants, then the real ServerApp loop and ClientApp
over the in-process grid (no Ray; the same code as ``fedrec simulate``): release(s), fit, evaluation.

Peak RSS is the process's ``ru_maxrss`` after each phase (it only grows), plus a 0.2 s sampler of the
current RSS so the table says which phase set the peak. Prints one JSON line per phase and a summary.

    python scripts/measure_scale.py --users 30000 --items 40000 --tenants 5 --epsilon 8 --secagg
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.client.app import app
from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.data.synth_scale import SynthSpec
from fedrec.simulations.driver.loopback import LoopbackGrid


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class Sampler(threading.Thread):
    """Highest current RSS seen since the last :meth:`take` (the phase's own peak)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.2)

    def take(self) -> float:
        out, self.peak = max(self.peak, rss_mb()), rss_mb()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--approach", default="auto")
    ap.add_argument("--gram-limit", type=int, default=4000)
    ap.add_argument("--secagg", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sampler = Sampler()
    sampler.start()
    phases: list[dict] = []

    def phase(name: str, t0: float, **extra: object) -> None:
        row = {
            "phase": name,
            "wall_s": round(time.perf_counter() - t0, 1),
            "phase_peak_rss_mb": round(sampler.take()),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **extra,
        }
        phases.append(row)
        print(json.dumps(row), flush=True)

    root = Path(tempfile.mkdtemp(prefix="fedrec-scale-"))
    try:
        t0 = time.perf_counter()
        raw = load(
            "synthetic",
            synth_users=args.users,
            synth_items=args.items,
            seed=args.seed,
            synth=SynthSpec(profile="scale"),
        )
        data = prepare_dataset(raw)
        phase("generate+split", t0, interactions=data.n_interactions)
        t0 = time.perf_counter()
        prepare_federation(
            data,
            root / "fed",
            PrepareConfig(tenants=args.tenants, partition="iid", seed=args.seed, k_anonymity=2),
        )
        del raw, data
        phase("prepare (partition, anonymise, encrypt)", t0)
        cfg = RunConfig(
            fed_dir=str(root / "fed"),
            run_dir=str(root / "run"),
            run_name="scale",
            num_tenants=args.tenants,
            epsilon=args.epsilon,
            approach=args.approach,
            gram_limit=args.gram_limit,
            secagg=args.secagg,
        )
        t0 = time.perf_counter()
        lines: list[str] = []
        metrics = run_federation(
            LoopbackGrid(app, cfg.to_mapping(), args.tenants), cfg, log=lambda line: lines.append(line)
        )
        rounds = [json.loads(x) for x in (root / "run" / "rounds.jsonl").read_text().splitlines()]
        phase(
            "DP run (release(s), fit, validation, test)",
            t0,
            approach=json.loads((root / "run" / "privacy.json").read_text())["approach"]["name"],
            round_seconds=[r["seconds"] for r in rounds],
            fit_seconds=[r.get("release", {}).get("fit_seconds") for r in rounds],
            test=metrics["full"],
        )
        print(json.dumps({"log": lines}), flush=True)
    finally:
        sampler.stop = True
        shutil.rmtree(root, ignore_errors=True)
    total = sum(p["wall_s"] for p in phases)
    print(
        json.dumps(
            {"summary": {"total_wall_s": round(total, 1), "peak_rss_mb": phases[-1]["process_peak_rss_mb"]}}
        )
    )


if __name__ == "__main__":
    main()

"""Wall time and peak RSS of a whole DP run at scale (issue 15 item 4): the ``scale`` synthetic set
(default 30 000 users × 40 000 items), prepared into tenants, then the real ServerApp loop and ClientApp
over the in-process grid (no Ray; the same code as ``fedrec simulate``): release(s), fit, evaluation.

Peak RSS is the process's ``ru_maxrss`` after each phase (it only grows), plus a 0.2 s sampler of the
current RSS so the table says which phase set the peak. Prints one JSON line per phase and a summary.
The DP run's line also says how much of it was the federated evaluation (``eval_s``: every
validation and test evaluation round trip, timed around the server's ``federated_eval``), and a last
phase computes the baselines ``fedrec simulate`` adds to ``metrics.json`` (popularity and DP
popularity on the test split): the whole run is what ``fedrec simulate`` does.

``--code CHECKOUT`` imports fedrec from another checkout (e.g. the main branch's) with this same
script, so old and new code are timed by one harness, back to back:

    python scripts/measure_scale.py --users 30000 --items 40000 --tenants 5 --epsilon 8 --secagg
    python scripts/measure_scale.py --code /path/to/old/checkout ...   # the reference, same flags
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

_CODE = (
    sys.argv[sys.argv.index("--code") + 1]
    if "--code" in sys.argv
    else str(Path(__file__).resolve().parents[1])
)
sys.path.insert(0, _CODE)

import fedrec.server.loop as server_loop  # noqa: E402
from fedrec.client.app import app  # noqa: E402
from fedrec.server.loop import run_federation  # noqa: E402
from fedrec.shared_model.runconfig import RunConfig  # noqa: E402
from fedrec.simulations.data.dataset import prepare_dataset  # noqa: E402
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation  # noqa: E402
from fedrec.simulations.data.sources import load  # noqa: E402
from fedrec.simulations.data.synth_scale import SynthSpec  # noqa: E402
from fedrec.simulations.driver.loopback import LoopbackGrid  # noqa: E402
from fedrec.simulations.driver.simulate import baselines, load_tenant_splits, open_federation  # noqa: E402


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


def _select_rule(args: argparse.Namespace) -> dict[str, float]:
    """As ``fedrec simulate``: an explicit --gram-limit turns the M rule off unless --select-rule is given
    (nothing for a checkout that predates the rule)."""
    if "select_rule" not in {f.name for f in dataclasses.fields(RunConfig)}:
        return {}
    if args.select_rule is not None:
        return {"select_rule": args.select_rule}
    return {"select_rule": RunConfig.select_rule if args.gram_limit is None else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--approach", default="auto")
    ap.add_argument(
        "--gram-limit",
        type=int,
        default=None,
        help="as fedrec simulate: given, M = this (the M rule off) [4000]",
    )
    ap.add_argument("--select-rule", type=float, default=None, help="the M rule's c [the run config's]")
    ap.add_argument("--secagg", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--code", default=_CODE, help="the checkout whose fedrec is timed [this one]")
    args = ap.parse_args()
    eval_seconds: list[float] = []
    inner_eval = server_loop.federated_eval

    def timed_eval(*a: object, **kw: object) -> object:
        t = time.perf_counter()
        try:
            return inner_eval(*a, **kw)
        finally:
            eval_seconds.append(time.perf_counter() - t)

    server_loop.federated_eval = timed_eval
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
            gram_limit=RunConfig.gram_limit if args.gram_limit is None else args.gram_limit,
            **_select_rule(args),
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
            select=[r["release"]["select"] for r in rounds if "select" in r.get("release", {})],
            eval_s=[round(x, 1) for x in eval_seconds],
            test=metrics["full"],
        )
        print(json.dumps({"log": lines}), flush=True)
        t0 = time.perf_counter()
        fed = open_federation(root / "fed")
        base = baselines(fed, load_tenant_splits(fed), cfg)
        phase(
            "baselines (popularity, DP popularity: test)",
            t0,
            test={k: v["full"] for k, v in base.items()},
        )
    finally:
        sampler.stop = True
        shutil.rmtree(root, ignore_errors=True)
    total = sum(p["wall_s"] for p in phases)
    summary = {
        "code": args.code,
        "total_wall_s": round(total, 1),
        "eval_s": round(sum(eval_seconds), 1),
        "peak_rss_mb": phases[-1]["process_peak_rss_mb"],
    }
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()

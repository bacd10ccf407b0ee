"""DP-EASE with spectral denoising (the shipped rule) vs the first ridge-only rule vs EigenGram.

The comparison behind the choice of the DP-EASE estimator (docs/PRIVACY_UTILITY.md). Same release
(5 tenants, iid partition, local or distributed noise), scored on the VALIDATION items by default, so
the choice is not made on test items; synthetic generator seeds start at 100 (the frontier uses 0–2).

    python scripts/ablate_denoise.py --data 10000 --which val --seeds 2 --eps 1,2,8,inf
    python scripts/ablate_denoise.py --data ml100k --which val --seeds 3 --eps 1,2,8,inf
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.privacy import gram
from fedrec.shared_model.dp_item import DPEASE, EigenGram
from fedrec.shared_model.evaluate import evaluate
from fedrec.simulations.data.partition import PartitionSpec, partition_users
from fedrec.simulations.reports.frontier import load_path, load_synthetic

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="10000", help="ml100k or a synthetic user count")
    ap.add_argument("--which", default="val", choices=("val", "test"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--eps", default="1,2,8,inf")
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eval-users", type=int, default=3000)
    ap.add_argument("--ml100k", type=Path, default=ML100K, help="the MovieLens-100K folder")
    args = ap.parse_args()
    res: dict[tuple[float, str, str], list[float]] = {}
    for seed in range(args.seeds):
        if args.data == "ml100k":
            split, cat = load_path(args.ml100k)
        else:
            split, cat = load_synthetic(int(args.data), 1000, seed + 100)
        parts = partition_users(split, cat, args.tenants, PartitionSpec("iid"), seed=seed, min_users=1)
        xs = [gram.unit_rows(s.indptr, s.train_items, s.n_items) for s in (split.subset(p) for p in parts)]
        target = split.val_item if args.which == "val" else split.test_item
        ev_users = np.flatnonzero(target >= 0)
        if len(ev_users) > args.eval_users:
            ev_users = np.sort(np.random.default_rng(seed).choice(ev_users, args.eval_users, replace=False))
        ev = split.subset(ev_users)
        rng = np.random.default_rng()  # release noise: fresh
        for eps in (float(e) for e in args.eps.split(",")):
            sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=1e-5)
            for mode, shares in (("local", 1), ("distributed", args.tenants)):
                if sigma == 0 and mode == "distributed":
                    continue
                noise = gram.ReleaseNoise(sigma=sigma, pop_share=0.0, shares=shares)
                g = gram.server_sum([gram.release(x, noise, rng) for x in xs]).gram
                assert g is not None
                one = gram.ReleaseNoise(sigma=noise.local_sigma * math.sqrt(args.tenants), pop_share=0.0)
                od, dg = (one.offdiag_std(), one.diag_std()) if sigma > 0 else (0.0, 0.0)
                models: dict[str, object] = {
                    "denoised (shipped)": DPEASE().fit_gram(
                        g, offdiag_std=od, diag_std=dg, users=split.n_users
                    ),
                    "ridge-only": DPEASE(denoise=False).fit_gram(
                        g, offdiag_std=od, diag_std=dg, users=split.n_users
                    ),
                }
                if sigma > 0:
                    models["EigenGram"] = EigenGram().fit_gram(
                        g, offdiag_std=od, diag_std=dg, users=split.n_users
                    )
                for name, m in models.items():
                    hr = evaluate(m, ev, cat, which=args.which, seed=seed).to_metrics()["full"]["hr@10"]  # type: ignore[arg-type]
                    res.setdefault((eps, mode, name), []).append(hr)
    print(f"| ε | noise | estimator | HR@10 ({args.which}, median) | per seed |")
    print("|---|---|---|---|---|")
    for (eps, mode, name), v in sorted(res.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
        print(f"| {eps:g} | {mode} | {name} | {np.median(v):.4f} | {' '.join(f'{x:.3f}' for x in v)} |")


if __name__ == "__main__":
    main()

"""Ablations of the DP item–item stage (docs/PRIVACY_UTILITY.md): what each part of DP-EASE buys.

For each data set and ε, 5 iid tenants, local noise (σ·√5 in the sum) unless noted, test full HR@10,
median over ``--seeds`` noise draws (one partition). Variants:

* ``rule``: DP-EASE as shipped (√2-exact sensitivity, support and λ from DPEASERule);
* ``naive_sens``: the upper triangle noised at sensitivity 1 (σ instead of σ/√2 off the diagonal);
* ``all_items``: no support rule (every item; λ from the rule for that M);
* ``lam_fixed``: the non-private λ (lam_per_user·users) whatever the noise;
* ``eigen``: top eigenvectors above the noise edge instead of EASE (and how many survive);
* ``distributed``: the same release under SecAgg distributed noise (σ in the sum).

Usage: ``python scripts/ablate_dp_item.py --data ml100k|synthetic:USERS [--eps 8,3,1] [--seeds 3]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from fedrec.privacy import gram
from fedrec.shared_model.baselines import DPPopularity
from fedrec.shared_model.dp_item import DPEASE, DPEASERule, EigenGram
from fedrec.shared_model.evaluate import evaluate
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.partition import PartitionSpec, partition_users
from fedrec.simulations.data.sources import load, synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="ml100k")
    ap.add_argument("--eps", default="8,3,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eval-users", type=int, default=5000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.data == "ml100k":
        data = prepare_dataset(load("/work/shared/data/ml-100k"))
    else:
        data = prepare_dataset(synthetic(users=int(args.data.split(":")[1]), items=1000, seed=0))
    split, cat = data.split, data.catalog
    k = args.tenants
    parts = partition_users(split, cat, k, PartitionSpec("iid"), seed=0, min_users=1)
    xs = [gram.unit_rows(s.indptr, s.train_items, s.n_items) for s in (split.subset(p) for p in parts)]
    users = split.n_users
    test = np.flatnonzero(split.test_item >= 0)
    if len(test) > args.eval_users:
        test = np.sort(np.random.default_rng(7).choice(test, args.eval_users, replace=False))
    ev = split.subset(test)
    rng = np.random.default_rng()

    def hr(s: object) -> float:
        return float(evaluate(s, ev, cat, which="test").to_metrics()["full"]["hr@10"])  # type: ignore[arg-type]

    print(f"{args.data}: {users} users, {split.n_items} items, {k} tenants, {len(test)} test users")
    for eps in (float(e) for e in args.eps.split(",")):
        sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=1e-5)
        res: dict[str, list[float]] = {}
        comps: list[int] = []
        for _ in range(args.seeds):
            for name, shares, sens in (
                ("local", 1, 1.0),
                ("distributed", k, 1.0),
                ("naive", 1, math.sqrt(2)),
            ):
                noise = gram.ReleaseNoise(sigma=sigma * sens, pop_share=0.0, shares=shares)
                total = gram.server_sum([gram.release(x, noise, rng) for x in xs])
                one = gram.ReleaseNoise(sigma=noise.local_sigma * math.sqrt(k), pop_share=0.0)
                g = total.gram
                assert g is not None
                kw = {"offdiag_std": one.offdiag_std(), "diag_std": one.diag_std(), "users": users}
                if name == "local":
                    t0 = time.perf_counter()
                    model = DPEASE().fit_gram(g, **kw)
                    res.setdefault("fit_s", []).append(time.perf_counter() - t0)
                    res.setdefault("rule", []).append(hr(model))
                    assert model.items is not None
                    res.setdefault("M", []).append(len(model.items))
                    all_rule = DPEASERule(diag_z=0.0, max_items=split.n_items)
                    res.setdefault("all_items", []).append(hr(DPEASE(all_rule).fit_gram(g, **kw)))
                    lam0 = DPEASERule().lam_per_user * users
                    res.setdefault("lam_fixed", []).append(hr(DPEASE().fit_gram(g, lam=lam0, **kw)))
                    eig = EigenGram().fit_gram(g, **kw)
                    comps.append(eig.components)
                    res.setdefault("eigen", []).append(hr(eig))
                elif name == "distributed":
                    res.setdefault("distributed", []).append(hr(DPEASE().fit_gram(g, **kw)))
                else:
                    res.setdefault("naive_sens", []).append(hr(DPEASE().fit_gram(g, **kw)))
            pops = [gram.release(x, gram.ReleaseNoise(sigma, 1.0), rng).popularity for x in xs]
            res.setdefault("dp_popularity", []).append(hr(DPPopularity().fit_released(np.sum(pops, axis=0))))
        med = {key: round(statistics.median(v), 4) for key, v in res.items()}
        print(f"ε={eps:g} σ={sigma:.3f}: {med} eigen components {sorted(comps)}", flush=True)


if __name__ == "__main__":
    main()

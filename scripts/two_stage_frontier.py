"""Recall@20 of the two-stage DP release (``dp_two_stage``) vs DP popularity and non-private EASE on a
large catalogue (docs/PRIVACY_UTILITY.md, "Large catalogues"), with the product's own functions:
``fedrec.privacy.gram`` (unit rows, selection, noise, σ calibration and composition) and
``fedrec.server.release.fit_release`` (DP-EASE on the noisy Gram of the selection, the rest by the
stage-1 DP popularity), scored by :class:`ItemReleaseModel` over the whole catalogue.

Data: the ``scale`` synthetic set (default 30 000 users × 40 000 items), each user's items split 80/20
at random into train/test (a given split, as in the LightGCN family); full ranking over all items not
in the user's train set, Recall@20 = hits / |test items|. Noise of the server's sum: ``secagg`` = one
release's σ (SecAgg+ distributed noise), ``local`` = every one of ``--tenants`` tenants adds its full σ
(σ·√tenants). ``--which val`` scores a validation split carved out of train instead (for tuning M and
the selection share without touching test).

    python scripts/two_stage_frontier.py --eps 8,3 --modes secagg,local
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.privacy import gram
from fedrec.server.release import fit_release
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.ranking import top_k
from fedrec.simulations.data.sources import synthetic
from fedrec.simulations.data.synth_scale import SynthSpec


def split(
    users: int, items: int, seed: int, which: str
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], int]:
    """(indptr, train items) CSR and each user's held-out items (test, or val carved from train)."""
    raw = synthetic(users=users, items=items, seed=seed, spec=SynthSpec(profile="scale")).interactions
    u = raw["user"].astype(np.int64).to_numpy() - 1
    i = raw["item"].astype(np.int64).to_numpy() - 1
    r = np.random.default_rng(seed + 1000).random(len(u))
    test = r < 0.2  # 20% of each user's items (in expectation) are test
    if which == "val":  # test dropped; validation = 20% of what is left, carved out of train
        keep = ~test
        u, i, held = u[keep], i[keep], (r[keep] < 0.36)
    else:
        held = test
    order = np.argsort(u, kind="stable")
    u, i, held = u[order], i[order], held[order]
    tr_u, tr_i = u[~held], i[~held]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(tr_u, minlength=users))])
    te_ptr = np.concatenate([[0], np.cumsum(np.bincount(u[held], minlength=users))])
    te_items = i[held]
    tests = [te_items[te_ptr[k] : te_ptr[k + 1]] for k in range(users)]
    return indptr, tr_i, tests, items


def recall_at(
    model: ItemReleaseModel, indptr: np.ndarray, items: np.ndarray, tests: list[np.ndarray], k: int = 20
) -> float:
    """Mean Recall@k over users with a held-out item, in batches of 256 users (never users × items)."""
    n = model.cfg.n_items
    users = [u for u in range(len(tests)) if len(tests[u])]
    total = 0.0
    for lo in range(0, len(users), 256):
        batch = users[lo : lo + 256]
        hists = [items[indptr[u] : indptr[u + 1]] for u in batch]
        width = max(1, max(len(h) for h in hists))
        h = np.full((len(batch), width), n, dtype=np.int64)
        for r, hist in enumerate(hists):
            h[r, : len(hist)] = hist
        s = model.score_all(torch.from_numpy(h)).numpy().astype(np.float64)  # (B, N)
        for r, hist in enumerate(hists):
            s[r, hist] = -np.inf
        top, _ = top_k(s, k)
        for r, u in enumerate(batch):
            total += np.isin(tests[u], top[r]).sum() / len(tests[u])
    return total / len(users)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eps", default="8,3")
    ap.add_argument("--modes", default="secagg,local")
    ap.add_argument("--m", type=int, default=4000, help="items selected for the Gram (gram-limit)")
    ap.add_argument("--select-share", type=float, default=0.1)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--which", default="test", choices=("test", "val"))
    ap.add_argument("--shrinkage", default="soft", help="soft, optimal or soft,optimal (same noisy release)")
    ap.add_argument("--no-ease", action="store_true", help="skip the non-private EASE reference")
    args = ap.parse_args()
    t0 = time.perf_counter()
    indptr, items, tests, n = split(args.users, args.items, args.seed, args.which)
    x_all = gram.unit_rows(indptr, items, n)
    p_exact = np.asarray(x_all.sum(axis=0)).ravel()
    rng = np.random.default_rng(args.seed + 7)
    out: list[dict] = []

    def emit(**row: object) -> None:
        row = {"which": args.which, "m": args.m, "select_share": args.select_share, **row}
        out.append(row)
        print(json.dumps(row), flush=True)

    if not args.no_ease:
        sel = gram.select_top(p_exact, args.m)
        xs = gram.selected_rows(indptr, items, n, sel)
        g = (xs.T @ xs).toarray()
        model = fit_release(
            {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=args.users, sigma_sum=0.0, dp=False,
            stage=2, selection=sel, prior=np.log1p(p_exact),
        )  # fmt: skip
        recall = recall_at(model, indptr, items, tests)
        emit(approach="ease (non-private, same M items)", epsilon=None, mode=None, recall20=recall)
    for eps in [float(e) for e in args.eps.split(",")]:
        sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=args.delta)
        sigma1 = gram.stage_one_sigma(sigma, args.select_share)
        sigma2 = gram.calibrate_release_sigma(
            target_epsilon=eps, delta=args.delta, history_before=[(sigma1, 1.0, 1)]
        )
        for mode in args.modes.split(","):
            scale = 1.0 if mode == "secagg" else math.sqrt(args.tenants)  # noise of the server's sum
            pop_noise = gram.ReleaseNoise(sigma=sigma * scale, pop_share=1.0)
            pop = p_exact + rng.normal(0, pop_noise.pop_std(), n)
            dp_pop = ItemReleaseModel.from_popularity(pop, pop_noise.pop_std())
            emit(
                approach="dp_popularity",
                epsilon=eps,
                mode=mode,
                recall20=recall_at(dp_pop, indptr, items, tests),
            )
            n1 = gram.ReleaseNoise(sigma=sigma1 * scale, pop_share=1.0)
            stage1 = fit_release(
                {"popularity": p_exact + rng.normal(0, n1.pop_std(), n)}, "dp_two_stage", n_items=n,
                users=args.users, sigma_sum=sigma1 * scale, dp=True, stage=1,
            )  # fmt: skip
            prior = stage1.prior.numpy().astype(np.float64)
            sel = gram.select_top(prior, args.m)
            xs = gram.selected_rows(indptr, items, n, sel)
            n2 = gram.ReleaseNoise(sigma=sigma2 * scale, pop_share=0.0)
            g = (xs.T @ xs).toarray() + gram.symmetric_noise(args.m, n2.offdiag_std(), n2.diag_std(), rng)
            for shrinkage in args.shrinkage.split(","):
                t1 = time.perf_counter()
                model = fit_release(
                    {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=args.users,
                    sigma_sum=sigma2 * scale, dp=True, stage=2, selection=sel, prior=prior, shrinkage=shrinkage,
                )  # fmt: skip
                emit(
                    approach="dp_two_stage", epsilon=eps, mode=mode, shrinkage=shrinkage,
                    recall20=recall_at(model, indptr, items, tests), sigma_stage1=round(sigma1, 4),
                    sigma_stage2=round(sigma2, 4), support=model.cfg.n_support,
                    fit_s=round(time.perf_counter() - t1, 1),
                )  # fmt: skip
    print(json.dumps({"total_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

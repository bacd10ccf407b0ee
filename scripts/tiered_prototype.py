"""Prototype (validation only): a second tier of items scored from the same stage-2 Gram release.

``dp_two_stage`` releases one noisy Gram over the top M items of its stage-1 DP popularity (M by the M
rule) and ranks every other item below them by DP popularity. The M rule keeps M small because every
item added to the Gram raises the noise edge 2·s·√M of the whole spectrum. This prototype releases the
Gram over a larger set S2 (the top M2 ≥ M items), fits DP-EASE on the head block (the top M of S2, with
the head's own edge 2·s·√M) and scores the tier items j ∈ S2 \\ head by a ridge regression of j on the
head, from the released head × tier block projected onto the head's k kept eigenvectors:

    w_j = V diag(1/(η + λ)) Vᵀ G̃[head, j]      (η: the head's shrunk eigenvalues, λ the stage ridge)

— the same quantity EASE's column is for a head item (the regression of an item on the others), so the
two tiers' scores are in the same units. Projecting onto k directions keeps k of the M noise dimensions
of the column. Everything is post-processing of the same two releases (stage 1, one Gram over S2): the
ε is the product's, unchanged. Scored as ``scripts/two_stage_frontier.py`` scores (Recall@20, full
ranking); ``--which val`` by default (tuning never sees test).

    python scripts/tiered_prototype.py --synth-noise 0.1 --synth-alpha 0.003 --eps 8,3 --m2 2000,4000

This is the first version, kept for its ablations (``--tier-input``: tier items as evidence too;
``--k-mult``: fewer head components; ``--tier-scale``; ``--nonprivate``). The product's version,
``DPEASE.fit_gram_tiered`` (``fedrec simulate --tier``), also shrinks each projected component into the
head's units (``fedrec.shared_model.dp_item._cross_shrink``); without that, a component just above the
noise edge inflated the tier's scores and lost 0.02 HR@10 on a small flat-topic catalogue. Measure the
product's tier with ``scripts/two_stage_frontier.py --tier 1,1.5``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from two_stage_frontier import _lam_rule, recall_at, split, split_movielens, stage_sigmas

from fedrec.privacy import gram
from fedrec.server.release import fit_release, two_stage_size
from fedrec.shared_model.dp_item import DPEASE, _shrink
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.simulations.data.synth_scale import SynthSpec


def tiered_fit(
    g: np.ndarray,
    sel: np.ndarray,
    m_head: int,
    *,
    offdiag_std: float,
    users: int,
    lam_per_user: float,
    prior: np.ndarray,
    n_items: int,
    tier_scale: float = 1.0,
    k_mult: float = 1.0,
    tier_input: float = 0.0,
) -> ItemReleaseModel:
    """DP-EASE on the head block (the first ``m_head`` of ``sel``, which is ordered by the prior) and
    the projected ridge regression for the rest of ``sel``; one ItemReleaseModel over all of ``sel``."""
    m2 = len(sel)
    head = np.arange(m_head)
    tier = np.arange(m_head, m2)
    a = g[np.ix_(head, head)]
    a = 0.5 * (a + a.T)
    lam = lam_per_user * users
    vals, vecs = np.linalg.eigh(a)
    s = offdiag_std * math.sqrt(m_head)
    keep = vals > 2.0 * s * k_mult
    v = vecs[:, keep]
    eta = _shrink(vals[keep], s, "soft")
    p = (v * (1.0 / (eta + lam) - 1.0 / lam)) @ v.T + np.eye(m_head) / lam
    b_head = -p / np.diag(p)[None, :]
    b_head[np.diag_indices(m_head)] = 0.0
    cross = g[np.ix_(head, tier)]  # (M, T) noisy head × tier block
    w = v @ ((v.T @ cross) / (eta + lam)[:, None]) * tier_scale  # (M, T)
    weights = np.zeros((m2, m2), dtype=np.float64)
    weights[np.ix_(head, head)] = b_head
    weights[np.ix_(head, tier)] = w
    if tier_input > 0:  # a tier item as evidence for a head item: β_t→i ≈ β_i→t · var(i) / var(t)
        d = np.maximum(np.diag(g), 1e-9)
        weights[np.ix_(tier, head)] = tier_input * w.T * (d[head][None, :] / d[tier][:, None])
    fitted = DPEASE()
    fitted.weights = weights.astype(np.float32)
    fitted.items = np.asarray(sel, dtype=np.int64)
    fitted.lam_used = lam
    order = np.argsort(fitted.items)
    fitted.items = fitted.items[order]
    fitted.weights = fitted.weights[np.ix_(order, order)]
    return ItemReleaseModel.from_ease(fitted, n_items, kind="dp_ease", prior=prior)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scale")
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--synth-noise", type=float, default=SynthSpec.noise)
    ap.add_argument("--synth-alpha", type=float, default=SynthSpec.alpha)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eps", default="8,3")
    ap.add_argument("--modes", default="secagg")
    ap.add_argument("--m2", default="2000,4000", help="items in the Gram release (head + tier), comma list")
    ap.add_argument("--m2-mult", default="", help="M2 = mult × the M rule's M (capped), comma list")
    ap.add_argument("--tier-scale", default="1", help="multiplier of the tier scores, comma list")
    ap.add_argument("--k-mult", default="1", help="head components kept above k_mult × edge, comma list")
    ap.add_argument("--tier-input", default="0", help="weight of tier items as inputs, comma list")
    ap.add_argument("--lam-per-user", type=float, default=0.008)
    ap.add_argument("--select-share", type=float, default=0.1)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-seeds", default="0")
    ap.add_argument("--which", default="val", choices=("val", "test"))
    ap.add_argument("--nonprivate", action="store_true", help="also the tiered fit on the exact Gram")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.data == "scale":
        spec = SynthSpec(profile="scale", noise=args.synth_noise, alpha=args.synth_alpha)
        indptr, items, tests, n = split(args.users, args.items, args.seed, args.which, spec)
        name = f"scale {args.users}x{args.items} noise {args.synth_noise} alpha {args.synth_alpha}"
    else:
        indptr, items, tests, n = split_movielens(Path(args.data), args.seed, args.which)
        name = Path(args.data).name
    users = len(indptr) - 1
    p_exact = np.asarray(gram.unit_rows(indptr, items, n).sum(axis=0)).ravel()

    def emit(**row: object) -> None:
        print(json.dumps({"data": name, "which": args.which, **row}), flush=True)

    for noise_seed in [int(x) for x in args.noise_seeds.split(",")]:
        rng = np.random.default_rng([noise_seed, 7])
        for eps in [float(e) for e in args.eps.split(",")]:
            sigma, sigma1, sigma2 = stage_sigmas(eps, args.delta, args.select_share)
            for mode in args.modes.split(","):
                scale = 1.0 if mode == "secagg" else math.sqrt(args.tenants)
                common = {"epsilon": eps, "mode": mode, "noise_seed": noise_seed}
                pop_noise = gram.ReleaseNoise(sigma=sigma * scale, pop_share=1.0)
                pop = p_exact + rng.normal(0, pop_noise.pop_std(), n)
                emit(approach="dp_popularity", **common, recall20=recall_at(
                    ItemReleaseModel.from_popularity(pop, pop_noise.pop_std()), indptr, items, tests))  # fmt: skip
                n1 = gram.ReleaseNoise(sigma=sigma1 * scale, pop_share=1.0)
                stage1_pop = p_exact + rng.normal(0, n1.pop_std(), n)
                stage1 = fit_release(
                    {"popularity": stage1_pop}, "dp_two_stage", n_items=n, users=users,
                    sigma_sum=sigma1 * scale, dp=True, stage=1,
                )  # fmt: skip
                prior = stage1.prior.numpy().astype(np.float64)
                m_rule, _ = two_stage_size(stage1_pop, sigma1 * scale, args.select_share, min(4000, n), 1.0)
                n2 = gram.ReleaseNoise(sigma=sigma2 * scale, pop_share=0.0)
                # the product: a Gram over the M rule's items
                sel = gram.select_top(prior, m_rule)
                xs = gram.selected_rows(indptr, items, n, sel)
                g = (xs.T @ xs).toarray() + gram.symmetric_noise(m_rule, n2.offdiag_std(), n2.diag_std(), rng)
                model = fit_release(
                    {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users,
                    sigma_sum=sigma2 * scale, dp=True, stage=2, selection=sel, prior=prior,
                    rule=_lam_rule(m_rule, args.lam_per_user),
                )  # fmt: skip
                emit(
                    approach="dp_two_stage",
                    **common,
                    m=m_rule,
                    recall20=recall_at(model, indptr, items, tests),
                )
                m2s = [int(x) for x in args.m2.split(",") if x]
                m2s += [round(float(x) * m_rule) for x in args.m2_mult.split(",") if x]
                for m2 in [min(x, n, 4000) for x in m2s]:
                    if m2 <= m_rule:
                        continue
                    order = np.argsort(-prior, kind="stable")[:m2]  # by prior, head first
                    xs2 = gram.selected_rows(indptr, items, n, np.sort(order))
                    g_exact = (xs2.T @ xs2).toarray()
                    # rows/cols of xs2 are in ascending item order; reorder to prior order
                    pos = np.searchsorted(np.sort(order), order)
                    g_exact = g_exact[np.ix_(pos, pos)]
                    g2 = g_exact + gram.symmetric_noise(m2, n2.offdiag_std(), n2.diag_std(), rng)
                    for ts in [float(x) for x in args.tier_scale.split(",")]:
                        for km, ti in [(float(x), float(y)) for x in args.k_mult.split(",")
                                       for y in args.tier_input.split(",")]:  # fmt: skip
                            t1 = time.perf_counter()
                            tm = tiered_fit(
                                g2, order, m_rule, offdiag_std=n2.offdiag_std(), users=users,
                                lam_per_user=args.lam_per_user, prior=prior, n_items=n, tier_scale=ts,
                                k_mult=km, tier_input=ti,
                            )  # fmt: skip
                            emit(approach="tiered", **common, m=m_rule, m2=m2, mult=round(m2 / m_rule, 2),
                                 tier_scale=ts, k_mult=km,
                                 tier_input=ti,
                                 recall20=recall_at(tm, indptr, items, tests),
                                 fit_s=round(time.perf_counter() - t1, 1))  # fmt: skip
                    if args.nonprivate and noise_seed == 0:
                        for ti in [float(y) for y in args.tier_input.split(",")]:
                            tm = tiered_fit(
                                g_exact, order, m_rule, offdiag_std=1e-9, users=users,
                                lam_per_user=args.lam_per_user, prior=prior, n_items=n, tier_input=ti,
                            )  # fmt: skip
                            emit(approach="tiered (exact Gram)", **common, m=m_rule, m2=m2, tier_input=ti,
                                 recall20=recall_at(tm, indptr, items, tests))  # fmt: skip
    print(json.dumps({"total_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

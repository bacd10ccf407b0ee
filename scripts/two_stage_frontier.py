"""Recall@20 of the two-stage DP release (``dp_two_stage``) vs DP popularity and non-private EASE on a
large catalogue (docs/PRIVACY_UTILITY.md, "Large catalogues"), with the product's own functions:
``fedrec.privacy.gram`` (unit rows, selection, noise, σ calibration and composition) and
``fedrec.server.release.fit_release`` (DP-EASE on the noisy Gram of the selection, the rest by the
stage-1 DP popularity), scored by :class:`ItemReleaseModel` over the whole catalogue.

Data: the ``scale`` synthetic set (default 30 000 users × 40 000 items; ``--synth-*`` change its shape) or
a MovieLens-100K folder (``--data /work/shared/data/ml-100k``, read in place), each user's items split 80/20
at random into train/test (a given split, as in the LightGCN family); full ranking over all items not
in the user's train set, Recall@20 = hits / |test items|. Noise of the server's sum: ``secagg`` = one
release's σ (SecAgg+ distributed noise), ``local`` = every one of ``--tenants`` tenants adds its full σ
(σ·√tenants). ``--which val`` scores a validation split carved out of train instead (for tuning M and
the selection share without touching test).

    python scripts/two_stage_frontier.py --eps 8,3 --modes secagg,local --m 2000
    python scripts/two_stage_frontier.py --data /work/shared/data/ml-100k --which val --m 300,800,1682
    python scripts/two_stage_frontier.py --data /work/shared/data/ml-100k --m 300 --noise-seeds 0,1,2

``--out DIR`` also writes the report (``scripts/two_stage_report.py``): ``frontier.jsonl`` (every row),
``frontier.md`` (per ε the median Recall@20 over noise seeds, each seed's value, the ratio to DP
popularity, the M picked) and ``frontier.png``; with ``--out`` the non-private EASE reference is also
measured on each distinct M the rule picked (unless ``--no-ease``). A frontier measured in parts (e.g.
one noise seed per command, each with its own ``--out``) is rendered together with
``--render-only PART1/frontier.jsonl,PART2/frontier.jsonl --out DIR`` (nothing is measured then):

    python scripts/two_stage_frontier.py --data /work/shared/data/ml-100k --eps 1,2,4,8 --m "" --m-rule 1 \
        --noise-seeds 0,1,2 --out docs/frontier_two_stage/ml100k
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.privacy import gram
from fedrec.server.release import TWO_STAGE_LAM_PER_USER, fit_release, tier_size, two_stage_size
from fedrec.shared_model.dp_item import DPEASERule
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.runconfig import RunConfig
from fedrec.shared_model.split_scores import SharedScores, SplitRanker
from fedrec.simulations.data.sources import synthetic
from fedrec.simulations.data.synth_scale import SynthSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import two_stage_report  # (scripts/two_stage_report.py, next to this file)


def _carve(
    u: np.ndarray, i: np.ndarray, users: int, seed: int, which: str
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Each user's items split 80/20 at random (seeded) into train/test; ``which`` = val: test dropped,
    20% of what is left held out as validation (tuning never sees test)."""
    r = np.random.default_rng(seed + 1000).random(len(u))
    test = r < 0.2  # 20% of each user's items (in expectation) are test
    if which == "val":
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
    return indptr, tr_i, tests


def split(
    users: int, items: int, seed: int, which: str, spec: SynthSpec | None = None
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], int]:
    """(indptr, train items) CSR and each user's held-out items (test, or val carved from train)."""
    raw = synthetic(users=users, items=items, seed=seed, spec=spec or SynthSpec(profile="scale")).interactions
    u = raw["user"].astype(np.int64).to_numpy() - 1
    i = raw["item"].astype(np.int64).to_numpy() - 1
    indptr, tr_i, tests = _carve(u, i, users, seed, which)
    return indptr, tr_i, tests, items


def split_movielens(
    folder: Path, seed: int, which: str
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], int]:
    """The same split of a MovieLens-100K folder's ``u.data`` (every rating an interaction), read in
    place (never copied)."""
    raw = np.loadtxt(folder / "u.data", dtype=np.int64, usecols=(0, 1))
    _, u = np.unique(raw[:, 0], return_inverse=True)
    _, i = np.unique(raw[:, 1], return_inverse=True)
    users, items = int(u.max()) + 1, int(i.max()) + 1
    indptr, tr_i, tests = _carve(u.astype(np.int64), i.astype(np.int64), users, seed, which)
    return indptr, tr_i, tests, items


def recall_at(
    model: ItemReleaseModel, indptr: np.ndarray, items: np.ndarray, tests: list[np.ndarray], k: int = 20
) -> float:
    """Mean Recall@k over users with a held-out item, in batches of 1 024 users, ranked as the product's
    evaluation does (``fedrec.shared_model.split_scores``: the support scores per user, the shared
    scores of every other item sorted once; never a users × items or even a batch × items array)."""
    n = model.cfg.n_items
    ranker = SplitRanker(
        SharedScores(model.items.numpy().astype(np.int64), model.shared_scores().float().numpy()), n
    )
    users = [u for u in range(len(tests)) if len(tests[u])]
    total = 0.0
    for lo in range(0, len(users), 1024):
        batch = users[lo : lo + 1024]
        hists = [items[indptr[u] : indptr[u + 1]] for u in batch]
        width = max(1, max(len(h) for h in hists))
        h = np.full((len(batch), width), n, dtype=np.int64)
        for r, hist in enumerate(hists):
            h[r, : len(hist)] = hist
        inside = model.inside_scores(torch.from_numpy(h)).numpy()  # (B, M)
        top = ranker.batch(inside, hists).top_k(k)  # (B, k)
        for r, u in enumerate(batch):
            total += np.isin(tests[u], top[r]).sum() / len(tests[u])
    return total / len(users)


def stage_sigmas(eps: float, delta: float, select_share: float) -> tuple[float, float, float]:
    """(σ of a one-release run, stage 1's σ, stage 2's σ) of a two-stage run at (ε, δ): stage 1 spends
    ``select_share`` of the μ², stage 2 is calibrated for the rest (composed by the PRV accountant)."""
    sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=delta)
    sigma1 = gram.stage_one_sigma(sigma, select_share)
    sigma2 = gram.calibrate_release_sigma(target_epsilon=eps, delta=delta, history_before=[(sigma1, 1.0, 1)])
    return sigma, sigma1, sigma2


def _lam_rule(m: int, lam_per_user: float | None) -> DPEASERule:
    """The product's stage-2 rule (ridge TWO_STAGE_LAM_PER_USER per user) unless a ridge is given."""
    return DPEASERule(
        max_items=max(DPEASERule().max_items, m),
        lam_per_user=TWO_STAGE_LAM_PER_USER if lam_per_user is None else lam_per_user,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scale", help="scale (synthetic) or a MovieLens-100K folder (u.data)")
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--synth-noise", type=float, default=SynthSpec.noise)
    ap.add_argument("--synth-rank", type=int, default=SynthSpec.rank)
    ap.add_argument("--synth-alpha", type=float, default=SynthSpec.alpha)
    ap.add_argument("--synth-topic-zipf", type=float, default=SynthSpec.topic_zipf)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eps", default="8,3")
    ap.add_argument("--modes", default="secagg,local")
    ap.add_argument("--m", default="4000", help="items selected for the Gram (gram-limit); a comma list")
    ap.add_argument("--select-share", type=float, default=0.1)
    ap.add_argument(
        "--m-rule",
        default="",
        help="also the M picked by the M rule (two_stage_size) for these c values, comma list",
    )
    ap.add_argument("--m-cap", type=int, default=4000, help="the M rule's cap (the gram-limit)")
    ap.add_argument(
        "--tier",
        default=str(RunConfig.tier),
        help="for an M the rule picked: the Gram covers tier × M items, the top M fitted by DP-EASE and "
        "the rest scored by a regression on them (the product's default); 1 = no tier; a comma list",
    )
    ap.add_argument(
        "--lam-per-user",
        default="",
        help="EASE ridge per user, comma list [the product's TWO_STAGE_LAM_PER_USER]",
    )
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0, help="data/split seed")
    ap.add_argument("--noise-seeds", default="0", help="seeds of the DP noise draws, comma list")
    ap.add_argument("--which", default="test", choices=("test", "val"))
    ap.add_argument("--shrinkage", default="soft", help="soft, optimal or soft,optimal (same noisy release)")
    ap.add_argument("--no-ease", action="store_true", help="skip the non-private EASE reference")
    ap.add_argument(
        "--out",
        default="",
        help="also write frontier.jsonl, frontier.md and frontier.png here (and measure non-private EASE "
        "on each distinct M the rule picked)",
    )
    ap.add_argument(
        "--render-only",
        default="",
        help="comma list of frontier.jsonl files: render them together into --out, measure nothing",
    )
    args = ap.parse_args(argv)
    command = " ".join(
        shlex.quote(a)
        for a in ["python", "scripts/two_stage_frontier.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.render_only:
        if not args.out:
            ap.error("--render-only needs --out")
        metas, rows = two_stage_report.read_rows([Path(p) for p in args.render_only.split(",") if p])
        metas.append({"command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                      "wall_s": 0.0, "render_only": True})  # fmt: skip
        for p in two_stage_report.write_report(Path(args.out), metas, rows):
            print(p)
        return
    t0 = time.perf_counter()
    if args.data == "scale":
        spec = SynthSpec(
            profile="scale", noise=args.synth_noise, rank=args.synth_rank, alpha=args.synth_alpha,
            topic_zipf=args.synth_topic_zipf,
        )  # fmt: skip
        indptr, items, tests, n = split(args.users, args.items, args.seed, args.which, spec)
        name = (
            f"scale {args.users}x{args.items} noise {args.synth_noise} rank {args.synth_rank} "
            f"alpha {args.synth_alpha} topic-zipf {args.synth_topic_zipf}"
        )
    else:
        indptr, items, tests, n = split_movielens(Path(args.data), args.seed, args.which)
        name = Path(args.data).name
    users = len(indptr) - 1
    ms = [min(int(m), n) for m in args.m.split(",") if m]
    lams: list[float | None] = (
        [float(x) for x in args.lam_per_user.split(",")] if args.lam_per_user else [None]
    )
    x_all = gram.unit_rows(indptr, items, n)
    p_exact = np.asarray(x_all.sum(axis=0)).ravel()
    out: list[dict] = []

    def emit(**row: object) -> None:
        row = {"data": name, "which": args.which, "seed": args.seed, "select_share": args.select_share, **row}
        out.append(row)
        print(json.dumps(row), flush=True)

    emit(approach="popularity (non-private)", recall20=recall_at(ItemReleaseModel.from_popularity(p_exact, 0.0),
         indptr, items, tests))  # fmt: skip

    def ease_reference(m: int) -> None:
        sel = gram.select_top(p_exact, m)
        xs = gram.selected_rows(indptr, items, n, sel)
        g = (xs.T @ xs).toarray()
        for lpu in lams:
            model = fit_release(
                {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users, sigma_sum=0.0,
                dp=False, stage=2, selection=sel, prior=np.log1p(p_exact), rule=_lam_rule(m, lpu),
            )  # fmt: skip
            emit(approach="ease (non-private, same M items)", m=m, lam_per_user=lpu,
                 recall20=recall_at(model, indptr, items, tests))  # fmt: skip

    if not args.no_ease:
        for m in ms:
            ease_reference(m)
    for noise_seed in [int(x) for x in args.noise_seeds.split(",")]:
        rng = np.random.default_rng([noise_seed, 7])
        for eps in [float(e) for e in args.eps.split(",")]:
            sigma, sigma1, sigma2 = stage_sigmas(eps, args.delta, args.select_share)
            for mode in args.modes.split(","):
                scale = 1.0 if mode == "secagg" else math.sqrt(args.tenants)  # noise of the server's sum
                common = {"epsilon": eps, "mode": mode, "noise_seed": noise_seed}
                pop_noise = gram.ReleaseNoise(sigma=sigma * scale, pop_share=1.0)
                pop = p_exact + rng.normal(0, pop_noise.pop_std(), n)
                dp_pop = ItemReleaseModel.from_popularity(pop, pop_noise.pop_std())
                emit(approach="dp_popularity", **common, recall20=recall_at(dp_pop, indptr, items, tests))
                n1 = gram.ReleaseNoise(sigma=sigma1 * scale, pop_share=1.0)
                stage1_pop = p_exact + rng.normal(0, n1.pop_std(), n)
                stage1 = fit_release(
                    {"popularity": stage1_pop}, "dp_two_stage", n_items=n,
                    users=users, sigma_sum=sigma1 * scale, dp=True, stage=1,
                )  # fmt: skip
                prior = stage1.prior.numpy().astype(np.float64)
                picks: dict[int, list[float]] = {m: [] for m in ms}
                for c in [float(x) for x in args.m_rule.split(",") if x]:
                    m_c, why = two_stage_size(
                        stage1_pop, sigma1 * scale, args.select_share, min(args.m_cap, n), c
                    )
                    emit(approach="M rule", **common, c=c, m=m_c, why=why)
                    picks.setdefault(m_c, []).append(c)
                tiers = [float(x) for x in args.tier.split(",")]
                for m, tier in [(mm, t) for mm in sorted(picks) for t in (tiers if picks[mm] else [1.0])]:
                    covered, _ = tier_size(m, tier, min(args.m_cap, n))
                    sel = gram.select_top(prior, covered)
                    xs = gram.selected_rows(indptr, items, n, sel)
                    n2 = gram.ReleaseNoise(sigma=sigma2 * scale, pop_share=0.0)
                    g = (xs.T @ xs).toarray() + gram.symmetric_noise(
                        covered, n2.offdiag_std(), n2.diag_std(), rng
                    )
                    for shrinkage in args.shrinkage.split(","):
                        for lpu in lams:
                            t1 = time.perf_counter()
                            model = fit_release(
                                {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users,
                                sigma_sum=sigma2 * scale, dp=True, stage=2, selection=sel, prior=prior,
                                shrinkage=shrinkage, rule=_lam_rule(covered, lpu),
                                head=m if covered > m else 0,
                            )  # fmt: skip
                            emit(
                                approach="dp_two_stage", **common, m=m, rule_c=picks[m], shrinkage=shrinkage,
                                lam_per_user=lpu, tier=tier, gram_items=covered,
                                recall20=recall_at(model, indptr, items, tests), sigma_stage1=round(sigma1, 4),
                                sigma_stage2=round(sigma2, 4), support=model.cfg.n_support,
                                fit_s=round(time.perf_counter() - t1, 1),
                            )  # fmt: skip
    if args.out and not args.no_ease:  # the reference on the items each picked M covers
        for m in sorted({int(r["m"]) for r in out if r["approach"] == "dp_two_stage"} - set(ms)):
            ease_reference(m)
    total_s = round(time.perf_counter() - t0, 1)
    if args.out:
        meta = {
            "command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": total_s,
            "tenants": args.tenants, "delta": args.delta, "data": name,
        }  # fmt: skip
        for p in two_stage_report.write_report(Path(args.out), [meta], out):
            print(p, file=sys.stderr)
    print(json.dumps({"total_s": total_s}))


if __name__ == "__main__":
    main()

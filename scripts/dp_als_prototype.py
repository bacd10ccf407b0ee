"""Prototype: private alternating least squares with joint DP (after Chien et al. 2021, "Private
Alternating Least Squares") for implicit feedback, against DP popularity and ``dp_two_stage`` on the
same splits as ``scripts/two_stage_frontier.py`` (validation by default: tuning never sees test).

Joint DP. The server holds item factors V (M × d, over the items a stage-1 DP popularity release
selected); each user's factor u is computed *on the tenant* from V and the user's own items and is never
released; serving recomputes it from the user's history the same way. Per ALS round the tenants release
the sums over their users of, for each selected item i the user holds (at most ``--k`` of them, a uniform
sample), with ``x = 1/√n`` (n = the user's released items) and ``û = u/‖u‖`` (unit norm: the clip):

    b_i += √a · x · û                       (d numbers per item)
    A_i += √b · x · [û ûᵀ]  (upper triangle, off-diagonal ×√2)   (d(d+1)/2 per item; ``--a-mode full``)
    G   += √c · [û ûᵀ]      (upper triangle, off-diagonal ×√2)   (the implicit "all users" term, once)

with a + b + c = 1. A user's release has L2 norm² = a·Σx²‖û‖² + b·Σx²‖û‖⁴ + c·‖û‖⁴ = 1 exactly (Σx² = 1),
so sensitivity is 1 whatever the history: one Gaussian mechanism per round at noise multiplier σ_r
(sample_rate 1, steps 1), composed with the stage-1 selection release by the project's PRV accountant,
user level, δ = 1e-5. Natural-unit noise on the server's sum: b σ_r/√a, A off-diagonal σ_r/√(2b) and
diagonal σ_r/√b, G likewise with c. ``--a-mode shared`` releases no A_i (b = 0) and uses
Â_i = p̂_i · Ĝ / N (p̂ = the stage-1 DP popularity, N = users), a post-processing.

Item step (server, post-processing): v_i = (w0·Ĝ + Â_i + λ I)⁻¹ b̂_i, with Â_i projected to PSD.
User step (tenant, and at serving): u = (V_hᵀV_h + w0·VᵀV + λ_u I)⁻¹ V_hᵀ 1 over the user's selected items.
Round 1 starts from a random V (public seed): a noisy power-iteration step, as the paper's initialisation.
Items outside the selection rank below, by the stage-1 DP popularity (as dp_two_stage).

    python scripts/dp_als_prototype.py --data /work/shared/data/ml-100k --m 300,800
    python scripts/dp_als_prototype.py --users 10000 --items 10000 --m 1000,4000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from two_stage_frontier import _lam_rule, recall_at, split, split_movielens

from fedrec.privacy import gram
from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.server.release import fit_release, two_stage_size
from fedrec.shared_model.item_model import OUTSIDE_HIGH, ItemReleaseModel, _outside_scores
from fedrec.shared_model.split_scores import SharedScores, SplitRanker
from fedrec.simulations.data.synth_scale import SynthSpec


def _restrict(indptr: np.ndarray, items: np.ndarray, n: int, sel: np.ndarray) -> sp.csr_matrix:
    """Binary users × M matrix of each user's training items inside the selection (columns = sel order)."""
    col = np.full(n + 1, -1, dtype=np.int64)
    col[sel] = np.arange(len(sel))
    users = len(indptr) - 1
    rows = np.repeat(np.arange(users), np.diff(indptr))
    c = col[items]
    keep = c >= 0
    x = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], c[keep])), shape=(users, len(sel)))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _sample_k(xb: sp.csr_matrix, k: int, rng: np.random.Generator) -> sp.csr_matrix:
    """At most k of each user's items, uniformly (the tenant's own randomness); unit-row weights 1/√n."""
    indptr, cols = xb.indptr, xb.indices
    rows, keep_cols = [], []
    for u in range(xb.shape[0]):
        c = cols[indptr[u] : indptr[u + 1]]
        if k and len(c) > k:
            c = rng.choice(c, size=k, replace=False)
        rows.append(np.full(len(c), u))
        keep_cols.append(c)
    r = np.concatenate(rows)
    c = np.concatenate(keep_cols)
    n_u = np.bincount(r, minlength=xb.shape[0])
    w = 1.0 / np.sqrt(np.maximum(n_u[r], 1))
    return sp.csr_matrix((w, (r, c)), shape=xb.shape)


def _outer_flat(u: np.ndarray) -> np.ndarray:
    """(N, d) → (N, d·d) row-wise outer products (float32 to bound memory)."""
    u = u.astype(np.float32)
    return (u[:, :, None] * u[:, None, :]).reshape(len(u), -1)


def _sym_noise(count: int, d: int, off_std: float, diag_std: float, rng: np.random.Generator) -> np.ndarray:
    """(count, d, d) symmetric Gaussian noise: one draw per pair (mirrored), its own std on the diagonal."""
    z = rng.normal(0.0, off_std, (count, d, d))
    z = np.triu(z, 1)
    z = z + np.transpose(z, (0, 2, 1))
    idx = np.arange(d)
    z[:, idx, idx] = rng.normal(0.0, diag_std, (count, d))
    return z


def user_factors(xb: sp.csr_matrix, v: np.ndarray, w0: float, lam_u: float) -> np.ndarray:
    """The tenant's user step: u = (V_hᵀV_h + w0·VᵀV + λ_u I)⁻¹ V_hᵀ1 for each row of the binary xb."""
    d = v.shape[1]
    gram_v = w0 * (v.T @ v) + lam_u * np.eye(d)
    out = np.zeros((xb.shape[0], d))
    for lo in range(0, xb.shape[0], 2048):
        blk = xb[lo : lo + 2048]
        a = np.asarray(blk @ _outer_flat(v), dtype=np.float64).reshape(-1, d, d) + gram_v
        rhs = np.asarray(blk @ v)
        out[lo : lo + 2048] = np.linalg.solve(a, rhs[:, :, None])[:, :, 0]
    return out


def _psd(a: np.ndarray) -> np.ndarray:
    w, q = np.linalg.eigh(a)
    return (q * np.maximum(w, 0.0)[:, None, :]) @ np.transpose(q, (0, 2, 1))


def round_statistics(
    xs: sp.csr_matrix, uh: np.ndarray, a_mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The exact sums one ALS round releases (before noise): b (M, d), G (d, d), A (M, d, d) or None."""
    b = np.asarray(xs.T @ uh)  # (M, d)
    g = uh.T @ uh
    if a_mode != "full":
        return b, g, None
    d = uh.shape[1]
    a = np.asarray(xs.T @ _outer_flat(uh), dtype=np.float64).reshape(xs.shape[1], d, d)
    return b, g, a


def _tri(s: np.ndarray) -> np.ndarray:
    """A symmetric matrix's upper triangle with the diagonal, off-diagonal entries ×√2 (so ‖·‖ = ‖S‖_F)."""
    r, c = np.triu_indices(s.shape[-1])
    return s[..., r, c] * np.where(r == c, 1.0, math.sqrt(2.0))


def user_release(
    cols: np.ndarray,
    weights: np.ndarray,
    uh: np.ndarray,
    m: int,
    shares: tuple[float, float, float],
    a_mode: str,
) -> np.ndarray:
    """One user's scaled release vector for a round, written out as the definition (module docstring):
    (√a·x_i·û for each item, √b·x_i·tri(ûûᵀ) for each item [full mode], √c·tri(ûûᵀ)). Its norm is 1 for
    a unit û and Σ x_i² = 1; the tenants' sum of these is what :func:`round_statistics` computes."""
    a_sh, b_sh, c_sh = shares
    d = len(uh)
    bpart = np.zeros((m, d))
    bpart[cols] = math.sqrt(a_sh) * weights[:, None] * uh[None]
    parts = [bpart.ravel()]
    t = _tri(np.outer(uh, uh))
    if a_mode == "full":
        apart = np.zeros((m, len(t)))
        apart[cols] = math.sqrt(b_sh) * weights[:, None] * t[None]
        parts.append(apart.ravel())
    parts.append(math.sqrt(c_sh) * t)
    return np.concatenate(parts)


def dp_als(
    xb: sp.csr_matrix,
    *,
    d: int,
    rounds: int,
    sigma_round: float,
    shares: tuple[float, float, float],
    a_mode: str,
    k: int,
    w0: float,
    lam: float,
    lam_u: float,
    pop_hat: np.ndarray,
    rng: np.random.Generator,
    init_seed: int = 0,
) -> np.ndarray:
    """Item factors V (M × d) after ``rounds`` noisy ALS rounds (noise std in natural units from σ_r)."""
    users, m = xb.shape
    a_sh, b_sh, c_sh = shares
    if a_mode == "full" and b_sh <= 0:
        raise ValueError("the full mode needs a positive share b for the per-item A_i")
    v = np.random.default_rng(init_seed).normal(0.0, 1.0 / math.sqrt(d), (m, d))
    for _ in range(rounds):
        u = user_factors(xb, v, w0, lam_u)
        norms = np.linalg.norm(u, axis=1, keepdims=True)
        uh = np.where(norms > 0, u / np.maximum(norms, 1e-12), 0.0)  # unit norm (≤ 1: the clip)
        xs = _sample_k(xb, k, rng)  # weights 1/√n on ≤ k sampled items
        b, g, a_exact = round_statistics(xs, uh, a_mode)
        if sigma_round > 0:
            b = b + rng.normal(0.0, sigma_round / math.sqrt(a_sh), b.shape)
            g = g + _sym_noise(1, d, sigma_round / math.sqrt(2 * c_sh), sigma_round / math.sqrt(c_sh), rng)[0]
        g = _psd(g[None])[0]
        if a_exact is not None:
            a = a_exact
            if sigma_round > 0:
                a = a + _sym_noise(
                    m, d, sigma_round / math.sqrt(2 * b_sh), sigma_round / math.sqrt(b_sh), rng
                )
            a = _psd(a)
        else:
            a = (np.maximum(pop_hat, 0.0) / users)[:, None, None] * g[None]
        lhs = a + w0 * g[None] + lam * np.eye(d)[None]
        v = np.linalg.solve(lhs, b[:, :, None])[:, :, 0]
    return v


def recall_als(
    v: np.ndarray,
    sel: np.ndarray,
    prior: np.ndarray,
    n: int,
    indptr: np.ndarray,
    items: np.ndarray,
    tests: list[np.ndarray],
    w0: float,
    lam_u: float,
    k: int = 20,
) -> float:
    """Mean Recall@k: the selected items scored u·v (u from the train history), the rest below by prior."""
    xb = _restrict(indptr, items, n, sel)
    ranker = SplitRanker(SharedScores(sel.astype(np.int64), _outside_scores(prior, n)), n)
    users = [u for u in range(len(tests)) if len(tests[u])]
    total = 0.0
    for lo in range(0, len(users), 2048):
        batch = np.array(users[lo : lo + 2048])
        uf = user_factors(xb[batch], v, w0, lam_u)
        s = uf @ v.T  # (B, M)
        s = s - s.min(axis=1, keepdims=True) + OUTSIDE_HIGH + 1.0
        hists = [items[indptr[u] : indptr[u + 1]] for u in batch]
        top = ranker.batch(s.astype(np.float32), hists).top_k(k)
        for r, u in enumerate(batch):
            total += np.isin(tests[u], top[r]).sum() / len(tests[u])
    return total / len(users)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scale")
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--items", type=int, default=40000)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eps", default="8,3")
    ap.add_argument("--modes", default="secagg")
    ap.add_argument("--m", default="1000", help="selected items for ALS (comma list)")
    ap.add_argument("--two-stage", action="store_true", help="also dp_two_stage with the M rule (c = 1)")
    ap.add_argument("--select-share", type=float, default=0.1)
    ap.add_argument("--d", default="32")
    ap.add_argument("--rounds", default="3")
    ap.add_argument("--a-mode", default="shared", help="shared, full or both")
    ap.add_argument("--shares", default="0.9,0.0,0.1", help="a,b,c budget shares of the shared mode")
    ap.add_argument("--shares-full", default="0.5,0.4,0.1", help="a,b,c budget shares of the full mode")
    ap.add_argument("--k", type=int, default=0, help="items sampled per user per round (0 = all)")
    ap.add_argument("--w0", default="0.01")
    ap.add_argument("--lam", default="auto", help="item ridge; auto = 4·noise std of b·√d")
    ap.add_argument("--lam-u", type=float, default=0.1)
    ap.add_argument("--nonprivate", action="store_true", help="also ALS without noise (ceiling)")
    ap.add_argument("--lam-np", default="1", help="item ridge(s) of the non-private ALS")
    ap.add_argument("--only-nonprivate", action="store_true")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--which", default="val", choices=("test", "val"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.data == "scale":
        indptr, items, tests, n = split(
            args.users, args.items, args.seed, args.which, SynthSpec(profile="scale")
        )
        name = f"scale {args.users}x{args.items}"
    else:
        indptr, items, tests, n = split_movielens(Path(args.data), args.seed, args.which)
        name = Path(args.data).name
    users = len(indptr) - 1
    x_all = gram.unit_rows(indptr, items, n)
    p_exact = np.asarray(x_all.sum(axis=0)).ravel()
    shares_of = {
        "shared": tuple(float(s) for s in args.shares.split(",")),
        "full": tuple(float(s) for s in args.shares_full.split(",")),
    }
    ds = [int(x) for x in args.d.split(",")]
    rounds_list = [int(x) for x in args.rounds.split(",")]
    w0s = [float(x) for x in args.w0.split(",")]
    modes_a = ["shared", "full"] if args.a_mode == "both" else [args.a_mode]

    def emit(**row: object) -> None:
        print(json.dumps({"data": name, "which": args.which, **row}), flush=True)

    if args.nonprivate:
        for m in [min(int(x), n) for x in args.m.split(",")]:
            sel = gram.select_top(p_exact, m)
            xb = _restrict(indptr, items, n, sel)
            for d in ds:
                for w0, lam_np in [(w, float(x)) for w in w0s for x in args.lam_np.split(",")]:
                    t1 = time.perf_counter()
                    v = dp_als(xb, d=d, rounds=max(rounds_list), sigma_round=0.0, shares=(1, 1, 1), a_mode="full",
                               k=0, w0=w0, lam=lam_np, lam_u=args.lam_u, pop_hat=p_exact[sel],
                               rng=np.random.default_rng(0))  # fmt: skip
                    emit(approach="als (non-private)", m=m, d=d, w0=w0, lam=lam_np, rounds=max(rounds_list),
                         recall20=round(recall_als(v, sel, p_exact, n, indptr, items, tests, w0, args.lam_u), 4),
                         s=round(time.perf_counter() - t1, 1))  # fmt: skip
    if args.only_nonprivate:
        return
    rng = np.random.default_rng([args.noise_seed, 7])
    for eps in [float(e) for e in args.eps.split(",")]:
        sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=args.delta)
        sigma1 = gram.stage_one_sigma(sigma, args.select_share)
        for mode in args.modes.split(","):
            scale = 1.0 if mode == "secagg" else math.sqrt(args.tenants)
            common = {"epsilon": eps, "mode": mode, "noise_seed": args.noise_seed}
            pop_noise = gram.ReleaseNoise(sigma=sigma * scale, pop_share=1.0)
            pop = p_exact + rng.normal(0, pop_noise.pop_std(), n)
            dp_pop = ItemReleaseModel.from_popularity(pop, pop_noise.pop_std())
            emit(
                approach="dp_popularity", **common, recall20=round(recall_at(dp_pop, indptr, items, tests), 4)
            )
            stage1_pop = p_exact + rng.normal(0, sigma1 * scale, n)
            if args.two_stage:
                sigma2 = gram.calibrate_release_sigma(
                    target_epsilon=eps, delta=args.delta, history_before=[(sigma1, 1.0, 1)]
                )
                stage1 = fit_release({"popularity": stage1_pop}, "dp_two_stage", n_items=n, users=users,
                                     sigma_sum=sigma1 * scale, dp=True, stage=1)  # fmt: skip
                prior = stage1.prior.numpy().astype(np.float64)
                m2, _ = two_stage_size(stage1_pop, sigma1 * scale, args.select_share, min(4000, n), 1.0)
                sel = gram.select_top(prior, m2)
                xs = gram.selected_rows(indptr, items, n, sel)
                n2 = gram.ReleaseNoise(sigma=sigma2 * scale, pop_share=0.0)
                g = (xs.T @ xs).toarray() + gram.symmetric_noise(m2, n2.offdiag_std(), n2.diag_std(), rng)
                model = fit_release({"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users,
                                    sigma_sum=sigma2 * scale, dp=True, stage=2, selection=sel, prior=prior,
                                    rule=_lam_rule(m2, None))  # fmt: skip
                emit(approach="dp_two_stage", **common, m=m2,
                     recall20=round(recall_at(model, indptr, items, tests), 4))  # fmt: skip
            for rounds in rounds_list:
                sig_r = calibrate_noise(target_epsilon=eps, delta=args.delta, sample_rate=1.0, steps=rounds,
                                        history_before=[(sigma1, 1.0, 1)])  # fmt: skip
                eps_check = epsilon(history=[(sigma1, 1.0, 1), (sig_r, 1.0, rounds)], delta=args.delta)
                for m in [min(int(x), n) for x in args.m.split(",")]:
                    sel = gram.select_top(stage1_pop, m)
                    xb = _restrict(indptr, items, n, sel)
                    for d in ds:
                        for w0 in w0s:
                            for a_mode, lam_s in [(a, x) for a in modes_a for x in args.lam.split(",")]:
                                shares = shares_of[a_mode]
                                lam = (4 * sig_r * scale / math.sqrt(shares[0]) * math.sqrt(d)
                                       if lam_s == "auto" else float(lam_s))  # fmt: skip
                                t1 = time.perf_counter()
                                v = dp_als(xb, d=d, rounds=rounds, sigma_round=sig_r * scale, shares=shares,
                                           a_mode=a_mode, k=args.k, w0=w0, lam=lam, lam_u=args.lam_u,
                                           pop_hat=stage1_pop[sel], rng=rng)  # fmt: skip
                                r = recall_als(v, sel, stage1_pop, n, indptr, items, tests, w0, args.lam_u)
                                emit(approach="dp_als", **common, m=m, d=d, rounds=rounds, w0=w0, a_mode=a_mode,
                                     lam=round(lam, 2), k=args.k, sigma1=round(sigma1, 3),
                                     sigma_round=round(sig_r, 3), eps_check=round(eps_check, 3),
                                     recall20=round(r, 4), s=round(time.perf_counter() - t1, 1))  # fmt: skip
    print(json.dumps({"total_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

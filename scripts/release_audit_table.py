"""The tables of docs/AUDIT.md for the empirical audit of the item release (issue 18).

For each mechanism (DP popularity, DP-EASE's Gram) and claimed ε, the audit of
``fedrec.simulations.reports.release_audit`` (trials of the product's release function with and
without a canary, Fisher projection, Clopper–Pearson and fitted Gaussian-DP bounds at 95%) is run at
growing T until its ε lower bound reaches half the claim (or T runs out). Then:

* the T the assumption-free Clopper–Pearson bound alone would need to reach half the claim, found by
  running the audit's own bound on simulated scores of an exact Gaussian mechanism at the claimed μ
  (the scores a correct release gives; the release itself is not run at that T);
* the no-false-alarm check: ``--seeds`` independent audits (fresh seeds) at each ε, the largest lower
  bound against the claim;
* the four planted broken releases of ``tests/release_mutants.py`` at ε = 2.

Every figure is printed as a markdown table (``--out FILE`` also writes it).

    nice -n 10 python scripts/release_audit_table.py --out /tmp/release_audit.md
    python scripts/release_audit_table.py --mechanisms dp_popularity --eps 1,2 --grid 500,1000 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.privacy.empirical import best_threshold, epsilon_lower_bound_clopper_pearson
from fedrec.simulations.reports.release_audit import ReleaseAuditConfig, claim_for, run_release_audit

MUTANTS = ("halved_noise", "unbounded_norm", "reused_noise", "config_seeded_noise")


def cp_bound_on_gaussian_scores(
    mu: float, trials: int, *, delta: float, seed: int, fit: float = 0.2
) -> float:
    """The audit's Clopper–Pearson bound (threshold chosen on a fit split, 97.5%) on exact N(μ,1)/N(0,1) scores."""
    rng = np.random.default_rng(seed)
    inc = rng.permutation(np.arange(trials) < trials // 2)
    s = rng.standard_normal(trials) + mu * inc
    n_fit = max(4, round(fit * trials))
    thr = best_threshold(s[:n_fit][inc[:n_fit]], s[:n_fit][~inc[:n_fit]], delta=delta, confidence=0.975)
    a, b = s[n_fit:][inc[n_fit:]], s[n_fit:][~inc[n_fit:]]
    tp, fp = int((a > thr).sum()), int((b > thr).sum())
    return epsilon_lower_bound_clopper_pearson(
        tp=tp, fp=fp, tn=len(b) - fp, fn=len(a) - tp, delta=delta, confidence=0.975
    )


def trials_needed_cp(mu: float, target: float, *, delta: float, cap: int = 2_000_000) -> int | None:
    """Smallest T in a doubling grid whose CP bound (median over 3 simulated audits) reaches ``target``."""
    t = 1000
    while t <= cap:
        lbs = [cp_bound_on_gaussian_scores(mu, t, delta=delta, seed=s) for s in range(3)]
        if float(np.median(lbs)) >= target:
            return t
        t *= 2
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mechanisms", default="dp_popularity,dp_ease")
    ap.add_argument("--eps", default="1,2,4,8")
    ap.add_argument("--grid", default="500,1000,2000,5000", help="trial counts tried in order (T ≤ 5000)")
    ap.add_argument(
        "--seeds", type=int, default=10, help="independent audits per ε for the false-alarm check"
    )
    ap.add_argument("--seed-trials", type=int, default=1000, help="T of each false-alarm audit")
    ap.add_argument("--seed-mechanism", default="dp_popularity", help="mechanism of the false-alarm check")
    ap.add_argument("--users", type=int, default=500, help="replica users")
    ap.add_argument("--items", type=int, default=300, help="replica items")
    ap.add_argument("--canary-items", type=int, default=100)
    ap.add_argument("--no-mutants", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    eps_list = [float(e) for e in args.eps.split(",")]
    grid = [int(t) for t in args.grid.split(",")]
    size = {"users": args.users, "items": args.items, "canary_items": args.canary_items}
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    emit(
        f"Replica: {args.users} users × {args.items} items, canary with {args.canary_items} items; δ = 1e-5, "
        f"unit user, PRV accountant, one release; 95% confidence. {platform.node()} load {load:.1f} at start."
    )
    emit()
    emit(
        "| mechanism | ε claimed | trials T | ε lower bound | CP bound | Gaussian-DP bound | μ fitted "
        "| μ claimed | ≥ 0.5× claim | wall (s) |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for mech in args.mechanisms.split(","):
        for eps in eps_list:
            claim = claim_for(epsilon=eps, approach=mech, users=args.users, n_items=args.items)
            for t in grid:
                r = run_release_audit(claim, ReleaseAuditConfig(trials=t, seed=0, **size))  # type: ignore[arg-type]
                ok = r.epsilon_lb >= 0.5 * claim.epsilon
                emit(
                    f"| {mech} | {claim.epsilon:.2f} | {t} | {r.epsilon_lb:.2f} | {r.epsilon_cp_lb:.2f} | "
                    f"{r.epsilon_gaussian_lb:.2f} | {r.fit.mu:.3f} | {claim.mu:.3f} | {'yes' if ok else 'no'} | "
                    f"{r.seconds:.1f} |"
                )
                if ok or not r.passed:
                    break
    emit()
    emit("Trials the assumption-free Clopper–Pearson bound alone needs for ≥ 0.5× the claim (simulated exact")
    emit("Gaussian scores at the claimed μ through the audit's own threshold choice and bound; median of 3):")
    emit()
    emit("| ε claimed | μ claimed | T needed (CP alone) |")
    emit("|---|---|---|")
    for eps in eps_list:
        claim = claim_for(epsilon=eps, users=args.users, n_items=args.items)
        need = trials_needed_cp(claim.mu, 0.5 * claim.epsilon, delta=claim.delta)
        emit(f"| {claim.epsilon:.2f} | {claim.mu:.3f} | {'> 2 000 000' if need is None else f'{need:,}'} |")
    if args.seeds:
        emit()
        emit(
            f"No false alarm: {args.seeds} audits of the product's {args.seed_mechanism} release per ε "
            f"(seeds 1…{args.seeds}, T = {args.seed_trials} each):"
        )
        emit()
        emit(
            "| ε claimed | audits | max ε lower bound | mean ε lower bound | any above the claim | wall (s) |"
        )
        emit("|---|---|---|---|---|---|")
        for eps in eps_list:
            claim = claim_for(epsilon=eps, approach=args.seed_mechanism, users=args.users, n_items=args.items)
            t0 = time.perf_counter()
            lbs = [
                run_release_audit(
                    claim,
                    ReleaseAuditConfig(trials=args.seed_trials, seed=s, **size),  # type: ignore[arg-type]
                ).epsilon_lb
                for s in range(1, args.seeds + 1)
            ]
            emit(
                f"| {claim.epsilon:.2f} | {len(lbs)} | {max(lbs):.2f} | {float(np.mean(lbs)):.2f} | "
                f"{'YES' if max(lbs) > claim.epsilon else 'no'} | {time.perf_counter() - t0:.0f} |"
            )
    if not args.no_mutants:
        emit()
        emit("Planted broken releases (tests/release_mutants.py) at ε = 2, dp_popularity, T = 400:")
        emit()
        emit("| mutation | ε lower bound | failed checks | caught |")
        emit("|---|---|---|---|")
        claim = claim_for(epsilon=2.0, approach="dp_popularity", users=args.users, n_items=args.items)
        caught = 0
        for m in MUTANTS:
            r = run_release_audit(
                claim,
                ReleaseAuditConfig(trials=400, mechanism=f"tests.release_mutants:{m}", **size),  # type: ignore[arg-type]
            )
            failed = sorted(c.name for c in r.checks() if not c.passed)
            caught += bool(failed)
            lb = "∞" if math.isinf(r.epsilon_lb) else f"{r.epsilon_lb:.2f}"
            emit(f"| {m} | {lb} | {', '.join(failed) or '—'} | {'yes' if failed else 'NO'} |")
        emit(f"\n{caught} / {len(MUTANTS)} caught.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    emit(f"\nLoad at the end: {load:.1f}.")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

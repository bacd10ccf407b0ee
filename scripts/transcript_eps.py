"""What covering the whole transcript costs at ε = 1 / 3 / 8 (docs/TRANSCRIPT.md, issue 20).

For each cap: ε of the noisy count alone (σ_c = 20), of the count + the DP test evaluation
(σ_e = 10), and the noise each approach is calibrated to before (count and evaluation uncovered) and
after (both charged in the same accountant): the DP-SGD σ for a tenant of N users (q = 1/⌈N/B⌉,
round(E/q) steps per round, R rounds) and the item-release σ. A larger σ after = the utility cost.

    python scripts/transcript_eps.py [--users 471] [--batch 64] [--rounds 5] [--delta 1e-5]
"""

from __future__ import annotations

import argparse
import math

from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.privacy.gram import calibrate_release_sigma
from fedrec.privacy.mechanisms import count_segment, eval_segment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=471, help="users of one tenant (ml-100k over 2 tenants)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--delta", type=float, default=1e-5)
    a = ap.parse_args()
    q = 1.0 / math.ceil(a.users / a.batch)
    steps = max(1, round(a.epochs / q)) * a.rounds
    count, ev = count_segment(), eval_segment()
    eps_count = epsilon(history=[count], delta=a.delta, accountant="prv")
    eps_both = epsilon(history=[count, ev], delta=a.delta, accountant="prv")
    print(
        f"δ = {a.delta:g}, PRV; tenant of {a.users} users, q = {q:.4g}, {steps} DP-SGD steps over {a.rounds} rounds"
    )
    print(
        f"ε(noisy count, σ_c = {count[0]:g}) = {eps_count:.3f};  ε(count + DP test eval, σ_e = {ev[0]:g}) = {eps_both:.3f}"
    )
    print("| cap ε | DP-SGD σ before | after (count + eval) | ratio | release σ before | after | ratio |")
    print("|---|---|---|---|---|---|---|")
    for cap in (1.0, 3.0, 8.0):
        s0 = calibrate_noise(target_epsilon=cap, delta=a.delta, sample_rate=q, steps=steps)
        s1 = calibrate_noise(
            target_epsilon=cap, delta=a.delta, sample_rate=q, steps=steps, history_before=[count, ev]
        )
        r0 = calibrate_release_sigma(target_epsilon=cap, delta=a.delta)
        r1 = calibrate_release_sigma(target_epsilon=cap, delta=a.delta, history_before=[count, ev])
        print(f"| {cap:g} | {s0:.3f} | {s1:.3f} | {s1 / s0:.3f} | {r0:.3f} | {r1:.3f} | {r1 / r0:.3f} |")


if __name__ == "__main__":
    main()

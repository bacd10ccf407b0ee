"""How good and how fast is the MLP's candidate generation + re-rank (``fedrec serve --candidates C``)?

    .venv/bin/python scripts/measure_candidates.py --model RUN_DIR [--data DATA] \
        [--candidates 50,100,200,500,1000] [--users 2000] [--timing 200] [--json out.json]
    (a model of scripts/train_synthetic_mlp.py: --data synthetic --synth-users 8000 --synth-items 48000)

For each C, against the exact full-catalogue ranking of the same model (``--candidates 0``):

* **overlap@10**: the mean share of the exact top-10 that the re-rank also returns (1.0 = the same
  ten items), and the share of rows whose top-10 is exactly the same list;
* with ``--data`` (the model's data set): histories and contexts are the validation ones (each user's
  history before the validation item, its hour/weekday; at most ``--users`` users, a seeded sample),
  and full-ranking HR@10 / NDCG@10 on validation for the exact path and each C. Without ``--data``:
  histories of 20 items drawn with a long-tailed popularity from the catalogue (as ``fedrec bench
  serve`` does), no metrics;
* **ms per call** (in-process, one thread): median time of ``rank_scores`` + top-10 for one history at
  a time and for batches of 16, over ``--timing`` histories.

Everything is scored as the server scores it (``Recommender``: no user demographics), so the exact and
re-ranked numbers are comparable with each other, not with the training run's metrics.json (which
uses demographics). Nothing of a history is printed or written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.recommend import Ranked, Recommender


def full_scores(r: Ranked, n_items: int) -> np.ndarray:
    """(B, N) scores from a :class:`Ranked` (items outside the candidates at -inf)."""
    if r.items is None:
        return r.scores
    out = np.full((r.scores.shape[0], n_items), -np.inf, dtype=np.float32)
    ok = r.items >= 0
    rows = np.broadcast_to(np.arange(r.scores.shape[0])[:, None], r.items.shape)
    out[rows[ok], r.items[ok]] = r.scores[ok]
    return out


class RankedScorer:
    """The serving path as an evaluation ``Scorer`` (validation/test contexts, no demographics)."""

    def __init__(self, rec: Recommender) -> None:
        self.rec = rec

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        ctx = (split.val_ctx if which == "val" else split.test_ctx)[users].astype(np.int64)
        return full_scores(self.rec.rank_scores(histories, None, ctx), split.n_items)


def ms_per_call(rec: Recommender, hists: list[np.ndarray], ctx: np.ndarray, batch: int) -> float:
    times = []
    for a in range(0, len(hists) - batch + 1, batch):
        t = time.perf_counter()
        rec.rank_scores(hists[a : a + batch], None, ctx[a : a + batch], min_candidates=10).top(10)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", default=None)
    ap.add_argument("--candidates", default="50,100,200,500,1000")
    ap.add_argument("--synth-users", type=int, default=None, help="With --data synthetic.")
    ap.add_argument("--synth-items", type=int, default=None, help="With --data synthetic.")
    ap.add_argument("--users", type=int, default=2000, help="Most histories (validation users or draws).")
    ap.add_argument("--timing", type=int, default=200, help="Histories timed per setting (0 = no timing).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    n = loaded.catalog.n_items
    cands = [int(c) for c in args.candidates.split(",")]
    split = data = None
    if args.data:
        from fedrec.simulations.data.dataset import prepare_dataset
        from fedrec.simulations.data.sources import load

        data = prepare_dataset(load(args.data, synth_users=args.synth_users, synth_items=args.synth_items))
        if tuple(data.catalog.item_ids) != tuple(loaded.catalog.item_ids):
            sys.exit("error: --data is not the model's data set (its catalogue differs)")
        users = np.flatnonzero(data.split.val_item >= 0)
        if len(users) > args.users:
            users = np.sort(np.random.default_rng(0).choice(users, args.users, replace=False))
        split = data.split.subset(users)  # the sampled users only (their rows, renumbered 0..U-1)
        users = np.arange(split.n_users)
        hists = [split.eval_history(int(u), "val") for u in users]
        ctx = split.val_ctx[users].astype(np.int64)
    else:
        rng = np.random.default_rng(0)
        p = 1.0 / np.arange(1, n + 1) ** 0.8
        p /= p.sum()
        hists = [rng.choice(n, min(20, n), replace=False, p=p) for _ in range(args.users)]
        ctx = np.tile(np.array([12, 3], dtype=np.int64), (len(hists), 1))
    res: dict[str, Any] = {
        "model": loaded.run_id,
        "items": n,
        "histories": "validation" if data else "long-tailed draws, 20 items",
        "rows": len(hists),
        "settings": [],
    }
    exact_rec = Recommender(loaded, candidates=0)
    exact = np.concatenate(
        [
            exact_rec.rank_scores(hists[a : a + 64], None, ctx[a : a + 64]).top(10)[0]
            for a in range(0, len(hists), 64)
        ]
    )  # (U, 10)
    for c in [0, *cands]:
        rec = exact_rec if c == 0 else Recommender(loaded, candidates=c)
        got = np.concatenate(
            [
                rec.rank_scores(hists[a : a + 64], None, ctx[a : a + 64]).top(10)[0]
                for a in range(0, len(hists), 64)
            ]
        )
        overlap = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(exact, got, strict=True)]))
        row: dict[str, Any] = {
            "candidates": c,
            "overlap@10": overlap,
            "same_list": float(np.mean((exact == got).all(1))),
        }
        if data is not None and split is not None:
            m = evaluate(RankedScorer(rec), split, data.catalog, which="val").to_metrics()["full"]
            row |= {"val_hr@10": float(m["hr@10"]), "val_ndcg@10": float(m["ndcg@10"])}
        if args.timing:
            t = min(args.timing, len(hists))
            row["ms_1"] = ms_per_call(rec, hists[:t], ctx[:t], 1)
            row["ms_16"] = ms_per_call(rec, hists[:t], ctx[:t], 16)
        res["settings"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

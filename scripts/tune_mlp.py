"""Tune the centralized HistoryMLP on a leave-one-out-by-time split, selecting by VALIDATION only.

    .venv/bin/python scripts/tune_mlp.py --data ../shared/data/ml-100k [knobs] --seeds 0 1 2 \
        [--out results.jsonl] [--tag NAME] [--baselines]

One invocation = one configuration, trained once per seed with early stopping on validation
NDCG@10 (full ranking). Each seed's best-validation epoch is then evaluated on test; the test numbers
are only reported, never used for a choice. One JSON line per seed (and a mean line) goes to stdout
and, with ``--out``, is appended to that file; compare configurations by their ``val_*`` columns.

The library (shared_model/*, simulations/*) is used as is; everything it lacks is implemented here:

* sampling (``make_batch``): targets drawn at random (the library's way) or from the user's *future*
  (``--target-mode future``: a random cut in the time-ordered history, the items after the cut are the
  targets and the items before it the input, mimicking the next-item test); history kept at random or
  most recent (``--history-mode``); negatives uniform or ∝ popularity^α (``--neg-alpha``);
* loss: the library's per-user weighted BCE, or a per-user sampled softmax (``--loss softmax``: each
  positive against all of the user's sampled negatives), or BPR (``--loss bpr``);
* ablations: no user features, no context, no genres, no item bias, no dot term;
* optimizer: Adam/AdamW, weight decay, betas, cosine or plateau LR schedule; embedding init std;
  dropout on the MLP input.

Each of these stays a per-user loss (one user = one example), so DP-SGD still applies unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.shared_model.baselines import EASE, Popularity
from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.model import Batch, HistoryMLP, ModelConfig
from fedrec.shared_model.training import ModelScorer, SamplingConfig, pad_rows, user_batches
from fedrec.simulations.data.dataset import PreparedData, prepare_dataset
from fedrec.simulations.data.sources import load


# ---------------------------------------------------------------------------------------- sampling
def make_batch(
    split: UserSplit,
    users: np.ndarray,
    args: argparse.Namespace,
    rng: np.random.Generator,
    neg_cdf: np.ndarray | None,
) -> Batch:
    """Like ``training.make_user_batch``, with target/history/negative modes (see module docstring)."""
    pad = split.n_items
    hists, cands, labels, weights, ctx = [], [], [], [], []
    for u in users:
        items = split.history(int(u))
        lo = split.indptr[u]
        n = len(items)
        if args.target_mode == "future" and n >= 2:
            # cut ∈ [max(1, n·min_frac), n-1]: input = items[:cut], targets = items[cut:cut+T]
            lo_cut = max(1, int(n * args.cut_min_frac))
            cut = int(rng.integers(lo_cut, n)) if lo_cut < n else n - 1
            tgt_idx = np.arange(cut, min(n, cut + args.targets))
            rest = np.arange(cut)
        elif args.target_mode == "mixed" and n >= 2 and rng.random() < args.future_prob:
            lo_cut = max(1, int(n * args.cut_min_frac))
            cut = int(rng.integers(lo_cut, n)) if lo_cut < n else n - 1
            tgt_idx = np.arange(cut, min(n, cut + args.targets))
            rest = np.arange(cut)
        else:
            perm = rng.permutation(n)
            n_t = min(args.targets, max(1, n // 2))
            tgt_idx = perm[:n_t]
            rest = np.sort(perm[n_t:])
        if len(rest) > args.max_history:
            if args.history_mode == "recent":
                rest = rest[-args.max_history :]
            else:
                rest = np.sort(rng.choice(rest, args.max_history, replace=False))
        n_t = len(tgt_idx)
        tgt = items[tgt_idx]
        hists.append(items[rest])
        if neg_cdf is None:
            neg = rng.integers(0, pad, size=n_t * args.negatives)
        else:
            neg = np.searchsorted(neg_cdf, rng.random(n_t * args.negatives), side="right")
            neg = np.minimum(neg, pad - 1)
        neg_w = (~np.isin(neg, items)).astype(np.float32)
        cands.append(np.concatenate([tgt, neg]))
        labels.append(np.concatenate([np.ones(n_t, np.float32), np.zeros(len(neg), np.float32)]))
        weights.append(np.concatenate([np.ones(n_t, np.float32), neg_w]))
        ctx.append(split.train_ctx[lo + tgt_idx[0]])
    width = max(len(c) for c in cands)
    lab = np.zeros((len(users), width), np.float32)
    wts = np.zeros((len(users), width), np.float32)
    for j, (lb, wt) in enumerate(zip(labels, weights, strict=True)):
        lab[j, : len(lb)] = lb
        wts[j, : len(wt)] = wt
    return Batch(
        history=torch.from_numpy(pad_rows(hists, pad)),
        candidates=torch.from_numpy(pad_rows(cands, pad, width)),
        user_features=torch.from_numpy(split.user_features[users].astype(np.int64)),
        context=torch.from_numpy(np.stack(ctx).astype(np.int64)),
        labels=torch.from_numpy(lab),
        weights=torch.from_numpy(wts),
    )


# -------------------------------------------------------------------------------------------- loss
def per_user_loss(model: nn.Module, batch: Batch, kind: str) -> torch.Tensor:
    """(B,) per-user loss: "bce" (= training.per_user_loss), "softmax" or "bpr"."""
    assert batch.labels is not None and batch.weights is not None
    logits = model(batch.history, batch.candidates, batch.user_features, batch.context)  # (B, C)
    if kind == "bce":
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        return (bce * batch.weights).sum(1) / batch.weights.sum(1).clamp(min=1.0)
    pos = batch.labels > 0  # (B, C)
    neg = (batch.labels == 0) & (batch.weights > 0)  # (B, C) valid negatives
    if kind == "softmax":
        # each positive p: -log e^{s_p} / (e^{s_p} + Σ_{valid negatives n} e^{s_n})
        neg_lse = torch.logsumexp(logits.masked_fill(~neg, -1e9), dim=1, keepdim=True)  # (B, 1)
        per_pos = -(logits - torch.logaddexp(logits, neg_lse))  # (B, C)
    elif kind == "bpr":
        # mean over valid negatives of softplus(s_n − s_p), per positive
        diff = logits.unsqueeze(1) - logits.unsqueeze(2)  # (B, C_pos, C_neg): s_n − s_p
        sp = F.softplus(diff) * neg.unsqueeze(1).float()
        per_pos = sp.sum(2) / neg.float().sum(1, keepdim=True).clamp(min=1.0)  # (B, C)
    else:
        raise ValueError(kind)
    per_pos = per_pos * pos.float()
    return per_pos.sum(1) / pos.float().sum(1).clamp(min=1.0)


# ------------------------------------------------------------------------------------------- model
class TunedMLP(HistoryMLP):
    """HistoryMLP + optional dropout on the MLP input (training only) and a custom init std."""

    def __init__(
        self, cfg: ModelConfig, genres: np.ndarray | None, *, dropout: float, init_std: float
    ) -> None:
        super().__init__(cfg, genres)
        if init_std != 0.05:
            embs = [self.item_emb, *self.user_feats]
            if self.hour_emb is not None and self.weekday_emb is not None:
                embs += [self.hour_emb, self.weekday_emb]
            for emb in embs:
                nn.init.normal_(emb.weight, std=init_std)
        if dropout > 0:
            self.mlp = nn.Sequential(nn.Dropout(dropout), *self.mlp)

    def score_all(self, history, user_features, context, item_side=None):
        # score_all reads mlp[0] as the first Linear: hide the Dropout (identity in eval) there.
        if isinstance(self.mlp[0], nn.Dropout):
            full = self.mlp
            self.mlp = nn.Sequential(*list(full)[1:])
            try:
                return super().score_all(history, user_features, context, item_side)
            finally:
                self.mlp = full
        return super().score_all(history, user_features, context, item_side)

    def item_side(self):
        if isinstance(self.mlp[0], nn.Dropout):
            full = self.mlp
            self.mlp = nn.Sequential(*list(full)[1:])
            try:
                return super().item_side()
            finally:
                self.mlp = full
        return super().item_side()


def build(data: PreparedData, args: argparse.Namespace) -> TunedMLP:
    cat = data.catalog
    cfg = ModelConfig(
        n_items=cat.n_items,
        n_genres=0 if args.no_genres else len(cat.genre_names),
        user_cardinalities=() if args.no_user_features else cat.cardinalities(),
        dim=args.dim,
        hidden=tuple(args.hidden),
        use_context=not args.no_context,
        item_bias=not args.no_item_bias,
        dot_term=not args.no_dot,
    )
    genres = cat.genres if cfg.n_genres else None
    return TunedMLP(cfg, genres, dropout=args.dropout, init_std=args.init_std)


# -------------------------------------------------------------------------------------------- train
def metrics_of(res: Any) -> dict[str, float]:
    m = res.to_metrics()
    return {
        "hr@10": round(float(m["full"]["hr@10"]), 4),
        "ndcg@10": round(float(m["full"]["ndcg@10"]), 4),
        "sampled_hr@10": round(float(m["sampled"]["hr@10"]), 4),
    }


def train_one(data: PreparedData, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    split = data.split
    model = build(data, args)
    sampling = SamplingConfig(
        max_history=args.max_history,
        targets=args.targets,
        negatives=args.negatives,
        max_eval_history=args.max_eval_history,
    )
    betas = (args.beta1, args.beta2)
    if args.adamw:
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=betas, weight_decay=args.wd
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=betas, weight_decay=args.wd)
    sched: Any = None
    if args.sched == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs, eta_min=args.lr * 0.05)
    elif args.sched == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=args.plateau)
    neg_cdf = None
    if args.neg_alpha > 0:
        p = np.bincount(split.train_items, minlength=split.n_items).astype(np.float64) ** args.neg_alpha
        neg_cdf = np.cumsum(p / p.sum())
    trainable = np.flatnonzero(split.train_counts() > 0)
    best, best_epoch = -1.0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve = []
    epoch = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        tot = 0.0
        for idx in user_batches(len(trainable), args.batch, rng):
            batch = make_batch(split, trainable[idx], args, rng, neg_cdf)
            loss = per_user_loss(model, batch, args.loss)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
            tot += float(loss.detach().sum())
        if epoch % args.eval_every and epoch != args.epochs:
            if sched is not None and args.sched == "cosine":
                sched.step()
            continue
        model.eval()
        val = metrics_of(evaluate(ModelScorer(model, sampling), split, data.catalog, which="val"))
        curve.append((epoch, round(tot / len(trainable), 4), val["ndcg@10"]))
        if val["ndcg@10"] > best:
            best, best_epoch, best_val = val["ndcg@10"], epoch, val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if args.verbose:
            print(f"  seed {seed} ep {epoch} loss {tot / len(trainable):.4f} val {val}", file=sys.stderr)
        if sched is not None:
            sched.step(val["ndcg@10"]) if args.sched == "plateau" else sched.step()
        if epoch - best_epoch >= args.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    test = metrics_of(evaluate(ModelScorer(model, sampling), split, data.catalog, which="test", seed=seed))
    return {
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        **{f"val_{k}": v for k, v in best_val.items()},
        **{f"test_{k}": v for k, v in test.items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "curve": curve if args.curve else None,
    }


def baselines(data: PreparedData) -> list[dict[str, Any]]:
    out = []
    for name, scorer in (
        ("popularity", Popularity().fit(data.split)),
        ("ease500", EASE(lam=500.0).fit(data.split)),
        ("ease100", EASE(lam=100.0).fit(data.split)),
    ):
        row: dict[str, Any] = {"tag": name}
        for which in ("val", "test"):
            m = metrics_of(evaluate(scorer, data.split, data.catalog, which=which))
            row.update({f"{which}_{k}": v for k, v in m.items()})
        out.append(row)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baselines", action="store_true", help="also print popularity / EASE val+test")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--curve", action="store_true", help="include the (epoch, loss, val ndcg) curve")
    # training recipe (defaults = CentralizedConfig / SamplingConfig defaults)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--negatives", type=int, default=4)
    ap.add_argument("--max-history", type=int, default=50)
    ap.add_argument("--max-eval-history", type=int, default=200)
    ap.add_argument("--target-mode", choices=("random", "future", "mixed"), default="random")
    ap.add_argument("--future-prob", type=float, default=0.5, help="mixed: P(future split)")
    ap.add_argument("--cut-min-frac", type=float, default=0.5, help="future: earliest cut, fraction of n")
    ap.add_argument("--history-mode", choices=("random", "recent"), default="random")
    ap.add_argument("--neg-alpha", type=float, default=0.0, help="negatives ∝ popularity^α (0 = uniform)")
    ap.add_argument("--loss", choices=("bce", "softmax", "bpr"), default="bce")
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--adamw", action="store_true")
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--sched", choices=("none", "cosine", "plateau"), default="none")
    ap.add_argument("--plateau", type=int, default=5, help="plateau scheduler patience (evals)")
    ap.add_argument("--init-std", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-user-features", action="store_true")
    ap.add_argument("--no-context", action="store_true")
    ap.add_argument("--no-genres", action="store_true")
    ap.add_argument("--no-item-bias", action="store_true")
    ap.add_argument("--no-dot", action="store_true")
    return ap.parse_args(argv)


KNOBS = [
    "lr",
    "batch",
    "epochs",
    "patience",
    "dim",
    "hidden",
    "targets",
    "negatives",
    "max_history",
    "max_eval_history",
    "target_mode",
    "future_prob",
    "cut_min_frac",
    "history_mode",
    "neg_alpha",
    "loss",
    "wd",
    "adamw",
    "beta1",
    "beta2",
    "sched",
    "init_std",
    "dropout",
    "no_user_features",
    "no_context",
    "no_genres",
    "no_item_bias",
    "no_dot",
]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    data = prepare_dataset(load(args.data))
    rows: list[dict[str, Any]] = []
    if args.baselines:
        rows += baselines(data)
    defaults = vars(parse([]))
    changed = {k: getattr(args, k) for k in KNOBS if getattr(args, k) != defaults[k]}
    runs = []
    for seed in args.seeds:
        r = train_one(data, args, seed)
        runs.append(r)
        rows.append({"tag": args.tag, "changed": changed, **r})
        print(json.dumps(rows[-1]), flush=True)
    if len(runs) > 1:
        keys = [k for k in runs[0] if k.startswith(("val_", "test_")) or k in ("best_epoch", "seconds")]
        mean = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in keys}
        std = {f"{k}_sd": round(float(np.std([r[k] for r in runs], ddof=1)), 4) for k in keys if "@" in k}
        rows.append({"tag": args.tag, "changed": changed, "seed": "mean", **mean, **std})
        print(json.dumps(rows[-1]), flush=True)
    if args.baselines:
        for r in rows[:3]:
            print(json.dumps(r), flush=True)
    if args.out is not None:
        with open(args.out, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"all": vars(args) | {"out": str(args.out)}, **r}, default=str) + "\n")


if __name__ == "__main__":
    main()

"""Training examples batched by user, the loss, a plain epoch, and the model as an evaluation Scorer.

One training example = one user (the unit of user-level DP): a random split of that user's training
items into a history (input, at most ``max_history`` items) and held-out targets (at most
``targets``), plus ``negatives`` uniformly sampled items per target. The user's loss is the weighted
mean BCE over their candidates, so every user weighs the same whatever their number of interactions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.model import Batch, HistoryMLP
from fedrec.shared_model.split_scores import SharedScores

if TYPE_CHECKING:
    from fedrec.shared_model.item_model import Ranker


@dataclass(frozen=True)
class SamplingConfig:
    """How a user's training example is drawn."""

    max_history: int = 50  # history items fed to the model per example
    targets: int = 20  # held-out positives per example (at most half the user's items)
    negatives: int = 4  # uniformly sampled negatives per positive
    max_eval_history: int = 200  # most recent history items used when scoring for evaluation

    def __post_init__(self) -> None:
        for name in ("max_history", "targets", "negatives", "max_eval_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def pad_rows(rows: list[np.ndarray], pad: int, width: int | None = None) -> np.ndarray:
    """Stack 1-D int arrays into (len(rows), width) padded with ``pad`` (right padding)."""
    w = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), max(w, 1)), pad, dtype=np.int64)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r[:w]
    return out


def make_user_batch(
    split: UserSplit,
    users: np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator,
    neg_probs: np.ndarray | None = None,
) -> Batch:
    """Training batch for ``users`` (one example per user), see the module docstring.

    ``neg_probs`` (n_items,): draw negatives from it instead of uniformly (``HistoryMLP.negative_probs``).
    """
    pad = split.n_items
    hists, cands, labels, weights, ctx = [], [], [], [], []
    n_neg = cfg.negatives
    for u in users:
        items = split.history(int(u))
        lo = split.indptr[u]
        n = len(items)
        perm = rng.permutation(n)
        n_t = min(cfg.targets, max(1, n // 2))
        tgt = items[perm[:n_t]]
        rest = perm[n_t:]
        if len(rest) > cfg.max_history:
            rest = rng.choice(rest, cfg.max_history, replace=False)
        hists.append(items[np.sort(rest)])
        neg = (
            rng.integers(0, pad, size=n_t * n_neg)
            if neg_probs is None
            else rng.choice(pad, size=n_t * n_neg, p=neg_probs)
        )
        neg_w = (~np.isin(neg, items)).astype(np.float32)  # a "negative" the user has is dropped
        cands.append(np.concatenate([tgt, neg]))
        labels.append(np.concatenate([np.ones(n_t, np.float32), np.zeros(len(neg), np.float32)]))
        weights.append(np.concatenate([np.ones(n_t, np.float32), neg_w]))
        ctx.append(split.train_ctx[lo + perm[0]])
    width = max(len(c) for c in cands)
    lab = np.zeros((len(users), width), np.float32)
    wts = np.zeros((len(users), width), np.float32)
    for j, (lb, wt) in enumerate(zip(labels, weights, strict=True)):
        lab[j, : len(lb)] = lb
        wts[j, : len(wt)] = wt
    return Batch(
        history=torch.from_numpy(pad_rows(hists, pad)),  # (B, L)
        candidates=torch.from_numpy(pad_rows(cands, pad, width)),  # (B, C)
        user_features=torch.from_numpy(split.user_features[users].astype(np.int64)),  # (B, F)
        context=torch.from_numpy(np.stack(ctx).astype(np.int64)),  # (B, 2)
        labels=torch.from_numpy(lab),
        weights=torch.from_numpy(wts),
    )


def per_user_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Weighted mean BCE per user → (B,). Padding candidates have weight 0."""
    assert batch.labels is not None and batch.weights is not None, "training batch needs labels and weights"
    logits = model(batch.history, batch.candidates, batch.user_features, batch.context)  # (B, C)
    bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")  # (B, C)
    return (bce * batch.weights).sum(1) / batch.weights.sum(1).clamp(min=1.0)


def user_batches(n_users: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled user indices in batches of ``batch_size`` (non-private training)."""
    order = rng.permutation(n_users)
    for s in range(0, n_users, batch_size):
        yield order[s : s + batch_size]


def train_epoch(
    model: HistoryMLP,
    split: UserSplit,
    optimizer: torch.optim.Optimizer,
    cfg: SamplingConfig,
    rng: np.random.Generator,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> float:
    """One non-private pass over all users with a training history; returns the mean user loss."""
    model.train()
    trainable = np.flatnonzero(split.train_counts() > 0)
    total, seen = 0.0, 0
    for idx in user_batches(len(trainable), batch_size, rng):
        batch = make_user_batch(split, trainable[idx], cfg, rng).to(device)
        loss = per_user_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        total += float(loss.detach().sum())
        seen += len(idx)
    return total / max(seen, 1)


class ModelScorer:
    """Adapts :class:`HistoryMLP` to the evaluation harness' ``Scorer`` protocol."""

    def __init__(self, model: Ranker, cfg: SamplingConfig, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        model.eval()
        # An item-release model ignores item_side in score_all (and its item_side is an N × M array).
        self._item_side: Any = model.item_side() if isinstance(model, HistoryMLP) else None

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        ctx = split.test_ctx if which == "test" else split.val_ctx
        hist = pad_rows([h[-self.cfg.max_eval_history :] for h in histories], split.n_items)
        with torch.no_grad():
            scores = self.model.score_all(
                torch.from_numpy(hist).to(self.device),
                torch.from_numpy(split.user_features[users].astype(np.int64)).to(self.device),
                torch.from_numpy(ctx[users].astype(np.int64)).to(self.device),
                self._item_side,
            )
        return scores.float().cpu().numpy()

    def shared_part(self, split: UserSplit) -> SharedScores | None:
        """For a model fitted from the item release: the support and the scores no history changes
        (``fedrec.shared_model.evaluate.SharedScores``), so the evaluation ranks without a (B, N)
        array; None for other models (they are scored densely by :meth:`score`)."""
        from fedrec.shared_model.item_model import ItemReleaseModel

        if not isinstance(self.model, ItemReleaseModel):
            return None
        items = self.model.items.cpu().numpy().astype(np.int64)
        return SharedScores(items=items, outside=self.model.shared_scores().float().cpu().numpy())

    def user_part(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        """(B, M) float32 scores of the support items: the columns :meth:`score` would write there."""
        hist = pad_rows([h[-self.cfg.max_eval_history :] for h in histories], split.n_items)
        from fedrec.shared_model.item_model import ItemReleaseModel

        assert isinstance(self.model, ItemReleaseModel), "user_part needs a model with a shared part"
        return self.model.inside_scores(torch.from_numpy(hist).to(self.device)).float().cpu().numpy()

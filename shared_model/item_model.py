"""Models fitted by the server from the tenants' one-shot DP item release (``fedrec.privacy.gram``).

:class:`ItemReleaseModel` is what a run with ``approach`` ``dp_ease``, ``ease`` or ``dp_popularity``
trains, checkpoints, evaluates at the tenants, saves as ``model.pt`` + ``model.json`` and serves. It
has the ranking interface of :class:`fedrec.shared_model.model.HistoryMLP` (``forward`` over candidates,
``score_all`` over the catalogue, ``item_side``, ``cfg.n_items``, ``cfg.user_cardinalities``), so
``Recommender``, ``fedrec serve``, the explanations and the federated evaluation use one code path.

* ``dp_ease`` / ``ease``: EASE weights ``B`` (M × M) on a support of M items (the DP-EASE rule in
  ``fedrec.shared_model.dp_item``); a history scores ``1[history] · B`` inside the support. Items outside it
  score in ``[OUTSIDE_LOW, OUTSIDE_HIGH]``, below every item inside, ordered by the prior when there
  is one.
* ``dp_popularity``: no support; every item scores its log-prior from the noisy popularity release
  (``fedrec.shared_model.priors.log_prior``).

Everything here is post-processing of a DP release (or, for ``ease``, of exact non-private sums):
it holds no user, no history and nothing per tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from fedrec.shared_model.dp_item import DPEASE
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.priors import log_prior

#: The approaches this module serves (``mlp`` is :class:`fedrec.shared_model.model.HistoryMLP`).
ITEM_KINDS: tuple[str, ...] = ("dp_ease", "ease", "dp_popularity")
#: Scores of out-of-support items lie in this band, below any in-support score (clamped above it).
OUTSIDE_HIGH = -1000.0
OUTSIDE_LOW = -2000.0


@dataclass(frozen=True)
class ItemModelConfig:
    """Architecture of an :class:`ItemReleaseModel` (goes into ``model.json``; public facts only)."""

    kind: str
    n_items: int
    n_support: int
    has_prior: bool = False
    lam: float = 0.0  # the ridge the rule chose (dp_ease / ease)
    select: int = 0  # dp_two_stage stage 1: items the stage-2 Gram covers (the M rule; 0 = the gram-limit)
    head: int = 0  # dp_two_stage stage 1: of those, how many DP-EASE fits; the rest are a tier (0: none)

    def __post_init__(self) -> None:
        if self.kind not in ITEM_KINDS:
            raise FedrecError(f"item model kind must be one of {', '.join(ITEM_KINDS)}, got {self.kind!r}")
        if self.n_items < 1 or not 0 <= self.n_support <= self.n_items:
            raise FedrecError(
                f"need n_items ≥ 1 and 0 ≤ n_support ≤ n_items, got {self.n_items}, {self.n_support}"
            )
        if not 0 <= self.select <= self.n_items:
            raise FedrecError(f"select must be in 0..n_items ({self.n_items}), got {self.select}")
        if self.head < 0 or (self.head and self.head >= self.select):
            raise FedrecError(f"head must be 0 or in 1..select-1 (select {self.select}), got {self.head}")
        if self.kind == "dp_popularity" and (self.n_support or not self.has_prior):
            raise FedrecError("a dp_popularity model has no support and needs a prior")

    @property
    def user_cardinalities(self) -> list[int]:
        """No user features: the ranking depends on the history only (the Recommender interface)."""
        return []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "n_items": self.n_items,
            "n_support": self.n_support,
            "has_prior": self.has_prior,
            "lam": self.lam,
        }
        if self.select:
            out["select"] = self.select
        if self.head:
            out["head"] = self.head
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ItemModelConfig:
        try:
            return cls(
                kind=str(d["kind"]),
                n_items=int(d["n_items"]),
                n_support=int(d["n_support"]),
                has_prior=bool(d.get("has_prior", False)),
                lam=float(d.get("lam", 0.0)),
                select=int(d.get("select", 0)),
                head=int(d.get("head", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FedrecError(f"unreadable item model config ({type(e).__name__}: {e})") from None


class ItemReleaseModel(nn.Module):
    """EASE-on-a-released-Gram or DP popularity, with the ranking interface of ``HistoryMLP``.

    Histories are dense item indices padded with ``n_items`` (as everywhere in fedrec).
    """

    weights: torch.Tensor  # (M, M) float32
    items: torch.Tensor  # (M,) int64, ascending
    column_of: torch.Tensor  # (N + 1,) int64: support column of an item, M for "not in the support"/pad
    outside: torch.Tensor  # (N,) float32: the score of an item outside the support
    prior: torch.Tensor  # (N,) float32 log-prior (zeros without one)

    def __init__(self, cfg: ItemModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, m = cfg.n_items, cfg.n_support
        self.register_buffer("weights", torch.zeros(m, m))
        self.register_buffer("items", torch.zeros(m, dtype=torch.int64))
        self.register_buffer("column_of", torch.full((n + 1,), m, dtype=torch.int64))
        self.register_buffer("outside", torch.full((n,), OUTSIDE_HIGH))
        self.register_buffer("prior", torch.zeros(n))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_ease(
        cls, fitted: DPEASE, n_items: int, *, kind: str, prior: np.ndarray | None = None
    ) -> ItemReleaseModel:
        """Wrap a fitted :class:`DPEASE` (``kind`` = ``dp_ease``, or ``ease`` for an exact Gram)."""
        if fitted.weights is None or fitted.items is None:
            raise FedrecError("the DP-EASE model is not fitted")
        m = len(fitted.items)
        model = cls(
            ItemModelConfig(kind, n_items, m, has_prior=prior is not None, lam=float(fitted.lam_used))
        )
        model.weights.copy_(torch.from_numpy(np.asarray(fitted.weights, dtype=np.float32)))
        model.items.copy_(torch.from_numpy(np.asarray(fitted.items, dtype=np.int64)))
        col = np.full(n_items + 1, m, dtype=np.int64)
        col[fitted.items] = np.arange(m)
        model.column_of.copy_(torch.from_numpy(col))
        if prior is not None:
            model.prior.copy_(torch.from_numpy(np.asarray(prior, dtype=np.float32)))
        model.outside.copy_(torch.from_numpy(_outside_scores(prior, n_items)))
        return model

    @classmethod
    def from_popularity(
        cls, released: np.ndarray, noise_std: float, *, select: int = 0, head: int = 0
    ) -> ItemReleaseModel:
        """DP popularity: rank by the log-prior of the (summed, noisy) popularity release (``select``,
        ``head``: see :class:`ItemModelConfig`)."""
        released = np.asarray(released, dtype=np.float64)
        model = cls(
            ItemModelConfig("dp_popularity", len(released), 0, has_prior=True, select=select, head=head)
        )
        model.prior.copy_(torch.from_numpy(log_prior(released, noise_std).astype(np.float32)))
        return model

    def to_weights(self) -> dict[str, np.ndarray]:
        """Every buffer as numpy (what the server sends the tenants for evaluation)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    @classmethod
    def from_weights(cls, cfg: ItemModelConfig, weights: dict[str, np.ndarray]) -> ItemReleaseModel:
        model = cls(cfg)
        state = model.state_dict()
        if set(weights) != set(state):
            raise FedrecError(f"item model weights have keys {sorted(weights)}, expected {sorted(state)}")
        for k, v in weights.items():
            if tuple(v.shape) != tuple(state[k].shape):
                raise FedrecError(f"item model {k}: shape {tuple(v.shape)} != {tuple(state[k].shape)}")
        model.load_state_dict(
            {k: torch.from_numpy(np.asarray(v)).to(state[k].dtype) for k, v in weights.items()}
        )
        return model

    # ------------------------------------------------------------------ ranking
    def _support_rows(self, history: torch.Tensor) -> torch.Tensor:
        """(B, M) binary history rows over the support (pad and out-of-support items drop out)."""
        m = self.cfg.n_support
        hist = history.clamp(min=0, max=self.cfg.n_items)
        cols = self.column_of[hist]  # (B, L) in [0, M]
        x = torch.zeros(history.shape[0], m + 1, dtype=self.weights.dtype, device=history.device)
        x.scatter_(1, cols, 1.0)
        return x[:, :m]

    @torch.no_grad()
    def score_all(
        self,
        history: torch.Tensor,
        user_features: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        item_side: Any = None,
    ) -> torch.Tensor:
        """Scores (B, n_items); ``user_features``/``context``/``item_side`` are accepted and unused."""
        b = history.shape[0]
        if self.cfg.kind == "dp_popularity":
            return self.prior.unsqueeze(0).expand(b, -1).clone()
        out = self.outside.unsqueeze(0).repeat(b, 1)  # (B, N)
        if self.cfg.n_support:
            out[:, self.items] = self.inside_scores(history)  # (B, M)
        return out

    def _inside_scores(self, history: torch.Tensor) -> torch.Tensor:
        """``1[history] · B`` (B, M) as a sum of the rows of B the history touches.

        The same numbers as the binary-row matmul of :meth:`_support_rows` (up to float summation
        order) at O(L·M) per user instead of O(M²): what serving a large support needs. A history item
        counts once, as in the binary row (repeats are weighted 0). Computed as a sparse (B, M) 0/1
        matrix in CSR (each row's columns ascending) times B: each score is accumulated from 0 in
        ascending column order, as ``embedding_bag(mode="sum")`` over the sorted columns does, so the
        numbers are the same bit for bit, but padding costs nothing (a padded embedding bag multiplies
        every pad by a zero weight: B × L_max × M work where the longest history sets L_max).
        """
        m = self.cfg.n_support
        n_rows = history.shape[0]
        if m == 0 or history.shape[1] == 0:
            return torch.zeros(n_rows, m, dtype=self.weights.dtype, device=history.device)
        col_of = self.column_of.cpu().numpy()
        cols = np.sort(col_of[history.clamp(min=0, max=self.cfg.n_items).cpu().numpy()], axis=1)  # (B, L)
        keep = cols < m  # (B, L) M = pad / outside the support, sorted last
        keep[:, 1:] &= cols[:, 1:] != cols[:, :-1]  # a repeated item counts once
        indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])  # (B + 1,)
        x = sp.csr_matrix(
            (np.ones(int(indptr[-1]), dtype=np.float32), cols[keep], indptr), shape=(n_rows, m)
        )  # (B, M) binary, columns ascending within each row
        w = self.weights.detach().cpu().numpy()  # (M, M) float32
        return torch.from_numpy(np.asarray(x @ w, dtype=w.dtype)).to(history.device)  # (B, M)

    @torch.no_grad()
    def inside_scores(self, history: torch.Tensor) -> torch.Tensor:
        """The history-dependent part of :meth:`score_all`: (B, M) scores of the support ``items``
        (ascending item index), exactly the values ``score_all`` puts in those columns."""
        return self._inside_scores(history).clamp(min=OUTSIDE_HIGH + 1.0)

    def shared_scores(self) -> torch.Tensor:
        """The part of :meth:`score_all` no history changes: (N,) scores of every item outside the
        support (entries at support items are unused). ``score_all`` = this vector for everyone, with
        :meth:`inside_scores` written over the support columns."""
        return self.prior if self.cfg.kind == "dp_popularity" else self.outside

    def forward(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        user_features: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (B, C) of each user's candidates (the same numbers as :meth:`score_all`).

        Only the candidates' columns are computed (explanations score L + 1 histories × K items; on a
        40k catalogue a full ``score_all`` per leave-one-out history would be most of a request).
        """
        cand = candidates.clamp(max=self.cfg.n_items - 1)  # (B, C)
        if self.cfg.kind == "dp_popularity":
            return self.prior[cand]
        out = self.outside[cand]  # (B, C)
        m = self.cfg.n_support
        if m:
            col = self.column_of[cand]  # (B, C) in [0, M]; M = outside the support
            inside = self._inside_scores(history).clamp(min=OUTSIDE_HIGH + 1.0)  # (B, M)
            out = torch.where(col < m, inside.gather(1, col.clamp(max=m - 1)), out)
        return out

    @torch.no_grad()
    def item_side(self) -> tuple[torch.Tensor]:
        """Item vectors for similarity (MMR without genres): rows of B over the support, else the prior."""
        n, m = self.cfg.n_items, self.cfg.n_support
        if m == 0:
            return (self.prior.unsqueeze(1).clone(),)
        vec = torch.zeros(n, m)
        vec[self.items] = self.weights
        return (vec,)


def _outside_scores(prior: np.ndarray | None, n_items: int) -> np.ndarray:
    """(N,) float32 in [OUTSIDE_LOW, OUTSIDE_HIGH]: ordered by ``prior`` (ties by index), else all equal."""
    if prior is None:
        return np.full(n_items, OUTSIDE_HIGH, dtype=np.float32)
    rank = np.argsort(np.argsort(-np.asarray(prior, dtype=np.float64), kind="stable"), kind="stable")
    span = OUTSIDE_HIGH - OUTSIDE_LOW
    return (OUTSIDE_HIGH - span * rank / max(n_items, 1)).astype(np.float32)


#: Any model fedrec trains, saves and serves (the ranking interface both implement).
Ranker = HistoryMLP | ItemReleaseModel

__all__ = ["ITEM_KINDS", "ItemModelConfig", "ItemReleaseModel", "Ranker"]

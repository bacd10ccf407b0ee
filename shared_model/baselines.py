"""Non-neural baselines, fitted on the training part of a :class:`UserSplit`, scored like any model.

* :class:`Popularity` — how often each item was interacted with in training.
* :class:`EASE` — Steck (2019), "Embarrassingly Shallow Autoencoders for Sparse Data": a closed-form
  item-item linear model, the strong non-neural baseline of DESIGN.md.

Both follow :class:`fedrec.shared_model.evaluate.Scorer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.split_scores import SharedScores

#: EASE score of items outside its ``max_items`` support: far below any real score, but finite.
OUT_OF_SUPPORT_SCORE = np.float32(-1e9)


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"{name} is not fitted; call .fit(split) first")


def _binary_rows(histories: list[np.ndarray], columns: np.ndarray, n_cols: int) -> np.ndarray:
    """Dense 0/1 matrix (B, n_cols): row b has 1 at ``columns[i]`` for each item i of history b.

    ``columns`` maps item index → column (or -1 for items that have no column; they are dropped).
    """
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))  # (B,)
    rows = np.repeat(np.arange(len(histories)), lengths)  # (Σ n_b,)
    items = np.concatenate(histories).astype(np.int64) if histories else np.zeros(0, np.int64)  # (Σ n_b,)
    cols = columns[items]  # (Σ n_b,)
    keep = cols >= 0
    out = np.zeros((len(histories), n_cols), dtype=np.float32)  # (B, n_cols)
    out[rows[keep], cols[keep]] = 1.0
    return out


@dataclass
class Popularity:
    """Scores every item by its number of training interactions (the same list for everyone)."""

    counts: np.ndarray | None = field(default=None, repr=False)  # (n_items,) float32 after fit

    def fit(self, split: UserSplit) -> Popularity:
        self.counts = np.bincount(split.train_items, minlength=split.n_items).astype(np.float32)  # (N,)
        return self

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        if self.counts is None:
            raise _not_fitted("Popularity")
        assert len(self.counts) == split.n_items, "split and fitted model disagree on n_items"
        return np.broadcast_to(self.counts, (len(users), split.n_items)).copy()  # (B, N)

    def shared_part(self, split: UserSplit) -> SharedScores:
        """Every item's score is shared by all users (no support): the evaluation ranks without (B, N)."""
        if self.counts is None:
            raise _not_fitted("Popularity")
        assert len(self.counts) == split.n_items, "split and fitted model disagree on n_items"
        return SharedScores(items=np.zeros(0, dtype=np.int64), outside=self.counts)

    def user_part(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        """No per-user scores: (B, 0)."""
        assert self.counts is not None
        return np.zeros((len(users), 0), dtype=self.counts.dtype)


@dataclass
class EASE:
    """EASE: ``B = I − P·diag(1/diag(P))`` with ``P = (XᵀX + λI)⁻¹``, so ``diag(B) = 0``.

    ``X`` is the binary user × item matrix of the training rows. A user's scores are their binary
    history row times ``B``. With more than ``max_items`` items, only the ``max_items`` most
    popular training items (ties → lower index) get a model; the others score
    :data:`OUT_OF_SUPPORT_SCORE` (below every real score but finite, so every rank stays defined;
    they tie among themselves, which the pessimistic rank counts against them) — or, with
    ``rest_by_popularity``, below every in-support score of the user and ordered by their training
    count among themselves (so the long tail is ranked, never dropped).
    """

    lam: float = 500.0  # L2 weight λ on B; Steck reports 100..1000 good on MovieLens
    max_items: int = 4000  # support size cap: the inverse costs O(max_items³) time, O(max_items²) memory
    rest_by_popularity: bool = False  # items outside the support: by popularity (True) or one constant
    weights: np.ndarray | None = field(default=None, repr=False)  # (m, m) float32 B after fit
    items: np.ndarray | None = field(default=None, repr=False)  # (m,) item index of each column
    column_of: np.ndarray | None = field(default=None, repr=False)  # (n_items,) column or -1
    counts: np.ndarray | None = field(default=None, repr=False)  # (n_items,) training count of each item

    def __post_init__(self) -> None:
        if self.lam <= 0:
            raise ValueError(f"EASE lam must be > 0, got {self.lam}")
        if self.max_items < 1:
            raise ValueError(f"EASE max_items must be ≥ 1, got {self.max_items}")

    def fit(self, split: UserSplit) -> EASE:
        n = split.n_items
        counts = np.bincount(split.train_items, minlength=n)  # (N,)
        if n > self.max_items:
            by_pop = np.lexsort((np.arange(n), -counts))  # most popular first, ties → lower index
            items = np.sort(by_pop[: self.max_items])  # (m,)
        else:
            items = np.arange(n)  # (m,)
        m = len(items)
        column_of = np.full(n, -1, dtype=np.int64)  # (N,)
        column_of[items] = np.arange(m)
        # Binary X (users × m) in CSR; duplicates collapse to 1.
        user_of = np.repeat(np.arange(split.n_users), split.train_counts())  # (nnz,)
        cols = column_of[split.train_items]  # (nnz,)
        keep = cols >= 0
        x = sp.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.float64), (user_of[keep], cols[keep])),
            shape=(split.n_users, m),
        )
        x.sum_duplicates()
        x.data[:] = 1.0
        gram = (x.T @ x).toarray()  # (m, m) XᵀX, never a dense users × items matrix
        gram[np.diag_indices(m)] += self.lam
        p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram), np.eye(m))  # (m, m) (XᵀX + λI)⁻¹
        b = -p / np.diag(p)[None, :]  # (m, m) B_ij = −P_ij / P_jj
        b[np.diag_indices(m)] = 0.0
        self.weights, self.items, self.column_of = b.astype(np.float32), items, column_of
        self.counts = counts
        return self

    def support(self) -> dict[str, int | str]:
        """What ``metrics.json`` says about the support: items modelled, of how many, and the rest."""
        if self.items is None or self.column_of is None:
            raise _not_fitted("EASE")
        n, m = len(self.column_of), len(self.items)
        rest = "none" if m == n else ("popularity" if self.rest_by_popularity else "constant")
        return {"items": m, "catalogue": n, "rest": rest}

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        if self.weights is None or self.items is None or self.column_of is None:
            raise _not_fitted("EASE")
        assert len(self.column_of) == split.n_items, "split and fitted model disagree on n_items"
        m = len(self.items)
        x = _binary_rows(histories, self.column_of, m)  # (B, m)
        inside = x @ self.weights  # (B, m)
        if m == split.n_items:
            return inside
        out = np.full((len(histories), split.n_items), OUT_OF_SUPPORT_SCORE, dtype=np.float32)  # (B, N)
        if self.rest_by_popularity and self.counts is not None:
            # rest ∈ [low − 2, low − 1): below the user's lowest in-support score, by training count.
            low = (
                inside.min(axis=1, keepdims=True) if m else np.zeros((len(histories), 1), np.float32)
            )  # (B, 1)
            pop = (self.counts / (self.counts.max() + 1.0)).astype(np.float32)  # (N,) in [0, 1)
            out[:] = low - 2.0 + pop[None, :]
        out[:, self.items] = inside
        return out


def user_level_item_vector(split: UserSplit) -> np.ndarray:
    """Σ_users x_u with x_u = 1/√n_u on each of user u's distinct training items, (n_items,) float64.

    Every user's vector has L2 norm exactly 1, so the sum has user-level L2 sensitivity 1: one
    Gaussian release with σ calibrated for (ε, δ) at sensitivity 1 is user-level DP.
    """
    out = np.zeros(split.n_items, dtype=np.float64)
    for u in range(split.n_users):
        items = np.unique(split.history(u))
        if len(items):
            out[items] += 1.0 / np.sqrt(len(items))
    return out


class DPPopularity(Popularity):
    """Popularity from a noisy user-level item vector (the sum of the tenants' Gaussian releases).

    ``release(split, sigma, rng)`` is what one tenant publishes; the server adds the releases up and
    ranks by the noisy total. The caller calibrates ``sigma`` (fedrec.privacy.accounting) for the run's ε, δ.
    """

    @staticmethod
    def release(split: UserSplit, sigma: float, rng: np.random.Generator) -> np.ndarray:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        vec = user_level_item_vector(split)
        return vec + rng.normal(0.0, sigma, size=vec.shape)

    def fit_released(self, total: np.ndarray) -> DPPopularity:
        self.counts = np.asarray(total, dtype=np.float64)
        return self

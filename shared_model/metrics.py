"""Ranking metrics as small pure functions, and :class:`RankingSums` to add them up across users.

Every function works per user: arrays in, arrays out. A user has exactly one relevant item (the
held-out one), so each metric is a function of that item's 0-based rank alone; ``rank = inf`` means
"not reachable" (masked or missing) and scores 0 everywhere.

Federated evaluation never averages averages: clients keep *sums* over their users
(:class:`RankingSums`), the server merges them with ``+`` and divides once in
:meth:`RankingSums.result`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: Type of one value of :meth:`RankingSums.to_record` (what a Flower ``MetricRecord`` accepts).
RecordValue = int | float | list[int]


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Pessimistic 0-based rank of each user's target item.

    ``rank[b] = #{j : s[b, j] > s[b, t]} + #{j ≠ t : s[b, j] = s[b, t]}`` with ``t = targets[b]``:
    ties count against the target, so a constant scorer ranks every target last, never first.
    ``rank[b] = inf`` when ``targets[b] < 0`` (no held-out item) or its score is -inf or NaN
    (masked, i.e. unreachable). NaN scores of other items never count as better.

    ``scores``: (B, N) float; ``targets``: (B,) int. Returns (B,) float64.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    assert scores.ndim == 2, f"scores must be (B, N), got shape {scores.shape}"
    assert targets.shape == (scores.shape[0],), f"targets must be ({scores.shape[0]},), got {targets.shape}"
    n_items = scores.shape[1]
    if np.any(targets >= n_items):
        raise ValueError(f"target item index out of range: max {int(targets.max())} ≥ n_items {n_items}")
    valid = targets >= 0  # (B,)
    safe = np.where(valid, targets, 0)  # (B,) index 0 stands in for missing targets
    target_scores = scores[np.arange(len(targets)), safe]  # (B,)
    # ≥ counts the target itself once, hence the -1.
    ranks = (scores >= target_scores[:, None]).sum(axis=1).astype(np.float64) - 1.0  # (B,)
    unreachable = ~valid | np.isnan(target_scores) | np.isneginf(target_scores)
    ranks[unreachable] = np.inf
    return ranks


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")


def hits_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Hit ratio per user: ``1 if rank < k else 0``. (B,) → (B,) float64."""
    _check_k(k)
    return (np.asarray(ranks, dtype=np.float64) < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """NDCG per user with one relevant item: ``1 / log2(rank + 2) if rank < k else 0``.

    (The ideal DCG is 1, the relevant item at rank 0.) (B,) → (B,) float64.
    """
    _check_k(k)
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < k
    return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0.0) + 2.0), 0.0)


def reciprocal_rank(ranks: np.ndarray) -> np.ndarray:
    """Reciprocal rank per user: ``1 / (rank + 1)``, 0 for ``rank = inf``. (B,) → (B,) float64."""
    return 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)


def intra_list_diversity(topk: np.ndarray, item_vecs: np.ndarray) -> np.ndarray:
    """Intra-list diversity of each top-K list: ``1 − mean_{i<j} cos(v_i, v_j)`` over its items.

    Entries < 0 in ``topk`` are padding and ignored. Items whose vector is all zeros have
    similarity 0 with everything. A list with fewer than 2 real items has diversity 0.

    ``topk``: (B, K) int item indices; ``item_vecs``: (N, G) float (e.g. genre multi-hots).
    Returns (B,) float64.
    """
    topk = np.asarray(topk)
    item_vecs = np.asarray(item_vecs, dtype=np.float64)
    assert topk.ndim == 2, f"topk must be (B, K), got shape {topk.shape}"
    assert item_vecs.ndim == 2, f"item_vecs must be (N, G), got shape {item_vecs.shape}"
    if topk.size and topk.max() >= item_vecs.shape[0]:
        raise ValueError(f"top-K item index {int(topk.max())} ≥ number of item vectors {item_vecs.shape[0]}")
    norms = np.linalg.norm(item_vecs, axis=1, keepdims=True)  # (N, 1)
    unit = np.divide(item_vecs, norms, out=np.zeros_like(item_vecs), where=norms > 0)  # (N, G)
    real = topk >= 0  # (B, K)
    vecs = unit[np.where(real, topk, 0)] * real[..., None]  # (B, K, G), padding rows zeroed
    gram = vecs @ vecs.transpose(0, 2, 1)  # (B, K, K)
    pair_sum = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / 2.0  # (B,) sum over i<j
    m = real.sum(axis=1)  # (B,) real items per list
    pairs = m * (m - 1) / 2.0  # (B,)
    return np.where(pairs > 0, 1.0 - pair_sum / np.maximum(pairs, 1.0), 0.0)


@dataclass
class RankingSums:
    """Running sums of per-user ranking metrics at cut-off ``k``; merge with ``+``, divide once.

    ``users`` counts ranked users (unreachable targets included: they score 0). ``lists`` counts
    users whose top-K list was added (for ILD); ``recommended`` marks every item that appeared in
    any top-K list (for catalogue coverage), merged by OR.
    """

    k: int
    users: int = 0
    hits: float = 0.0  # Σ hit@k
    ndcg: float = 0.0  # Σ ndcg@k
    rr: float = 0.0  # Σ reciprocal rank
    ild: float = 0.0  # Σ intra-list diversity over ``lists`` users
    lists: int = 0
    recommended: np.ndarray | None = field(default=None)  # (N,) bool, None until a list is added

    def __post_init__(self) -> None:
        _check_k(self.k)

    def add(
        self,
        ranks: np.ndarray,
        topk: np.ndarray | None = None,
        item_vecs: np.ndarray | None = None,
        *,
        n_items: int | None = None,
    ) -> None:
        """Add a batch of users: their target ranks (B,), and optionally their top-K lists (B, K).

        With ``topk``, the lists update coverage (needs ``n_items``, or ``item_vecs`` to tell it)
        and, with ``item_vecs`` (N, G), intra-list diversity.
        """
        ranks = np.asarray(ranks, dtype=np.float64)
        assert ranks.ndim == 1, f"ranks must be (B,), got shape {ranks.shape}"
        self.users += len(ranks)
        self.hits += float(hits_at_k(ranks, self.k).sum())
        self.ndcg += float(ndcg_at_k(ranks, self.k).sum())
        self.rr += float(reciprocal_rank(ranks).sum())
        if topk is None:
            return
        topk = np.asarray(topk)
        assert topk.shape[0] == len(ranks), f"topk must have one row per rank, got {topk.shape}"
        if n_items is None:
            if item_vecs is not None:
                n_items = int(np.asarray(item_vecs).shape[0])
            elif self.recommended is not None:
                n_items = len(self.recommended)
            else:
                raise ValueError("RankingSums.add needs n_items (or item_vecs) to track coverage")
        if self.recommended is None:
            self.recommended = np.zeros(n_items, dtype=bool)
        if len(self.recommended) != n_items:
            raise ValueError(f"coverage mask has {len(self.recommended)} items, this batch {n_items}")
        chosen = topk[topk >= 0]  # (≤ B·K,)
        if chosen.size and chosen.max() >= n_items:
            raise ValueError(f"top-K item index {int(chosen.max())} ≥ n_items {n_items}")
        self.recommended[chosen] = True
        if item_vecs is not None:
            self.ild += float(intra_list_diversity(topk, item_vecs).sum())
            self.lists += len(ranks)

    def __add__(self, other: RankingSums) -> RankingSums:
        if not isinstance(other, RankingSums):
            return NotImplemented
        if other.k != self.k:
            raise ValueError(f"cannot merge metrics at different cut-offs: k={self.k} and k={other.k}")
        a, b = self.recommended, other.recommended
        if a is not None and b is not None and len(a) != len(b):
            raise ValueError(f"cannot merge coverage over {len(a)} and {len(b)} items")
        merged = None if a is None and b is None else (a if b is None else b if a is None else a | b)
        return RankingSums(
            k=self.k,
            users=self.users + other.users,
            hits=self.hits + other.hits,
            ndcg=self.ndcg + other.ndcg,
            rr=self.rr + other.rr,
            ild=self.ild + other.ild,
            lists=self.lists + other.lists,
            recommended=None if merged is None else merged.copy(),
        )

    def __radd__(self, other: object) -> RankingSums:
        """Lets ``sum(parts)`` work (its start value is 0)."""
        if other == 0:
            return self + RankingSums(k=self.k)
        return NotImplemented

    def result(self) -> dict[str, float | int]:
        """Means over users: ``hr@K``, ``ndcg@K``, ``mrr``, ``ild@K``, ``coverage@K``, and ``users``.

        Zero users (or zero lists) give 0.0, not an error.
        """
        n, m, k = self.users, self.lists, self.k
        return {
            f"hr@{k}": self.hits / n if n else 0.0,
            f"ndcg@{k}": self.ndcg / n if n else 0.0,
            "mrr": self.rr / n if n else 0.0,
            f"ild@{k}": self.ild / m if m else 0.0,
            f"coverage@{k}": float(self.recommended.mean()) if self.recommended is not None else 0.0,
            "users": n,
        }

    def to_record(self) -> dict[str, RecordValue]:
        """Flat values for a Flower ``MetricRecord``; ``recommended`` as a 0/1 list (absent if None).

        Merge records on the server with ``from_record(a) + from_record(b)``, not by adding values.
        """
        rec: dict[str, RecordValue] = {
            "k": self.k,
            "users": self.users,
            "hits": self.hits,
            "ndcg": self.ndcg,
            "rr": self.rr,
            "ild": self.ild,
            "lists": self.lists,
        }
        if self.recommended is not None:
            rec["recommended"] = self.recommended.astype(np.int64).tolist()
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RankingSums:
        """Inverse of :meth:`to_record` (a ``recommended`` entry > 0 counts as recommended)."""
        missing = {"k", "users", "hits", "ndcg", "rr"} - set(record)
        if missing:
            raise ValueError(f"metric record lacks {sorted(missing)}")
        rec = record.get("recommended")
        return cls(
            k=int(record["k"]),  # type: ignore[call-overload]
            users=int(record["users"]),  # type: ignore[call-overload]
            hits=float(record["hits"]),  # type: ignore[arg-type]
            ndcg=float(record["ndcg"]),  # type: ignore[arg-type]
            rr=float(record["rr"]),  # type: ignore[arg-type]
            ild=float(record.get("ild", 0.0)),  # type: ignore[arg-type]
            lists=int(record.get("lists", 0)),  # type: ignore[call-overload]
            recommended=None if rec is None else np.asarray(rec) > 0,
        )

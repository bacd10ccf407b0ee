"""Ranking metrics as small pure functions, and :class:`RankingSums` to add them up across users.

Every function works per user: arrays in, arrays out. Under leave-one-out a user has exactly one
relevant item (the held-out one), so each metric is a function of that item's 0-based rank alone;
``rank = inf`` means "not reachable" (masked or missing) and scores 0 everywhere.

Given splits (a fixed train/test pair, LightGCN / BARS format) have several test items per user:
:func:`hit_matrix` turns scores into a (users × K) 0/1 matrix, and :func:`recall_at_k`,
:func:`ndcg_at_k_multi` and :func:`hit_at_k` read it with the test-set sizes; one relevant item gives
the leave-one-out values back. :class:`SetRankingSums` adds them up.

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


# ---------------------------------------------------------------- multi-item test sets (given splits)


def hit_matrix(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """0/1 hit matrix of each user's top-``k`` list: ``hits[b, i] = 1`` iff its i-th item is relevant.

    The list is the ``k`` best items by score; ties are broken pessimistically — at equal scores
    every non-relevant item comes before a relevant one (relevant ones among themselves by index),
    so a constant scorer never earns a hit it did not rank. Items scored -inf or NaN (masked: seen
    in training) are never hits, even when fewer than ``k`` items are finite. With one relevant item
    per row, ``hits[b].argmax()`` is :func:`ranks_from_scores`' pessimistic rank whenever it is < k.

    ``scores``: (B, N) float; ``relevant``: (B, N) bool. Returns (B, min(k, N)) float64.
    """
    _check_k(k)
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    assert scores.ndim == 2, f"scores must be (B, N), got shape {scores.shape}"
    assert relevant.shape == scores.shape, f"relevant must be {scores.shape}, got {relevant.shape}"
    n_rows, n_items = scores.shape
    k = min(k, n_items)
    clean = np.where(np.isnan(scores), -np.inf, scores)  # (B, N) NaN never ranks above anything
    hits = np.zeros((n_rows, k), dtype=np.float64)  # (B, k)
    if n_rows == 0 or k == 0:
        return hits
    kth = np.partition(clean, n_items - k, axis=1)[:, n_items - k]  # (B,) k-th largest score
    for b in range(n_rows):
        cand = np.flatnonzero(clean[b] >= kth[b])  # (≥ k,) the top k and everything tied with the k-th
        rel = relevant[b, cand]
        order = np.lexsort((cand, rel, -clean[b, cand]))[:k]  # score desc, then non-relevant first
        hits[b, : len(order)] = rel[order] & np.isfinite(clean[b, cand[order]])
    return hits


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """0-based rank of each user's best-ranked relevant item, with :func:`hit_matrix`'s tie rule.

    ``rank[b] = #{j : s_bj > s*} + #{j not relevant : s_bj = s*}`` with ``s*`` the best relevant
    score; ``inf`` when no relevant item has a finite score. With one relevant item this is
    :func:`ranks_from_scores`. ``scores``, ``relevant``: (B, N). Returns (B,) float64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    assert relevant.shape == scores.shape and scores.ndim == 2, "scores and relevant must both be (B, N)"
    clean = np.where(np.isnan(scores), -np.inf, scores)  # (B, N)
    best = np.where(relevant, clean, -np.inf).max(axis=1, initial=-np.inf)  # (B,)
    above = (clean > best[:, None]).sum(axis=1)  # (B,)
    tied = ((clean == best[:, None]) & ~relevant).sum(axis=1)  # (B,)
    ranks = (above + tied).astype(np.float64)
    ranks[~np.isfinite(best)] = np.inf
    return ranks


def _check_hits(hits: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hits = np.asarray(hits, dtype=np.float64)
    n_relevant = np.asarray(n_relevant, dtype=np.float64)
    assert hits.ndim == 2, f"hits must be (B, K), got shape {hits.shape}"
    b = hits.shape[0]
    assert n_relevant.shape == (b,), f"n_relevant must be ({b},), got {n_relevant.shape}"
    if np.any(hits.sum(axis=1) > n_relevant):
        raise ValueError("a row of hits has more hits than relevant items (n_relevant too small)")
    return hits, n_relevant


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Recall@K per user: ``Σ_i hits[b, i] / n_relevant[b]`` (0 when the user has no relevant item).

    ``hits``: (B, K) 0/1 from :func:`hit_matrix`; ``n_relevant``: (B,) size of each user's test set,
    counting test items that cannot be ranked (they are misses). Returns (B,) float64.
    """
    hits, n = _check_hits(hits, n_relevant)
    return np.divide(hits.sum(axis=1), n, out=np.zeros(len(n)), where=n > 0)


def ndcg_at_k_multi(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """NDCG@K per user with binary relevance and several relevant items.

    ``DCG = Σ_{i<K} hits[b, i] / log2(i + 2)``, ``IDCG = Σ_{i < min(n_relevant[b], K)} 1 / log2(i + 2)``
    (all relevant items first), NDCG = DCG / IDCG, 0 when ``n_relevant = 0``. With one relevant item
    at rank r < K this is ``1 / log2(r + 2)``, i.e. :func:`ndcg_at_k`. (B, K), (B,) → (B,) float64.
    """
    hits, n = _check_hits(hits, n_relevant)
    k = hits.shape[1]
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (K,)
    dcg = hits @ discount  # (B,)
    ideal_cum = np.concatenate([[0.0], np.cumsum(discount)])  # (K+1,) IDCG of 0..K relevant items
    idcg = ideal_cum[np.minimum(n, k).astype(np.int64)]  # (B,)
    return np.divide(dcg, idcg, out=np.zeros(len(n)), where=idcg > 0)


def hit_at_k(hits: np.ndarray) -> np.ndarray:
    """HitRate@K per user: 1 if any of the top K is relevant, else 0. (B, K) → (B,) float64."""
    hits = np.asarray(hits, dtype=np.float64)
    assert hits.ndim == 2, f"hits must be (B, K), got shape {hits.shape}"
    return (hits.sum(axis=1) > 0).astype(np.float64)


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


def _mean(total: float, n: int) -> float:
    """``total / n`` clipped to [0, 1] (0.0 when n ≤ 0): the mean of per-user values in [0, 1].

    Exact sums are never clipped. Under ``eval-privacy dp`` each sum and the user count carry Gaussian
    noise, so a small federation's ratio can leave [0, 1] (a hit rate of 1.07 was seen at 240 users);
    clipping is post-processing and costs no ε.
    """
    return min(1.0, max(0.0, total / n)) if n > 0 else 0.0


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
        ndcg: np.ndarray | None = None,
    ) -> None:
        """Add a batch of users: their target ranks (B,), and optionally their top-K lists (B, K).

        With ``topk``, the lists update coverage (needs ``n_items``, or ``item_vecs`` to tell it)
        and, with ``item_vecs`` (N, G), intra-list diversity. Users with several relevant items pass
        the rank of their best one and their own NDCG@K values (B,) (:func:`ndcg_at_k_multi`).
        """
        ranks = np.asarray(ranks, dtype=np.float64)
        assert ranks.ndim == 1, f"ranks must be (B,), got shape {ranks.shape}"
        self.users += len(ranks)
        self.hits += float(hits_at_k(ranks, self.k).sum())
        if ndcg is None:
            self.ndcg += float(ndcg_at_k(ranks, self.k).sum())
        else:
            assert np.shape(ndcg) == ranks.shape, f"ndcg must be {ranks.shape}, got {np.shape(ndcg)}"
            self.ndcg += float(np.sum(ndcg))
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

        Zero users (or zero lists) give 0.0, not an error. hr, ndcg and mrr are clipped to [0, 1]
        (see :func:`_mean`).
        """
        n, m, k = self.users, self.lists, self.k
        return {
            f"hr@{k}": _mean(self.hits, n),
            f"ndcg@{k}": _mean(self.ndcg, n),
            "mrr": _mean(self.rr, n),
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


@dataclass
class SetRankingSums:
    """Running sums of Recall@K, NDCG@K and HitRate@K over users with multi-item test sets.

    The field's given-split metrics (LightGCN / BARS family): rank every item not in the user's
    training set; recall divides by the whole test set. Merge with ``+``; :meth:`result` divides once.
    """

    k: int
    users: int = 0
    recall: float = 0.0  # Σ recall@k
    ndcg: float = 0.0  # Σ ndcg@k (ideal DCG over min(|test|, k))
    hit: float = 0.0  # Σ hit@k

    def __post_init__(self) -> None:
        _check_k(self.k)

    def add(self, hits: np.ndarray, n_relevant: np.ndarray) -> None:
        """Add a batch: hit matrix (B, ≤ k) from :func:`hit_matrix` and test-set sizes (B,)."""
        hits = np.asarray(hits, dtype=np.float64)[:, : self.k]
        self.users += hits.shape[0]
        self.recall += float(recall_at_k(hits, n_relevant).sum())
        self.ndcg += float(ndcg_at_k_multi(hits, n_relevant).sum())
        self.hit += float(hit_at_k(hits).sum())

    def __add__(self, other: SetRankingSums) -> SetRankingSums:
        if not isinstance(other, SetRankingSums):
            return NotImplemented
        if other.k != self.k:
            raise ValueError(f"cannot merge metrics at different cut-offs: k={self.k} and k={other.k}")
        return SetRankingSums(
            self.k,
            self.users + other.users,
            self.recall + other.recall,
            self.ndcg + other.ndcg,
            self.hit + other.hit,
        )

    def result(self) -> dict[str, float]:
        """Means over users: ``recall@K``, ``ndcg@K``, ``hit@K`` (0.0 for zero users)."""
        n, k = self.users, self.k
        return {
            f"recall@{k}": _mean(self.recall, n),
            f"ndcg@{k}": _mean(self.ndcg, n),
            f"hit@{k}": _mean(self.hit, n),
        }

    def to_record(self) -> dict[str, RecordValue]:
        return {"k": self.k, "users": self.users, "recall": self.recall, "ndcg": self.ndcg, "hit": self.hit}

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> SetRankingSums:
        missing = {"k", "users", "recall", "ndcg", "hit"} - set(record)
        if missing:
            raise ValueError(f"metric record lacks {sorted(missing)}")
        return cls(
            k=int(record["k"]),  # type: ignore[call-overload]
            users=int(record["users"]),  # type: ignore[call-overload]
            recall=float(record["recall"]),  # type: ignore[arg-type]
            ndcg=float(record["ndcg"]),  # type: ignore[arg-type]
            hit=float(record["hit"]),  # type: ignore[arg-type]
        )

"""The evaluation harness: one protocol for every model, centralized or federated.

For each user with a held-out item of the requested kind (``which`` = "val" or "test"):

* **full** ranking (primary): every item in the user's evaluation history
  (:meth:`UserSplit.eval_history`) is masked to -inf, and the held-out item is ranked among all
  remaining items. HR@K, NDCG@K, MRR, plus coverage and intra-list diversity (over the catalogue's
  genre vectors) of the top-K lists.
* **sampled** (NCF protocol, for comparison with published numbers only): the held-out item is
  ranked among ``negatives`` items drawn uniformly without replacement from the items that are
  neither in the history nor the target, with an RNG seeded from ``(seed, user row)`` — fixed, and
  independent of the batch size. Users with fewer candidates get all of them.

A held-out item that is itself in the history is unreachable (rank inf, a miss in both protocols).
Ranks are pessimistic (ties count against the target, see :func:`ranks_from_scores`).
Results are sums (:class:`EvalResult`), merged across tenants with ``+`` and divided once.

**Given splits** (``split.has_test_sets``, test on ``which="test"``): every user with a non-empty test
set is ranked over all items not in their history, and the full section gains Recall@K, NDCG@K and
HitRate@K at ``set_k`` (20 by default) over the whole test set (:func:`hit_matrix`; test items that
are not in the catalogue or are in the history are misses). ``hr@10``/``ndcg@10``/``mrr`` then read
the same hit matrix: a hit is any test item in the top 10, NDCG@10 has the ideal DCG over
min(|test|, 10), MRR uses the best-ranked test item — with one test item all of these are the
leave-one-out values. The sampled protocol ranks the user's first test item in the file against 99
items outside history ∪ test set. Validation stays one held-out item (taken from TRAIN).

Users are scored in batches of at most ``batch_size`` rows and at most :data:`MAX_SCORE_CELLS`
user × item scores, so no users × items array exists at any catalogue size.

A scorer whose scores are mostly shared by all users (models fitted from the item release: M support
items scored per user, every other item one fixed score; popularity baselines: M = 0) may also offer
``shared_part(split)`` → :class:`~fedrec.shared_model.split_scores.SharedScores` (or None) and
``user_part(split, users, histories, which)`` → (B, M). Then no (B, N) array is written at all: the
same numbers come from the support scores and one sorted list of the shared scores
(``fedrec.shared_model.split_scores``), and batches hold up to :data:`MAX_SCORE_CELLS` support scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.metrics import (
    RankingSums,
    RecordValue,
    SetRankingSums,
    first_relevant_rank,
    hit_matrix,
    ndcg_at_k_multi,
    ranks_from_scores,
)
from fedrec.shared_model.ranking import mask_items, top_k
from fedrec.shared_model.split_scores import SplitRanker

WHICH = ("val", "test")
#: Most user × item scores held per evaluation batch: bounds the scorer's (B, N, hidden) intermediates
#: too (≈ 256 MB of float32 at 64 hidden units). At ml-100k's 1 682 items it allows 623 users, so the
#: default batch of 512 is unchanged there.
MAX_SCORE_CELLS = 1 << 20
#: Cut-off of Recall/NDCG/HitRate on given splits (the LightGCN / BARS convention).
SET_K = 20


class Scorer(Protocol):
    """Anything that scores all items for a batch of users (higher = better)."""

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        """Scores (B, n_items) for ``users`` (B,) rows of ``split`` with these eval histories.

        ``which`` ("val" or "test") tells the model which context features to use.
        """
        ...


@dataclass
class EvalResult:
    """Mergeable sums of one evaluation: full ranking (with ILD and coverage) and sampled."""

    full: RankingSums
    sampled: RankingSums
    negatives: int
    sets: SetRankingSums | None = None  # given splits: Recall/NDCG/HitRate at SET_K over test sets

    def __add__(self, other: EvalResult) -> EvalResult:
        if not isinstance(other, EvalResult):
            return NotImplemented
        if other.negatives != self.negatives:
            raise ValueError(
                f"cannot merge sampled metrics with {self.negatives} and {other.negatives} negatives"
            )
        if (self.sets is None) != (other.sets is None):
            raise ValueError("cannot merge a given-split evaluation with a leave-one-out one")
        sets = None if self.sets is None or other.sets is None else self.sets + other.sets
        return EvalResult(self.full + other.full, self.sampled + other.sampled, self.negatives, sets)

    def __radd__(self, other: object) -> EvalResult:
        """Lets ``sum(parts)`` work (its start value is 0)."""
        if other == 0:
            sets = None if self.sets is None else SetRankingSums(self.sets.k)
            zero = EvalResult(RankingSums(self.full.k), RankingSums(self.sampled.k), self.negatives, sets)
            return self + zero
        return NotImplemented

    def to_metrics(self) -> dict[str, dict[str, float | int]]:
        """The ``full``/``sampled`` sections of ``metrics.json`` (CONTRACT.md), K in the key names."""
        full, sampled = self.full.result(), self.sampled.result()
        k, ks = self.full.k, self.sampled.k
        given = self.sets.result() if self.sets is not None else {}
        return {
            "full": {
                **{
                    key: full[key]
                    for key in (f"hr@{k}", f"ndcg@{k}", "mrr", f"coverage@{k}", f"ild@{k}", "users")
                },
                **given,
            },
            "sampled": {
                "negatives": self.negatives,
                f"hr@{ks}": sampled[f"hr@{ks}"],
                f"ndcg@{ks}": sampled[f"ndcg@{ks}"],
            },
        }

    def to_record(self) -> dict[str, RecordValue]:
        """Flat values for a Flower ``MetricRecord`` (keys prefixed ``full.``/``sampled.``)."""
        rec: dict[str, RecordValue] = {"negatives": self.negatives}
        rec.update({f"full.{key}": v for key, v in self.full.to_record().items()})
        rec.update({f"sampled.{key}": v for key, v in self.sampled.to_record().items()})
        if self.sets is not None:
            rec.update({f"sets.{key}": v for key, v in self.sets.to_record().items()})
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> EvalResult:
        """Inverse of :meth:`to_record`; merge several with ``sum(...)``."""
        if "negatives" not in record:
            raise ValueError("metric record lacks 'negatives'")

        def part(prefix: str) -> RankingSums:
            return RankingSums.from_record(
                {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
            )

        sets = None
        if any(k.startswith("sets.") for k in record):
            sets = SetRankingSums.from_record({k[5:]: v for k, v in record.items() if k.startswith("sets.")})
        return cls(part("full."), part("sampled."), int(record["negatives"]), sets)  # type: ignore[call-overload]


def sample_negatives(
    n_items: int, history: np.ndarray, target: int, negatives: int, seed: int, user: int
) -> np.ndarray:
    """``negatives`` distinct items ∉ history ∪ {target}, uniformly, from RNG ``(seed, user)``.

    Returns (min(negatives, #candidates),) int64; all candidates when there are too few. The draw is
    ``rng.choice(pool, negatives, replace=False)`` over the ascending pool of candidates; the pool is
    never built: the r-th candidate is ``r + #{excluded e : e − (its rank among the excluded) ≤ r}``
    (O(|history| log) per user instead of O(N)). Negative indices count from the end, as numpy's do.
    """
    excl = np.concatenate([np.asarray(history, dtype=np.int64).reshape(-1), [int(target)]])
    if excl.size and (excl.min() < -n_items or excl.max() >= n_items):
        raise IndexError(f"item index out of range for {n_items} items")
    excl = np.unique(np.where(excl < 0, excl + n_items, excl))  # (E,) ascending, distinct
    n_pool = n_items - len(excl)
    if n_pool <= negatives:
        allowed = np.ones(n_items, dtype=bool)
        allowed[excl] = False
        return np.flatnonzero(allowed)
    rng = np.random.default_rng([seed, user])
    r = rng.choice(n_pool, size=negatives, replace=False)  # ranks in the pool: the same draw
    below = excl - np.arange(len(excl))  # (E,) candidates below each excluded item
    return (r + np.searchsorted(below, r, side="right")).astype(np.int64)


def evaluate(
    scorer: Scorer,
    split: UserSplit,
    catalog: Catalog,
    *,
    which: str = "test",
    k: int = 10,
    negatives: int = 99,
    seed: int = 0,
    batch_size: int = 512,
    set_k: int = SET_K,
) -> EvalResult:
    """Evaluate ``scorer`` on every user of ``split`` that has a ``which`` held-out item (or test set)."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if catalog.n_items != split.n_items:
        raise ValueError(f"catalog has {catalog.n_items} items but the split {split.n_items}")
    if k < 1 or negatives < 1 or batch_size < 1 or set_k < 1:
        raise ValueError(
            f"k, negatives, batch_size and set_k must be ≥ 1, got {k}, {negatives}, {batch_size}, {set_k}"
        )
    n_items = split.n_items
    given = which == "test" and split.has_test_sets
    held = split.test_item if which == "test" else split.val_item  # (n_users,)
    if given:
        assert split.test_sizes is not None
        users = np.flatnonzero(split.test_sizes > 0)  # (U,) every user with a test set
    else:
        users = np.flatnonzero(held >= 0)  # (U,)
    result = EvalResult(RankingSums(k), RankingSums(k), negatives, SetRankingSums(set_k) if given else None)
    shared_part = getattr(scorer, "shared_part", None)
    shared = shared_part(split) if callable(shared_part) else None
    if shared is not None:
        return _evaluate_split(
            scorer, SplitRanker(shared, n_items), split, catalog, users, held, result,
            which=which, k=k, negatives=negatives, seed=seed, set_k=set_k, given=given,
        )  # fmt: skip
    rows = max(1, min(batch_size, MAX_SCORE_CELLS // max(n_items, 1)))
    for start in range(0, len(users), rows):
        batch = users[start : start + rows]  # (B,)
        targets = held[batch].astype(np.int64)  # (B,) -1 = none
        histories = [split.eval_history(int(u), which) for u in batch]
        raw = scorer.score(split, batch, histories, which)
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().numpy()
        scores = np.array(raw, copy=True)  # (B, N) our copy: masked in place below
        assert scores.shape == (len(batch), n_items), (
            f"scorer returned shape {scores.shape}, expected ({len(batch)}, {n_items})"
        )
        if not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float32)
        mask_items(scores, histories)
        topk, _ = top_k(scores, k)  # (B, k)

        if given:
            assert split.test_sizes is not None and result.sets is not None
            tests = [split.test_set(int(u)) for u in batch]
            relevant = np.zeros(scores.shape, dtype=bool)  # (B, N)
            for b, t in enumerate(tests):
                relevant[b, t] = True
            sizes = split.test_sizes[batch].astype(np.float64)  # (B,) incl. unrankable test items
            hits = hit_matrix(scores, relevant, max(k, set_k))  # (B, max(k, set_k))
            ranks = first_relevant_rank(scores, relevant)  # (B,)
            result.full.add(
                ranks, topk, catalog.genres, n_items=n_items, ndcg=ndcg_at_k_multi(hits[:, :k], sizes)
            )
            result.sets.add(hits[:, :set_k], sizes)
            excluded = [np.concatenate([h, t]) for h, t in zip(histories, tests, strict=True)]
        else:
            ranks = ranks_from_scores(scores, targets)  # (B,)
            result.full.add(ranks, topk, catalog.genres, n_items=n_items)
            excluded = histories

        # Sampled: column 0 is the target, then its negatives; -inf pads short candidate lists.
        cand = np.full((len(batch), negatives + 1), -np.inf, dtype=scores.dtype)  # (B, 1+neg)
        brow = np.arange(len(batch))
        has = targets >= 0
        cand[has, 0] = scores[brow[has], targets[has]]  # -inf if the target was in the history
        for b, (u, excl) in enumerate(zip(batch, excluded, strict=True)):
            if not has[b]:
                continue  # no rankable target (given split whose test items are all unknown): a miss
            negs = sample_negatives(n_items, excl, int(targets[b]), negatives, seed, int(u))
            cand[b, 1 : 1 + len(negs)] = scores[b, negs]
        result.sampled.add(ranks_from_scores(cand, np.where(has, 0, -1)))
    return result


def _evaluate_split(
    scorer: Scorer,
    ranker: SplitRanker,
    split: UserSplit,
    catalog: Catalog,
    users: np.ndarray,
    held: np.ndarray,
    result: EvalResult,
    *,
    which: str,
    k: int,
    negatives: int,
    seed: int,
    set_k: int,
    given: bool,
) -> EvalResult:
    """:func:`evaluate`'s loop for a scorer with a shared part: the same sums, no (B, N) array."""
    n_items = split.n_items
    rows = max(1, MAX_SCORE_CELLS // max(ranker.m, 1024))
    for start in range(0, len(users), rows):
        batch = users[start : start + rows]  # (B,)
        targets = held[batch].astype(np.int64)  # (B,) -1 = none
        histories = [split.eval_history(int(u), which) for u in batch]
        view = ranker.batch(scorer.user_part(split, batch, histories, which), histories)  # type: ignore[attr-defined]
        topk = view.top_k(k)  # (B, k)
        if given:
            assert split.test_sizes is not None and result.sets is not None
            tests = [split.test_set(int(u)) for u in batch]
            sizes = split.test_sizes[batch].astype(np.float64)  # (B,) incl. unrankable test items
            hits, ranks = view.hits_and_first_rank(tests, max(k, set_k))
            result.full.add(
                ranks, topk, catalog.genres, n_items=n_items, ndcg=ndcg_at_k_multi(hits[:, :k], sizes)
            )
            result.sets.add(hits[:, :set_k], sizes)
            excluded = [np.concatenate([h, t]) for h, t in zip(histories, tests, strict=True)]
        else:
            ranks = view.ranks(targets)  # (B,)
            result.full.add(ranks, topk, catalog.genres, n_items=n_items)
            excluded = histories
        cand = np.full((len(batch), negatives + 1), -np.inf, dtype=ranker.dtype)  # (B, 1+neg)
        has = targets >= 0
        brow = np.arange(len(batch))
        cand[has, 0] = view.score_at(brow[has], targets[has])
        c_rows, c_cols, c_items = [], [], []
        for b, (u, excl) in enumerate(zip(batch, excluded, strict=True)):
            if not has[b]:
                continue
            negs = sample_negatives(n_items, excl, int(targets[b]), negatives, seed, int(u))
            c_rows.append(np.full(len(negs), b))
            c_cols.append(np.arange(1, 1 + len(negs)))
            c_items.append(negs)
        if c_rows:
            r_, c_ = np.concatenate(c_rows), np.concatenate(c_cols)
            cand[r_, c_] = view.score_at(r_, np.concatenate(c_items))
        result.sampled.add(ranks_from_scores(cand, np.where(has, 0, -1)))
    return result


def evaluate_sums(
    scorer: Scorer,
    split: UserSplit,
    catalog: Catalog,
    *,
    which: str = "test",
    k: int = 10,
    negatives: int = 99,
    seed: int = 0,
    batch_size: int = 512,
    set_k: int = SET_K,
) -> dict[str, RecordValue]:
    """What a client sends: :func:`evaluate` as a flat metric record (sums, never means).

    The server rebuilds each with :meth:`EvalResult.from_record`, adds them, and calls
    :meth:`EvalResult.to_metrics` once.
    """
    return evaluate(
        scorer,
        split,
        catalog,
        which=which,
        k=k,
        negatives=negatives,
        seed=seed,
        batch_size=batch_size,
        set_k=set_k,
    ).to_record()

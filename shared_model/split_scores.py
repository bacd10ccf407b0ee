"""Ranking without a (users × items) score array, for scores that are mostly shared by all users.

A model fitted from the item release scores a user's history on its M support items only; every
other item gets one fixed score, the same for everyone (the stage-1 DP popularity order, the prior).
Popularity baselines are the case M = 0. For such scorers (:class:`SharedScores` + a (B, M) array per
batch) every number :func:`fedrec.shared_model.evaluate.evaluate` needs comes out without writing the
(B, N) matrix: the top K merges the user's top K among the M items with the first K of one global list
of the other items sorted by score (skipping the user's masked items), ranks count the support row and
binary-search the sorted shared scores (minus the user's masked items), and single scores are looked
up. :class:`SplitBatch` reproduces :func:`fedrec.shared_model.ranking.top_k`,
:func:`fedrec.shared_model.metrics.ranks_from_scores`, :func:`~fedrec.shared_model.metrics.hit_matrix`
and :func:`~fedrec.shared_model.metrics.first_relevant_rank` on the dense masked matrix exactly (same
tie rules; tests/test_split_scores.py compares them on random cases with ties).

At 30 000 users × 40 000 items with M = 2 000 the dense path writes and scans 1.2e9 scores per
evaluation; this one touches 6e7.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedrec.shared_model.ranking import top_k


@dataclass(frozen=True)
class SharedScores:
    """The history-independent part of a scorer: ``items`` (M,) int64, ascending and distinct, are
    scored per user; every other item j scores ``outside[j]`` for every user (``outside``: (N,) float;
    its entries at ``items`` are unused)."""

    items: np.ndarray
    outside: np.ndarray


def _row_pairs(lists: Sequence[np.ndarray], n_items: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) int64 pairs of per-row item lists, each item checked to lie in 0..n_items-1."""
    lengths = np.fromiter((len(h) for h in lists), dtype=np.int64, count=len(lists))
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    items = (
        np.concatenate([np.asarray(h, dtype=np.int64).reshape(-1) for h in lists])
        if len(lists)
        else np.zeros(0, np.int64)
    )
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(
            f"{what} holds item index outside 0..{n_items - 1}: {int(items.min())}..{int(items.max())}"
        )
    return rows, items


def _ordered_top(
    scores: np.ndarray, items: np.ndarray, rel: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``k`` first entries by (score desc, non-relevant first, item asc): (B, k) scores,
    relevance and items (``k`` ≤ the row width). ``scores``, ``items``, ``rel``: (B, C); no NaN."""
    n_rows, width = scores.shape
    rel = np.zeros(scores.shape, dtype=bool) if rel is None else rel
    out_s = np.empty((n_rows, k), dtype=scores.dtype)
    out_r = np.zeros((n_rows, k), dtype=bool)
    out_i = np.empty((n_rows, k), dtype=np.int64)
    if n_rows == 0 or k == 0:
        return out_s, out_r, out_i
    if width > 4 * k:  # shrink each row to the entries ≥ its k-th best score (ties all kept)
        kth = np.partition(scores, width - k, axis=1)[:, width - k]  # (B,)
        for b in range(n_rows):
            cand = np.flatnonzero(scores[b] >= kth[b])
            order = cand[np.lexsort((items[b, cand], rel[b, cand], -scores[b, cand]))[:k]]
            out_s[b], out_r[b], out_i[b] = scores[b, order], rel[b, order], items[b, order]
        return out_s, out_r, out_i
    order = np.lexsort((items, rel, -scores), axis=1)[:, :k]  # (B, k)
    return (
        np.take_along_axis(scores, order, 1),
        np.take_along_axis(rel, order, 1),
        np.take_along_axis(items, order, 1),
    )


class SplitRanker:
    """What a whole evaluation shares: the support, and the other items sorted by their shared score."""

    def __init__(self, shared: SharedScores, n_items: int) -> None:
        items = np.asarray(shared.items, dtype=np.int64)
        outside = np.asarray(shared.outside)
        if not np.issubdtype(outside.dtype, np.floating):
            outside = outside.astype(np.float32)
        if outside.shape != (n_items,):
            raise ValueError(f"shared scores must be ({n_items},), got {outside.shape}")
        if items.ndim != 1 or (items.size and (items[0] < 0 or items[-1] >= n_items)):
            raise ValueError("support items must be a 1-D array of item indices")
        if items.size > 1 and np.any(np.diff(items) <= 0):
            raise ValueError("support items must be ascending and distinct")
        self.n_items, self.items, self.m = n_items, items, len(items)
        self.dtype = outside.dtype
        self.outside = outside  # (N,)
        self.is_in = np.zeros(n_items, dtype=bool)  # (N,)
        self.is_in[items] = True
        self.col_of = np.full(n_items, self.m, dtype=np.int64)  # (N,) support column, M elsewhere
        self.col_of[items] = np.arange(self.m)
        rest = np.flatnonzero(~self.is_in)  # (N − M,)
        rest_scores = outside[rest]
        if np.isnan(rest_scores).any():
            raise ValueError("scores contain NaN; cannot rank")
        order = np.lexsort((rest, -rest_scores))  # score desc, item asc: the global list
        self.sorted_items = rest[order]  # (N − M,)
        self.sorted_scores = rest_scores[order]  # (N − M,) descending
        self.ascending = self.sorted_scores[::-1].copy()  # for binary search
        self.pos_of = np.full(n_items, -1, dtype=np.int64)  # (N,) position in the global list
        self.pos_of[self.sorted_items] = np.arange(len(rest))

    @property
    def n_rest(self) -> int:
        return len(self.sorted_items)

    def count_ge(self, v: np.ndarray) -> np.ndarray:
        """#{items outside the support with shared score ≥ v} per entry of v."""
        return self.n_rest - np.searchsorted(self.ascending, v, side="left")

    def count_gt(self, v: np.ndarray) -> np.ndarray:
        """#{items outside the support with shared score > v} per entry of v."""
        return self.n_rest - np.searchsorted(self.ascending, v, side="right")

    def batch(self, inside: np.ndarray, histories: Sequence[np.ndarray]) -> SplitBatch:
        return SplitBatch(self, inside, histories)


class SplitBatch:
    """One batch: the (B, M) support scores with the histories masked to -inf, and the masked items
    outside the support, kept as (row, item) pairs (the dense matrix's other -inf entries)."""

    def __init__(self, ranker: SplitRanker, inside: np.ndarray, histories: Sequence[np.ndarray]) -> None:
        r = ranker
        self.r = r
        self.inside = np.array(inside, dtype=r.dtype, copy=True)  # (B, M), masked in place
        n_rows = len(histories)
        assert self.inside.shape == (n_rows, r.m), (
            f"support scores {self.inside.shape}, expected ({n_rows}, {r.m})"
        )
        self.n_rows = n_rows
        rows, items = _row_pairs(histories, r.n_items, "histories")
        inn = r.is_in[items]
        self.inside[rows[inn], r.col_of[items[inn]]] = -np.inf
        if np.isnan(self.inside).any():
            raise ValueError("scores contain NaN; cannot rank")
        keys = np.unique(rows[~inn] * r.n_items + items[~inn])  # distinct masked (row, item) outside
        self.masked_keys = keys
        self.m_rows, self.m_items = keys // r.n_items, keys % r.n_items
        self.m_scores = r.outside[self.m_items]  # their shared scores (counted in the sorted list)
        self.m_pos = r.pos_of[self.m_items]

    # ------------------------------------------------------------------ single scores
    def score_at(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The masked dense matrix's entries at (rows[i], items[i])."""
        r = self.r
        inn = r.is_in[items]
        vals = r.outside[items].copy()
        vals[inn] = self.inside[rows[inn], r.col_of[items[inn]]]
        out = ~inn & np.isin(rows * r.n_items + items, self.masked_keys)
        vals[out] = -np.inf
        return vals

    def _masked_count(self, keep: np.ndarray) -> np.ndarray:
        """Per row, how many of its masked outside items satisfy ``keep`` (one bool per pair)."""
        return np.bincount(self.m_rows[keep], minlength=self.n_rows)

    # ------------------------------------------------------------------ top K
    def _rest_window(self, k: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
        """(B, W) unmasked prefix of the global list: its positions 0..W-1 and a blocked mask; W covers
        each row's first ``k`` unmasked items (and, with ``ties``, every item tied with the k-th)."""
        r = self.r
        per_row = np.bincount(self.m_rows, minlength=self.n_rows)
        width = min(r.n_rest, k + (int(per_row.max()) if self.n_rows else 0))
        if ties and width:
            width = int(r.count_ge(r.sorted_scores[width - 1 : width])[0])
        blocked = np.zeros((self.n_rows, width), dtype=bool)
        near = self.m_pos < width
        blocked[self.m_rows[near], self.m_pos[near]] = True
        return np.arange(width), blocked

    def top_k(self, k: int) -> np.ndarray:
        """:func:`fedrec.shared_model.ranking.top_k`'s indices (B, min(k, N)) of the masked dense matrix."""
        r = self.r
        k = min(k, r.n_items)
        parts_s, parts_i = [], []
        if r.m:
            cols, s_in = top_k(self.inside, min(k, r.m))  # ties → lower column = lower item
            parts_s.append(s_in)
            parts_i.append(np.where(cols >= 0, r.items[np.maximum(cols, 0)], -1))
        if r.n_rest:
            ko = min(k, r.n_rest)
            _, blocked = self._rest_window(ko, ties=False)
            pick = np.argsort(blocked, axis=1, kind="stable")[:, :ko]  # first ko unblocked positions
            s_out = r.sorted_scores[pick].astype(r.dtype)
            s_out[np.take_along_axis(blocked, pick, 1)] = -np.inf
            parts_s.append(s_out)
            parts_i.append(r.sorted_items[pick])
        s = np.concatenate(parts_s, axis=1)
        i = np.concatenate(parts_i, axis=1)
        best_s, _, best_i = _ordered_top(s, i, None, k)
        best_i[np.isneginf(best_s)] = -1
        return best_i

    # ------------------------------------------------------------------ ranks
    def ranks(self, targets: np.ndarray) -> np.ndarray:
        """:func:`fedrec.shared_model.metrics.ranks_from_scores` of the masked dense matrix."""
        targets = np.asarray(targets, dtype=np.int64)
        if np.any(targets >= self.r.n_items):
            raise ValueError(
                f"target item index out of range: max {int(targets.max())} ≥ n_items {self.r.n_items}"
            )
        valid = targets >= 0
        rows = np.arange(self.n_rows)
        st = self.score_at(rows, np.where(valid, targets, 0))  # (B,)
        above = (self.inside >= st[:, None]).sum(axis=1) + self.r.count_ge(st)
        above = above - self._masked_count(self.m_scores >= st[self.m_rows])
        ranks = above.astype(np.float64) - 1.0
        ranks[~valid | np.isnan(st) | np.isneginf(st)] = np.inf
        return ranks

    # ------------------------------------------------------------------ multi-item test sets
    def hits_and_first_rank(self, tests: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~fedrec.shared_model.metrics.hit_matrix` (B, min(k, N)) and
        :func:`~fedrec.shared_model.metrics.first_relevant_rank` (B,) of the masked dense matrix with
        ``relevant[b]`` = the items of ``tests[b]``."""
        r = self.r
        k = min(k, r.n_items)
        t_rows, t_items = _row_pairs(tests, r.n_items, "test sets")
        keys = np.unique(t_rows * r.n_items + t_items)
        t_rows, t_items = keys // r.n_items, keys % r.n_items
        inn = r.is_in[t_items]
        rel_in = np.zeros(self.inside.shape, dtype=bool)  # (B, M)
        rel_in[t_rows[inn], r.col_of[t_items[inn]]] = True
        rel_keys = keys[~inn]  # relevant (row, item) outside the support
        # hit matrix: the k best of each part under (score desc, non-relevant first, item asc), merged
        parts_s, parts_r, parts_i = [], [], []
        if r.m:
            item_cols = np.broadcast_to(r.items, self.inside.shape)
            s, rl, it = _ordered_top(self.inside, item_cols, rel_in, min(k, r.m))
            parts_s.append(s)
            parts_r.append(rl)
            parts_i.append(it)
        if r.n_rest:
            pos, blocked = self._rest_window(min(k, r.n_rest), ties=True)
            s_out = np.broadcast_to(r.sorted_scores[pos].astype(r.dtype), blocked.shape).copy()
            s_out[blocked] = -np.inf
            it_out = np.broadcast_to(r.sorted_items[pos], blocked.shape)
            rl_out = np.isin(np.arange(self.n_rows)[:, None] * r.n_items + it_out, rel_keys)
            s, rl, it = _ordered_top(s_out, np.ascontiguousarray(it_out), rl_out, min(k, blocked.shape[1]))
            parts_s.append(s)
            parts_r.append(rl)
            parts_i.append(it)
        s, rl, _ = _ordered_top(
            np.concatenate(parts_s, 1), np.concatenate(parts_i, 1), np.concatenate(parts_r, 1), k
        )
        hits = (rl & np.isfinite(s)).astype(np.float64)  # (B, k)
        # first relevant rank: #{s > best} + #{non-relevant, s = best}
        best = np.full(self.n_rows, -np.inf, dtype=r.dtype)
        np.maximum.at(best, t_rows, self.score_at(t_rows, t_items))
        above = (self.inside > best[:, None]).sum(axis=1) + ((self.inside == best[:, None]) & ~rel_in).sum(
            axis=1
        )
        above = above + r.count_gt(best) - self._masked_count(self.m_scores > best[self.m_rows])
        tied = r.count_ge(best) - r.count_gt(best) - self._masked_count(self.m_scores == best[self.m_rows])
        rel_rows, rel_items = rel_keys // r.n_items, rel_keys % r.n_items
        rel_free = ~np.isin(rel_keys, self.masked_keys) & (r.outside[rel_items] == best[rel_rows])
        tied = tied - np.bincount(rel_rows[rel_free], minlength=self.n_rows)
        ranks = (above + tied).astype(np.float64)
        ranks[~np.isfinite(best)] = np.inf
        return hits, ranks


__all__ = ["SharedScores", "SplitBatch", "SplitRanker"]

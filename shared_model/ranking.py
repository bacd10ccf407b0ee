"""The one ranking code path: mask what a user must not get, then take the top K.

Evaluation, the ClientApp and serving all rank through these two functions, so "seen items are
never recommended" and "ties go to the lower item index" hold everywhere alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

ScoresT = TypeVar("ScoresT", np.ndarray, torch.Tensor)


def _row_col(
    rows_items: Sequence[np.ndarray], n_rows: int, n_items: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-row item lists into (row, col) index arrays, checking every index."""
    if len(rows_items) != n_rows:
        raise ValueError(f"{what} must have one entry per score row ({n_rows}), got {len(rows_items)}")
    if n_rows == 1:  # one served request: no per-row bookkeeping
        cols = np.asarray(rows_items[0], dtype=np.int64).reshape(-1)
        rows = np.zeros(cols.shape[0], dtype=np.int64)
    else:
        rows, cols = _flatten(rows_items, n_rows)
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(
            f"{what} holds item index outside 0..{n_items - 1}: {int(cols.min())}..{int(cols.max())}"
        )
    return rows, cols


def _flatten(rows_items: Sequence[np.ndarray], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every item of every row, unchecked."""
    lengths = np.fromiter((len(h) for h in rows_items), dtype=np.int64, count=n_rows)  # (B,)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)  # (Σ n_b,)
    cols = (
        np.concatenate([np.asarray(h, dtype=np.int64).reshape(-1) for h in rows_items])
        if n_rows
        else np.zeros(0, dtype=np.int64)
    )  # (Σ n_b,)
    return rows, cols


def mask_items(
    scores: ScoresT,
    histories: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray] | np.ndarray | None = None,
) -> ScoresT:
    """Set the scores of each row's history items (and excluded items) to -inf, in place.

    ``scores``: (B, N) float array or tensor; ``histories``: B int arrays of item indices;
    ``exclude``: a 1-D int array masked in every row, or B int arrays (one per row), or None.
    Returns ``scores`` itself, for chaining.
    """
    assert scores.ndim == 2, f"scores must be (B, N), got shape {tuple(scores.shape)}"
    n_rows, n_items = int(scores.shape[0]), int(scores.shape[1])
    rows, cols = _row_col(histories, n_rows, n_items, "histories")
    if exclude is not None:
        per_row: Sequence[np.ndarray] = (
            [exclude] * n_rows if isinstance(exclude, np.ndarray) and exclude.ndim == 1 else list(exclude)
        )
        ex_rows, ex_cols = _row_col(per_row, n_rows, n_items, "exclude")
        rows, cols = np.concatenate([rows, ex_rows]), np.concatenate([cols, ex_cols])
    if isinstance(scores, torch.Tensor):
        if not scores.is_floating_point():
            raise TypeError(f"scores must be floating point to hold -inf, got {scores.dtype}")
        scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)] = float(
            "-inf"
        )
    else:
        if not np.issubdtype(scores.dtype, np.floating):
            raise TypeError(f"scores must be floating point to hold -inf, got {scores.dtype}")
        scores[rows, cols] = -np.inf
    return scores


def top_k(scores: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items of each row, best first; ties go to the lower item index.

    ``k`` is clipped to N. Items scored -inf (masked) are never returned: where a row has fewer
    than ``k`` finite-or-+inf items, the tail is padded with index -1 and score -inf.
    NaN scores are a bug in the scorer and raise ``ValueError``.

    ``scores``: (B, N). Returns ``indices`` (B, min(k, N)) int64 and their ``scores`` (same dtype
    as the input, as numpy).
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    assert s.ndim == 2, f"scores must be (B, N), got shape {s.shape}"
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; cannot rank")
    n = s.shape[1]
    k = min(k, n)
    rows = np.arange(s.shape[0])[:, None]  # (B, 1) plain indexing: cheaper than take_along_axis
    if k == n or n <= 256:  # small (a re-rank of C = 200): a stable sort of all is cheaper than the rest
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (B, k)
    else:
        order = _top_k_unsorted(s, k, rows)  # (B, k), ascending item index
        # Stable sort of the k chosen (ascending index): descending score, lower index among equals.
        order = order[rows, np.argsort(-s[rows, order], 1, kind="stable")]
    best = s[rows, order]  # (B, k)
    order[best == -np.inf] = -1  # masked
    return order.astype(np.int64, copy=False), best


def _top_k_unsorted(s: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """The ``k`` best items of each row of ``s`` (B, N), k < N, as (B, k) indices in ascending order.

    ``argpartition`` picks k items per row in O(N) around the k-th best score t. Where more items tie
    at t than the row has room for, partition picks arbitrary ones; those rows are redone by the ties
    rule of :func:`top_k` (all items above t, then the lowest-index items equal to t), so the result is
    exactly the first k of a full stable sort, without sorting N. ``rows``: ``arange(B)[:, None]``.
    """
    n = s.shape[1]
    part = np.argpartition(s, n - k, axis=1)[:, n - k :]  # (B, k), unordered
    kth = s[rows, part].min(1, keepdims=True)  # (B, 1) the k-th best score
    # More than k items at or above the k-th best score: ties across the boundary (one pass over N).
    for r in np.flatnonzero((s >= kth).sum(1) > k):  # ambiguous rows only
        above = np.flatnonzero(s[r] > kth[r, 0])
        ties = np.flatnonzero(s[r] == kth[r, 0])[: k - len(above)]
        part[r] = np.concatenate([above, ties])
    return np.sort(part, axis=1)

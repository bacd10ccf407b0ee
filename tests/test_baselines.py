"""Popularity and EASE: hand examples, a direct numpy reference, and MovieLens-100K figures if present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrec.shared_model.baselines import EASE, OUT_OF_SUPPORT_SCORE, Popularity
from fedrec.shared_model.data import USER_FEATURES, Catalog, UserSplit
from fedrec.shared_model.evaluate import evaluate

ML100K = Path("/work/shared/data/ml-100k")


def make_split(rows: list[list[int]], val: list[int], test: list[int], n_items: int) -> UserSplit:
    n = len(rows)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    nnz = int(indptr[-1])
    return UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=np.array([i for r in rows for i in r], dtype=np.int32),
        train_ctx=np.zeros((nnz, 2), dtype=np.int8),
        val_item=np.array(val, dtype=np.int32),
        test_item=np.array(test, dtype=np.int32),
        val_ctx=np.zeros((n, 2), dtype=np.int8),
        test_ctx=np.zeros((n, 2), dtype=np.int8),
        user_features=np.zeros((n, len(USER_FEATURES)), dtype=np.int32),
    )


def make_catalog(genres: np.ndarray) -> Catalog:
    n = len(genres)
    return Catalog(
        item_ids=tuple(str(i) for i in range(n)),
        titles=("",) * n,
        genre_names=tuple(f"g{j}" for j in range(genres.shape[1])),
        genres=genres.astype(np.float32),
        years=np.zeros(n, dtype=np.int32),
    )


# 4 users × 4 items; user 1 lists item 2 twice (counted twice by popularity, once by EASE).
SPLIT = make_split([[0, 1], [1, 2, 2], [0, 1, 3], [3]], val=[2, 0, -1, 1], test=[3, 3, -1, 0], n_items=4)


def ease_reference(x: np.ndarray, lam: float) -> np.ndarray:
    """Steck (2019), straight from the paper: B = I − P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹."""
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    return np.eye(x.shape[1]) - p / np.diag(p)


def test_popularity_counts_and_ranking() -> None:
    model = Popularity().fit(SPLIT)
    assert model.counts is not None
    np.testing.assert_array_equal(model.counts, [2, 3, 2, 2])
    scores = model.score(SPLIT, np.array([0, 3]), [SPLIT.history(0), SPLIT.history(3)], "test")
    np.testing.assert_array_equal(scores, [[2, 3, 2, 2], [2, 3, 2, 2]])
    # Test, k=1: user 0 (seen {0,1,2}) → only item 3 left → hit; user 1 (seen {1,2,0}) → hit;
    # user 3 (seen {3,1}): items 0 and 2 tie at 2 → pessimistic rank 1 → miss at k=1.
    res = evaluate(model, SPLIT, make_catalog(np.eye(4)), k=1).full.result()
    assert (res["users"], res["hr@1"]) == (3, pytest.approx(2 / 3))


def test_ease_matches_direct_formula() -> None:
    x = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 1]], dtype=np.float64)
    model = EASE(lam=2.0).fit(SPLIT)
    assert model.weights is not None
    b_ref = ease_reference(x, 2.0)
    np.testing.assert_allclose(np.diag(b_ref), 0.0, atol=1e-12)
    np.testing.assert_allclose(model.weights, b_ref, rtol=1e-5, atol=1e-6)
    histories = [SPLIT.eval_history(u, "test") for u in (0, 1)]
    scores = model.score(SPLIT, np.array([0, 1]), histories, "test")
    x_hist = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=np.float64)
    np.testing.assert_allclose(scores, x_hist @ b_ref, rtol=1e-5, atol=1e-6)


def test_ease_restricted_support_scores_others_low_but_finite() -> None:
    model = EASE(lam=2.0, max_items=2).fit(SPLIT)  # support: item 1 (3 users), then 0 (ties → lower)
    assert model.items is not None
    np.testing.assert_array_equal(model.items, [0, 1])
    x = np.array([[1, 1], [0, 1], [1, 1], [0, 0]], dtype=np.float64)
    scores = model.score(SPLIT, np.array([2]), [SPLIT.history(2)], "test")
    np.testing.assert_allclose(scores[0, :2], np.array([1, 1]) @ ease_reference(x, 2.0), rtol=1e-5)
    np.testing.assert_array_equal(scores[0, 2:], [OUT_OF_SUPPORT_SCORE] * 2)
    assert np.isfinite(scores).all()


def test_unfitted_and_bad_parameters() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        EASE().score(SPLIT, np.array([0]), [SPLIT.history(0)], "test")
    with pytest.raises(RuntimeError, match="not fitted"):
        Popularity().score(SPLIT, np.array([0]), [SPLIT.history(0)], "test")
    with pytest.raises(ValueError, match="lam must be > 0"):
        EASE(lam=0.0)


# ---------------------------------------------------------------- MovieLens 100K (if present)


def load_ml100k(folder: Path) -> tuple[UserSplit, Catalog]:
    """Minimal leave-one-out split: per user, order by (timestamp, item); last → test, one before → val."""
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)  # (100000, 4) user, item, rating, ts
    users, item_ids, ts = raw[:, 0], raw[:, 1], raw[:, 3]
    uniq_items, items = np.unique(item_ids, return_inverse=True)
    uniq_users, rows = np.unique(users, return_inverse=True)
    order = np.lexsort((items, ts, rows))  # by user, then time, then item
    rows, items = rows[order], items[order]
    n_users, n_items = len(uniq_users), len(uniq_items)
    per_user = np.bincount(rows, minlength=n_users)  # (U,)
    ends = np.cumsum(per_user)  # (U,)
    val = np.where(per_user >= 3, items[ends - 2], -1).astype(np.int32)
    test = np.where(per_user >= 3, items[ends - 1], -1).astype(np.int32)
    held = np.zeros(len(items), dtype=bool)
    held[(ends - 1)[per_user >= 3]] = True
    held[(ends - 2)[per_user >= 3]] = True
    train_counts = np.bincount(rows[~held], minlength=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(train_counts, out=indptr[1:])
    split = UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=items[~held].astype(np.int32),
        train_ctx=np.zeros((int(indptr[-1]), 2), dtype=np.int8),
        val_item=val,
        test_item=test,
        val_ctx=np.zeros((n_users, 2), dtype=np.int8),
        test_ctx=np.zeros((n_users, 2), dtype=np.int8),
        user_features=np.zeros((n_users, len(USER_FEATURES)), dtype=np.int32),
    )
    genre_of: dict[int, list[int]] = {}
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        genre_of[int(fields[0])] = [int(g) for g in fields[5:24]]
    genres = np.array([genre_of[int(i)] for i in uniq_items], dtype=np.float32)  # (N, 19)
    return split, make_catalog(genres)


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="MovieLens 100K not available here")
def test_ml100k_reference_figures() -> None:
    split, catalog = load_ml100k(ML100K)
    assert (split.n_users, split.n_items, split.n_train) == (943, 1682, 100_000 - 2 * 943)
    pop = evaluate(Popularity().fit(split), split, catalog).to_metrics()
    ease = evaluate(EASE().fit(split), split, catalog).to_metrics()
    assert pop["full"]["users"] == 943
    assert pop["full"]["hr@10"] == pytest.approx(0.050, abs=0.015)
    assert ease["full"]["hr@10"] == pytest.approx(0.088, abs=0.02)
    assert ease["sampled"]["hr@10"] > pop["sampled"]["hr@10"]

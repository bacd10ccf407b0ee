"""Ranking metrics (hand-computed 4×3 example, ties, unreachable targets), sums, mask and top-K."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrec.shared_model.metrics import (
    RankingSums,
    hits_at_k,
    intra_list_diversity,
    ndcg_at_k,
    ranks_from_scores,
    reciprocal_rank,
)
from fedrec.shared_model.ranking import mask_items, top_k

INF = math.inf

# 4 users × 3 items. Targets: user 0 → item 0 (best, rank 0); user 1 → item 2 (two better, rank 2);
# user 2 → item 1 tied with item 0 (pessimistic rank 1); user 3 → item 1 masked (-inf, unreachable).
SCORES_4x3 = np.array(
    [
        [0.9, 0.5, 0.1],
        [0.3, 0.8, 0.2],
        [0.5, 0.5, 0.1],
        [0.4, -np.inf, 0.6],
    ],
    dtype=np.float32,
)
TARGETS_4 = np.array([0, 2, 1, 1])
RANKS_4 = np.array([0.0, 2.0, 1.0, INF])


def test_ranks_on_hand_example() -> None:
    np.testing.assert_array_equal(ranks_from_scores(SCORES_4x3, TARGETS_4), RANKS_4)


def test_ties_count_against_the_target() -> None:
    constant = np.zeros((2, 5), dtype=np.float32)
    # Every other item ties with the target, so the target is last whatever its index.
    np.testing.assert_array_equal(ranks_from_scores(constant, np.array([0, 4])), [4.0, 4.0])


def test_missing_or_nan_target_is_unreachable() -> None:
    scores = np.array([[1.0, 2.0], [np.nan, 0.0]])
    np.testing.assert_array_equal(ranks_from_scores(scores, np.array([-1, 0])), [INF, INF])


def test_ranks_reject_out_of_range_target() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ranks_from_scores(SCORES_4x3, np.array([0, 0, 0, 3]))


def test_metrics_on_hand_example() -> None:
    np.testing.assert_array_equal(hits_at_k(RANKS_4, 2), [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(hits_at_k(RANKS_4, 3), [1.0, 1.0, 1.0, 0.0])
    # ndcg: 1/log2(0+2) = 1, 1/log2(1+2) = 0.6309…, 1/log2(2+2) = 0.5
    np.testing.assert_allclose(ndcg_at_k(RANKS_4, 2), [1.0, 0.0, 1 / math.log2(3), 0.0])
    np.testing.assert_allclose(ndcg_at_k(RANKS_4, 3), [1.0, 0.5, 1 / math.log2(3), 0.0])
    np.testing.assert_allclose(reciprocal_rank(RANKS_4), [1.0, 1 / 3, 0.5, 0.0])


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="k must be ≥ 1"):
        hits_at_k(RANKS_4, 0)


def test_intra_list_diversity() -> None:
    vecs = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    # list 0: items 0,1 orthogonal → 1 − 0 = 1
    # list 1: items 0,2: cos = 1/√2 → 1 − 0.7071
    # list 2: items 0,1,2: pairs (0,1)=0, (0,2)=(1,2)=1/√2 → 1 − (√2/3)
    # list 3: item 0 twice and the zero-vector item 3: sims 1, 0, 0 → 1 − 1/3
    # list 4: one real item (padding -1) → 0
    topk = np.array([[0, 1, -1], [0, 2, -1], [0, 1, 2], [0, 0, 3], [2, -1, -1]])
    expected = [1.0, 1 - 1 / math.sqrt(2), 1 - math.sqrt(2) / 3, 1 - 1 / 3, 0.0]
    np.testing.assert_allclose(intra_list_diversity(topk, vecs), expected)
    assert intra_list_diversity(np.array([[1]]), vecs)[0] == 0.0


def test_ranking_sums_on_hand_example() -> None:
    sums = RankingSums(k=2)
    sums.add(RANKS_4)
    res = sums.result()
    assert res["users"] == 4
    assert res["hr@2"] == pytest.approx(0.5)
    assert res["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert res["mrr"] == pytest.approx((1 + 1 / 3 + 0.5) / 4)


def test_merged_sums_equal_one_shot_sums() -> None:
    vecs = np.eye(3)
    topk = np.array([[0, 1], [1, 2], [0, 1], [2, -1]])
    one = RankingSums(k=2)
    one.add(RANKS_4, topk, vecs)
    a, b = RankingSums(k=2), RankingSums(k=2)
    a.add(RANKS_4[:1], topk[:1], vecs)
    b.add(RANKS_4[1:], topk[1:], vecs)
    for merged in (
        a + b,
        sum([a, b]),
        RankingSums.from_record(a.to_record()) + RankingSums.from_record(b.to_record()),
    ):
        assert isinstance(merged, RankingSums)
        assert merged.result() == pytest.approx(one.result())
    # Coverage: all 3 items recommended; ILD: 3 orthogonal pairs of 1.0 and a single-item list (0).
    assert one.result()["coverage@2"] == 1.0
    assert one.result()["ild@2"] == pytest.approx(3 / 4)
    assert a.result()["coverage@2"] == pytest.approx(2 / 3)


def test_zero_users_give_zero_metrics() -> None:
    res = (RankingSums(k=10) + RankingSums(k=10)).result()
    assert res == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0, "ild@10": 0.0, "coverage@10": 0.0, "users": 0}


def test_merge_rejects_different_k() -> None:
    with pytest.raises(ValueError, match="different cut-offs"):
        RankingSums(k=10) + RankingSums(k=5)


def test_record_round_trip_and_missing_keys() -> None:
    sums = RankingSums(k=3)
    sums.add(RANKS_4, np.array([[0, 1, 2]] * 4), n_items=5)
    rec = sums.to_record()
    assert rec["recommended"] == [1, 1, 1, 0, 0]
    assert all(isinstance(v, int | float | list) for v in rec.values())
    back = RankingSums.from_record(rec)
    assert back.result() == sums.result()
    with pytest.raises(ValueError, match="lacks"):
        RankingSums.from_record({"k": 3})


def test_coverage_needs_item_count() -> None:
    with pytest.raises(ValueError, match="n_items"):
        RankingSums(k=2).add(RANKS_4, np.zeros((4, 2), dtype=np.int64))


# ---------------------------------------------------------------- mask_items / top_k


def test_mask_items_numpy_and_torch() -> None:
    histories = [np.array([0, 2]), np.array([], dtype=np.int32), np.array([1])]
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = mask_items(base.copy(), histories, exclude=np.array([3]))
    expected = base.copy()
    expected[[0, 0, 1, 2, 0, 2], [0, 2, 3, 1, 3, 3]] = -np.inf
    np.testing.assert_array_equal(out, expected)
    t = torch.from_numpy(base.copy())
    assert mask_items(t, histories, exclude=np.array([3])) is t  # in place
    np.testing.assert_array_equal(t.numpy(), expected)


def test_mask_items_per_row_exclude_and_bad_input() -> None:
    s = np.zeros((2, 3), dtype=np.float32)
    mask_items(s, [np.array([0]), np.array([1])], exclude=[np.array([2]), np.array([], dtype=np.int64)])
    np.testing.assert_array_equal(np.isneginf(s), [[True, False, True], [False, True, False]])
    with pytest.raises(ValueError, match="one entry per score row"):
        mask_items(s, [np.array([0])])
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        mask_items(s, [np.array([3]), np.array([-1])])
    with pytest.raises(TypeError, match="floating point"):
        mask_items(np.zeros((1, 3), dtype=np.int64), [np.array([0])])


def test_top_k_sorted_with_lower_index_tie_break() -> None:
    scores = np.array([[0.25, 0.5, 0.5, 0.75, 0.5]], dtype=np.float32)
    idx, val = top_k(scores, 3)
    np.testing.assert_array_equal(idx, [[3, 1, 2]])
    np.testing.assert_array_equal(val, [[0.75, 0.5, 0.5]])


def test_top_k_never_returns_masked_items_and_clips_k() -> None:
    scores = np.array([[-np.inf, 2.0, -np.inf], [1.0, 1.0, 1.0]])
    idx, val = top_k(scores, 5)  # k clipped to N = 3
    np.testing.assert_array_equal(idx, [[1, -1, -1], [0, 1, 2]])
    np.testing.assert_array_equal(val, [[2.0, -np.inf, -np.inf], [1.0, 1.0, 1.0]])
    idx_t, _ = top_k(torch.tensor(scores), 1)
    np.testing.assert_array_equal(idx_t, [[1], [0]])


def test_top_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be"):
        top_k(np.zeros((1, 2)), 0)
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([[np.nan, 1.0]]), 1)

"""Recall@K, NDCG@K and HitRate@K over multi-item test sets (given splits): a hand-computed 4×5 example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.shared_model.metrics import (
    SetRankingSums,
    first_relevant_rank,
    hit_at_k,
    hit_matrix,
    ndcg_at_k,
    ndcg_at_k_multi,
    ranks_from_scores,
    recall_at_k,
)

NEG = -np.inf
# 4 users × 5 items, K = 3.
# user 0: relevant {0, 2}; top-3 = 0, 1, 2 → hits [1, 0, 1].
# user 1: constant scores, relevant {4}; ties put non-relevant items first → top-3 = 0, 1, 2, no hit.
# user 2: relevant {0, 1} (1 is masked) + one test-only item that cannot be ranked (n = 3);
#         top-3 = 4, 2, 0 → hits [0, 0, 1].
# user 3: relevant {2, 3, 4}, all masked; only 2 finite items, so -inf items fill the list: no hit.
SCORES = np.array(
    [
        [0.9, 0.8, 0.7, 0.1, 0.2],
        [0.5, 0.5, 0.5, 0.5, 0.5],
        [0.3, NEG, 0.6, 0.2, 0.9],
        [0.4, 0.2, NEG, NEG, NEG],
    ]
)
RELEVANT = np.zeros((4, 5), dtype=bool)
RELEVANT[0, [0, 2]] = True
RELEVANT[1, 4] = True
RELEVANT[2, [0, 1]] = True
RELEVANT[3, [2, 3, 4]] = True
N_RELEVANT = np.array([2, 1, 3, 3])
HITS = np.array([[1, 0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float64)
L2, L3, L4 = 1.0 / math.log2(2), 1.0 / math.log2(3), 1.0 / math.log2(4)


def test_hit_matrix_on_hand_example() -> None:
    np.testing.assert_array_equal(hit_matrix(SCORES, RELEVANT, 3), HITS)


def test_first_relevant_rank_on_hand_example() -> None:
    # user 1: 4 non-relevant items tie with the relevant one and count before it.
    np.testing.assert_array_equal(first_relevant_rank(SCORES, RELEVANT), [0.0, 4.0, 2.0, math.inf])


def test_recall_ndcg_hit_on_hand_example() -> None:
    np.testing.assert_allclose(recall_at_k(HITS, N_RELEVANT), [1.0, 0.0, 1 / 3, 0.0])
    ndcg0 = (L2 + L4) / (L2 + L3)  # two relevant items, both in the top 3: ideal puts them at 0, 1
    ndcg2 = L4 / (L2 + L3 + L4)  # one hit at position 2; ideal over min(3, 3) = 3 positions
    np.testing.assert_allclose(ndcg_at_k_multi(HITS, N_RELEVANT), [ndcg0, 0.0, ndcg2, 0.0])
    np.testing.assert_array_equal(hit_at_k(HITS), [1.0, 0.0, 1.0, 0.0])


def test_sums_merge_and_divide_once() -> None:
    a, b = SetRankingSums(3), SetRankingSums(3)
    a.add(HITS[:1], N_RELEVANT[:1])
    b.add(HITS[1:], N_RELEVANT[1:])
    merged = SetRankingSums.from_record(a.to_record()) + SetRankingSums.from_record(b.to_record())
    got = merged.result()
    assert merged.users == 4
    assert got["recall@3"] == pytest.approx((1.0 + 1 / 3) / 4)
    assert got["ndcg@3"] == pytest.approx(((L2 + L4) / (L2 + L3) + L4 / (L2 + L3 + L4)) / 4)
    assert got["hit@3"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different cut-offs"):
        _ = a + SetRankingSums(20)


def test_one_relevant_item_gives_the_leave_one_out_values() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 12)).astype(np.float64)  # many ties
    scores[rng.random(scores.shape) < 0.2] = NEG  # masked items
    targets = rng.integers(0, 12, size=200)
    relevant = np.zeros_like(scores, dtype=bool)
    relevant[np.arange(200), targets] = True
    ranks = ranks_from_scores(scores, targets)
    hits = hit_matrix(scores, relevant, 5)
    ones = np.ones(200)
    np.testing.assert_array_equal(first_relevant_rank(scores, relevant), ranks)
    np.testing.assert_array_equal(hit_at_k(hits), (ranks < 5).astype(float))
    np.testing.assert_allclose(ndcg_at_k_multi(hits, ones), ndcg_at_k(ranks, 5))
    np.testing.assert_array_equal(recall_at_k(hits, ones), (ranks < 5).astype(float))


def test_k_larger_than_catalogue_and_bad_sizes() -> None:
    hits = hit_matrix(SCORES[:1], RELEVANT[:1], 50)
    assert hits.shape == (1, 5)
    assert hits.sum() == 2
    with pytest.raises(ValueError, match="more hits than relevant"):
        recall_at_k(HITS, np.array([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="k must be"):
        hit_matrix(SCORES, RELEVANT, 0)

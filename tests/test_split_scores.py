"""The evaluation's split path (``fedrec.shared_model.split_scores``) gives the dense path's numbers.

Scorers with a shared part (item-release models, popularity baselines) are ranked without a (B, N)
array; every metric must equal what the dense masked matrix gives (issue 15: same metrics to 1e-9),
ties, -inf scores, masked test items, empty and full supports and given splits included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.privacy import gram
from fedrec.server.release import fit_release
from fedrec.shared_model.baselines import DPPopularity, Popularity
from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.evaluate import evaluate, sample_negatives
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.split_scores import SharedScores
from fedrec.shared_model.training import ModelScorer, SamplingConfig


class DenseOnly:
    """The same scorer through the dense path only (what every MLP model takes): ``score`` alone."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        return self.inner.score(split, users, histories, which)  # type: ignore[attr-defined]


class TiedScorer:
    """Integer-valued scores (many ties) on a random support, -inf on a few shared items; a user's
    support scores depend on the user only (never on the batch)."""

    def __init__(self, n: int, m: int, seed: int, levels: int) -> None:
        rng = np.random.default_rng(seed)
        self.items = np.sort(rng.choice(n, m, replace=False)).astype(np.int64)
        self.outside = rng.integers(0, levels, n).astype(np.float32)
        self.outside[rng.integers(0, n, 2)] = -np.inf
        self.seed, self.levels = seed, levels

    def shared_part(self, split: UserSplit) -> SharedScores:
        return SharedScores(self.items, self.outside)

    def user_part(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        rows = [
            np.random.default_rng([self.seed, int(u)]).integers(0, self.levels, len(self.items))
            for u in users
        ]
        return np.asarray(rows, dtype=np.float32).reshape(len(users), len(self.items))

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        out = np.broadcast_to(self.outside, (len(users), split.n_items)).copy()
        out[:, self.items] = self.user_part(split, users, histories, which)
        return out


def random_split(n_users: int, n_items: int, seed: int, given: bool) -> UserSplit:
    """Random histories (repeats allowed), val/test items that may be in the history, and for a given
    split multi-item test sets with unrankable extras counted in the sizes."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 12, n_users)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    train = rng.integers(0, n_items, int(indptr[-1])).astype(np.int32)
    val = np.where(lens > 0, rng.integers(0, n_items, n_users), -1).astype(np.int32)
    test = np.where(lens > 0, rng.integers(0, n_items, n_users), -1).astype(np.int32)
    extra: dict[str, np.ndarray] = {}
    if given:
        t_len = rng.integers(0, 5, n_users)
        t_ptr = np.concatenate([[0], np.cumsum(t_len)]).astype(np.int64)
        t_items = rng.integers(0, n_items, int(t_ptr[-1])).astype(np.int32)
        extra = {
            "test_indptr": t_ptr,
            "test_items": t_items,
            "test_sizes": (t_len + rng.integers(0, 2, n_users)).astype(np.int32),
        }
        test = np.array([t_items[t_ptr[u]] if t_len[u] else -1 for u in range(n_users)], dtype=np.int32)
    return UserSplit(
        n_items=n_items, indptr=indptr, train_items=train, train_ctx=np.zeros((len(train), 2), np.int8),
        val_item=val, test_item=test, val_ctx=np.zeros((n_users, 2), np.int8),
        test_ctx=np.zeros((n_users, 2), np.int8), user_features=np.zeros((n_users, 4), np.int32), **extra,
    )  # fmt: skip


def flat(metrics: dict) -> dict[str, float]:
    return {**metrics["full"], **{f"sampled.{k}": v for k, v in metrics["sampled"].items()}}


def assert_same(scorer: object, split: UserSplit, catalog: Catalog, **kw: object) -> None:
    fast = flat(evaluate(scorer, split, catalog, batch_size=7, **kw).to_metrics())  # type: ignore[arg-type]
    dense = flat(evaluate(DenseOnly(scorer), split, catalog, batch_size=7, **kw).to_metrics())  # type: ignore[arg-type]
    assert fast.keys() == dense.keys()
    for key in fast:
        assert fast[key] == pytest.approx(dense[key], abs=1e-9), (key, kw)


@pytest.mark.parametrize("seed", range(12))
def test_split_path_equals_dense_path_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed + 100)
    n = int(rng.integers(5, 200))
    m = [0, n, int(rng.integers(1, n))][seed % 3]  # empty support, full support, part
    levels = [2, 3, 50, 10**6][seed % 4]
    for given in (False, True):
        split = random_split(int(rng.integers(1, 120)), n, seed, given)
        catalog = Catalog.from_genres(rng.random((n, 3)).astype(np.float32))
        for scorer in (TiedScorer(n, m, seed, levels), Popularity().fit(split)):
            for which in ("val", "test"):
                for k in (1, 10):
                    assert_same(scorer, split, catalog, which=which, k=k, set_k=20)


def test_two_stage_model_and_dp_popularity_equal_the_dense_path() -> None:
    """A real dp_two_stage fit (noisy Gram over a DP selection, the rest by the prior) and DP popularity."""
    rng = np.random.default_rng(5)
    n, users = 300, 400
    split = random_split(users, n, 9, given=False)
    x = gram.unit_rows(split.indptr, split.train_items.astype(np.int64), n)
    pop = np.asarray(x.sum(axis=0)).ravel()
    noisy = pop + rng.normal(0, 1.0, n)
    sel = gram.select_top(noisy, 60)
    xs = gram.selected_rows(split.indptr, split.train_items.astype(np.int64), n, sel)
    g = (xs.T @ xs).toarray() + gram.symmetric_noise(60, 0.5, 0.5, rng)
    model = fit_release(
        {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users, sigma_sum=0.5, dp=True,
        stage=2, selection=sel, prior=np.log1p(np.maximum(noisy, 0)),
    )  # fmt: skip
    assert 0 < model.cfg.n_support < n
    catalog = Catalog.from_genres(rng.random((n, 3)).astype(np.float32))
    for scorer in (ModelScorer(model, SamplingConfig()), DPPopularity().fit_released(noisy)):
        for which in ("val", "test"):
            assert_same(scorer, split, catalog, which=which)
    given = random_split(users, n, 10, given=True)
    assert_same(ModelScorer(model, SamplingConfig()), given, catalog, which="test")


def test_inside_scores_equal_an_embedding_bag_bit_for_bit() -> None:
    """The CSR product gives the padded embedding bag's numbers exactly (repeats once, pads ignored)."""
    rng = np.random.default_rng(0)
    n, m = 50, 20
    model = ItemReleaseModel.from_popularity(rng.random(n), 0.0)
    model = ItemReleaseModel(model.cfg.__class__("dp_ease", n, m))
    model.weights.copy_(torch.from_numpy(rng.standard_normal((m, m)).astype(np.float32)))
    items = np.sort(rng.choice(n, m, replace=False))
    model.items.copy_(torch.from_numpy(items))
    col = np.full(n + 1, m)
    col[items] = np.arange(m)
    model.column_of.copy_(torch.from_numpy(col))
    hist = torch.from_numpy(rng.integers(0, n + 1, (30, 15)))  # n = padding; repeats likely
    cols = torch.from_numpy(col)[hist].sort(dim=1).values
    keep = cols < m
    keep[:, 1:] &= cols[:, 1:] != cols[:, :-1]
    ref = torch.nn.functional.embedding_bag(
        cols.clamp(max=m - 1), model.weights, mode="sum", per_sample_weights=keep.float()
    )
    assert torch.equal(model._inside_scores(hist), ref)


def test_sample_negatives_is_the_pool_draw() -> None:
    """The pool-free draw returns exactly ``rng.choice(pool, k, replace=False)`` (the evaluation's
    sampled protocol is unchanged), and every candidate when too few remain."""
    rng = np.random.default_rng(3)
    for user in range(40):
        n = int(rng.integers(5, 400))
        hist = rng.integers(0, n, int(rng.integers(0, n)))
        target = int(rng.integers(0, n))
        allowed = np.ones(n, dtype=bool)
        allowed[hist] = False
        allowed[target] = False
        pool = np.flatnonzero(allowed)
        want = pool if len(pool) <= 20 else np.random.default_rng([7, user]).choice(pool, 20, replace=False)
        np.testing.assert_array_equal(sample_negatives(n, hist, target, 20, 7, user), want)

"""Partitioning users into tenants: invariants of every scheme, determinism, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.shared_model.data import USER_FEATURES
from fedrec.simulations.data.dataset import PreparedData, prepare_dataset
from fedrec.simulations.data.partition import (
    PartitionSpec,
    dominant_genres,
    parse_partition,
    partition_users,
    summarize_tenant,
    tenant_weights,
)
from fedrec.simulations.data.sources import synthetic
from fedrec.simulations.errors import DataError


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return prepare_dataset(synthetic(users=400, items=150, seed=3))


def _assert_exact_cover(parts: list[np.ndarray], n_users: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n_users, "every user exactly once"
    assert np.array_equal(np.sort(joined), np.arange(n_users))
    assert all(np.all(np.diff(p) > 0) for p in parts), "tenants' users are sorted, no duplicates"


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("iid", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        (" dirichlet:2 ", PartitionSpec("dirichlet", alpha=2.0)),
        ("by:occupation", PartitionSpec("by", field="occupation")),
    ],
)
def test_parse_partition(text: str, spec: PartitionSpec) -> None:
    assert parse_partition(text) == spec
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dirichlet:0", "A > 0"),
        ("dirichlet:-1", "A > 0"),
        ("dirichlet:nan", "A > 0"),
        ("dirichlet:x", "A > 0"),
        ("by:zip", "FIELD in age_band"),
        ("random", "unknown --partition"),
        ("", "unknown --partition"),
    ],
)
def test_parse_partition_refuses(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_partition(text)


def test_iid_covers_every_user_once_with_balanced_sizes(data: PreparedData) -> None:
    parts = partition_users(data.split, data.catalog, 7, PartitionSpec("iid"), seed=1)
    _assert_exact_cover(parts, data.split.n_users)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_same_seed_same_partition_other_seed_differs(data: PreparedData) -> None:
    for spec in (PartitionSpec("iid"), PartitionSpec("dirichlet", alpha=0.5)):
        a = partition_users(data.split, data.catalog, 4, spec, seed=5)
        b = partition_users(data.split, data.catalog, 4, spec, seed=5)
        c = partition_users(data.split, data.catalog, 4, spec, seed=6)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_size_skew_follows_the_power_law(data: PreparedData) -> None:
    parts = partition_users(data.split, data.catalog, 4, PartitionSpec("iid"), size_skew=1.0, min_users=5)
    _assert_exact_cover(parts, data.split.n_users)
    sizes = np.array([len(p) for p in parts])
    expected = tenant_weights(4, 1.0) * data.split.n_users  # 192, 96, 64, 48
    assert np.all(np.abs(sizes - expected) < 1)
    assert np.all(np.diff(sizes) < 0)


def test_dirichlet_small_alpha_concentrates_genres(data: PreparedData) -> None:
    clusters = dominant_genres(data.split, data.catalog)

    def concentration(alpha: float) -> float:
        parts = partition_users(
            data.split, data.catalog, 4, PartitionSpec("dirichlet", alpha=alpha), min_users=5
        )
        _assert_exact_cover(parts, data.split.n_users)
        tenant_of = np.empty(data.split.n_users, dtype=np.int64)
        for t, users in enumerate(parts):
            tenant_of[users] = t
        # Average over clusters (weighted by size) of the largest share one tenant holds.
        shares = [
            np.bincount(tenant_of[clusters == c], minlength=4).max() / (clusters == c).sum()
            for c in np.unique(clusters)
        ]
        weights = [(clusters == c).sum() for c in np.unique(clusters)]
        return float(np.average(shares, weights=weights))

    assert concentration(0.1) > concentration(100.0) + 0.2
    assert concentration(100.0) < 0.5


def test_dominant_genre_is_the_most_frequent_training_genre(data: PreparedData) -> None:
    dominant = dominant_genres(data.split, data.catalog)
    u = 0
    mass = data.catalog.genres[data.split.history(u)].sum(axis=0)
    assert dominant[u] == int(np.argmax(mass))


def test_impossible_dirichlet_is_refused(data: PreparedData) -> None:
    with pytest.raises(DataError, match=r"dirichlet:0\.001 left a tenant with only"):
        partition_users(data.split, data.catalog, 30, PartitionSpec("dirichlet", alpha=0.001), min_users=10)


@pytest.mark.parametrize("field", USER_FEATURES)
def test_by_field_keeps_each_group_in_one_tenant(data: PreparedData, field: str) -> None:
    column = data.split.user_features[:, USER_FEATURES.index(field)]
    n_groups = len(np.unique(column))
    n_tenants = min(2, n_groups)
    parts = partition_users(
        data.split, data.catalog, n_tenants, PartitionSpec("by", field=field), min_users=1
    )
    _assert_exact_cover(parts, data.split.n_users)
    owners = [
        {t for t, users in enumerate(parts) if np.isin(users, np.flatnonzero(column == g)).any()}
        for g in np.unique(column)
    ]
    assert all(len(o) == 1 for o in owners), "a group is never split across tenants"


def test_by_field_balances_greedily(data: PreparedData) -> None:
    column = data.split.user_features[:, USER_FEATURES.index("occupation")]
    parts = partition_users(data.split, data.catalog, 3, PartitionSpec("by", field="occupation"))
    largest = np.bincount(column).max()
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= largest  # greedy LPT bound


def test_by_field_with_fewer_groups_than_tenants_is_refused(data: PreparedData) -> None:
    with pytest.raises(DataError, match=r"by:gender gives 2 group\(s\) \(F, M\) for 3 tenants"):
        partition_users(data.split, data.catalog, 3, PartitionSpec("by", field="gender"), min_users=1)


def test_by_field_refuses_size_skew(data: PreparedData) -> None:
    with pytest.raises(DataError, match="--size-skew applies to iid and dirichlet"):
        partition_users(data.split, data.catalog, 2, PartitionSpec("by", field="gender"), size_skew=1.0)


@pytest.mark.parametrize(
    ("tenants", "kwargs", "message"),
    [
        (401, {}, "cannot split 400 users into 401 tenants"),
        (0, {}, "--tenants must be at least 1"),
        (50, {}, "cannot give 50 tenants at least 10 users"),
        (4, {"size_skew": 3.0}, r"gives tenant-3 only \d+ user\(s\) \(< --min-users 10\)"),
        (4, {"size_skew": -1.0}, "--size-skew must be a number ≥ 0"),
        (4, {"min_users": 0}, "--min-users must be at least 1"),
    ],
)
def test_bad_requests_are_refused(
    data: PreparedData, tenants: int, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        partition_users(data.split, data.catalog, tenants, PartitionSpec("iid"), **kwargs)  # type: ignore[arg-type]


def test_summary_counts_and_top_genres(data: PreparedData) -> None:
    sub = data.split.subset(np.arange(20))
    summary = summarize_tenant(sub, data.catalog)
    assert summary["users"] == 20
    assert summary["train_interactions"] == sub.n_train
    assert summary["users_with_test"] == int((sub.test_item >= 0).sum())
    top = summary["top_genres"]
    assert isinstance(top, list) and 1 <= len(top) <= 3
    shares = [g["share"] for g in top]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1

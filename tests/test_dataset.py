"""Cleaning, reindexing, features and the leave-one-out split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.simulations.data.dataset import clean, prepare_dataset, require_evaluable
from fedrec.simulations.data.sources import RawDataset, load
from fedrec.simulations.errors import DataError


def raw(rows: list[tuple[str, str, float, int]], users: pd.DataFrame | None = None) -> RawDataset:
    inter = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    items = pd.DataFrame(
        {"title": [f"T{i}" for i in sorted(set(inter["item"]))], "genres": "A|B", "year": 1990},
        index=pd.Index(sorted(set(inter["item"])), name="item"),
    )
    return RawDataset(interactions=inter, items=items, users=users, source="test")


def test_clean_drops_invalid_rows_and_keeps_the_latest_duplicate() -> None:
    df = pd.DataFrame(
        [
            ("u1", "i1", 3.0, 10),
            ("u1", "i1", 5.0, 20),
            ("", "i2", 4.0, 1),
            ("u2", None, 4.0, 1),
            ("u3", "i3", 2.0, -5),
        ],
        columns=["user", "item", "rating", "timestamp"],
    )
    out = clean(df)
    assert out[["user", "item", "rating", "timestamp"]].values.tolist() == [["u1", "i1", 5.0, 20]]
    assert clean(df, min_rating=6).empty


def test_leave_one_out_by_time_with_item_tie_break() -> None:
    # u1: i3@1, i1@5, i2@5 (tie → by item index: i1 before i2), i4@9 ; u2 has 2 interactions → train only
    data = prepare_dataset(
        raw(
            [
                ("u1", "i3", 4, 1),
                ("u1", "i2", 4, 5),
                ("u1", "i1", 4, 5),
                ("u1", "i4", 4, 9),
                ("u2", "i1", 4, 3),
                ("u2", "i2", 4, 4),
            ]
        )
    )
    cat, split = data.catalog, data.split
    idx = cat.index_of()
    u1 = data.user_ids.index("u1")
    assert split.history(u1).tolist() == [idx["i3"], idx["i1"]]
    assert split.val_item[u1] == idx["i2"] and split.test_item[u1] == idx["i4"]
    u2 = data.user_ids.index("u2")
    assert split.test_item[u2] == -1 and split.val_item[u2] == -1 and len(split.history(u2)) == 2
    assert cat.titles[idx["i4"]] == "Ti4" and cat.genre_names == ("A", "B")


def test_split_invariants_on_synthetic_data() -> None:
    data = prepare_dataset(load("synthetic", synth_users=300, synth_items=200, seed=3))
    s = data.split
    for u in range(s.n_users):
        h = set(s.history(u).tolist())
        if s.test_item[u] >= 0:
            assert s.test_item[u] not in h, "a test item must never be in the user's training history"
            assert s.val_item[u] not in h and s.val_item[u] != s.test_item[u]
    assert s.n_train + 2 * int((s.test_item >= 0).sum()) == data.n_interactions
    # deterministic for a seed
    again = prepare_dataset(load("synthetic", synth_users=300, synth_items=200, seed=3))
    assert np.array_equal(again.split.train_items, s.train_items)
    assert np.array_equal(again.split.test_item, s.test_item)


def test_user_features_are_generalized_codes() -> None:
    users = pd.DataFrame(
        {
            "age": [23.0, 61.0],
            "gender": ["F", "M"],
            "occupation": ["Writer", "doctor"],
            "zip": ["94110", "T8H1N"],
        },
        index=pd.Index(["u1", "u2"], name="user"),
    )
    data = prepare_dataset(raw([("u1", "i1", 4, 1), ("u2", "i2", 4, 2)], users))
    vocab = data.catalog.user_vocab
    assert vocab["age_band"] == ("18-24", "56+") and vocab["region"] == ("9", "other")
    u1 = data.user_ids.index("u1")
    feats = dict(
        zip(("age_band", "gender", "occupation", "region"), data.split.user_features[u1], strict=True)
    )
    assert vocab["occupation"][feats["occupation"] - 1] == "writer"


def test_empty_and_too_small_datasets_are_refused() -> None:
    with pytest.raises(DataError, match="no valid interactions"):
        prepare_dataset(raw([("", "i1", 4, 1)]))
    with pytest.raises(DataError, match="at least 2"):
        prepare_dataset(raw([("u1", "i1", 4, 1)]))
    small = prepare_dataset(raw([("u1", "i1", 4, 1), ("u1", "i2", 4, 2)]))
    with pytest.raises(DataError, match="too small to split"):
        require_evaluable(small)

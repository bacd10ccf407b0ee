"""From a raw interaction log to the training structures: clean, reindex, featurize, split.

``prepare_dataset(raw)`` is the one entry point. It

1. cleans: drops rows with a missing/empty user or item id or an invalid timestamp, keeps
   ``rating >= min_rating`` when asked (implicit feedback otherwise: every rating is an interaction),
   and keeps only the latest interaction of each (user, item) pair;
2. reindexes users and items densely (sorted by original id, numerically when ids are numbers),
   keeping the mapping to original item ids and titles in the :class:`Catalog`;
3. featurizes: item genres (multi-hot) and year; generalized user demographics (age band, gender,
   occupation, zip region — the level-0 generalizations of ``fedrec.privacy.anonymize``); and the context
   (hour, weekday, UTC) of every interaction;
4. splits leave-one-out by time: per user, interactions sorted by (timestamp, item index) — ties
   broken by item index so the split is deterministic — last = test, second last = validation,
   rest = train. Users with fewer than 3 interactions stay train-only.

The original user ids stay in memory (``PreparedData.user_ids``) for partitioning and pseudonymizing;
nothing here writes them anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedrec.privacy.anonymize import generalize_value
from fedrec.shared_model.data import USER_FEATURES, Catalog, UserSplit
from fedrec.simulations.data.sources import RawDataset
from fedrec.simulations.errors import DataError

#: Raw user columns and the generalized feature each one becomes (USER_FEATURES order).
_RAW_OF_FEATURE = {"age_band": "age", "gender": "gender", "occupation": "occupation", "region": "zip"}


@dataclass(frozen=True)
class PreparedData:
    """A cleaned, featurized, split dataset (in memory only)."""

    catalog: Catalog
    split: UserSplit
    user_ids: tuple[str, ...]  # original id of dense user u — never written to disk
    users_raw: pd.DataFrame  # raw quasi-identifiers per dense user (age, gender, occupation, zip)
    source: str
    n_interactions: int  # after cleaning
    # Given splits only: what the TEST file held and how it was read (counts, no identifiers).
    given: dict[str, Any] | None = None


def _sort_key(ids: pd.Index) -> np.ndarray:
    """Order ids numerically when they all are integers, else lexicographically."""
    as_num = pd.to_numeric(pd.Series(ids, dtype="object"), errors="coerce")
    if as_num.notna().all():
        return np.argsort(as_num.to_numpy(dtype=np.float64), kind="stable")
    return np.argsort(np.asarray(ids, dtype=str), kind="stable")


def clean(interactions: pd.DataFrame, *, min_rating: float | None = None) -> pd.DataFrame:
    """Drop invalid rows, filter by rating, dedupe (user, item) keeping the latest interaction."""
    df = interactions[["user", "item", "rating", "timestamp"]].copy()
    df["user"] = df["user"].astype("string").str.strip()
    df["item"] = df["item"].astype("string").str.strip()
    ok = df["user"].notna() & df["item"].notna() & (df["user"] != "") & (df["item"] != "")
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    ok &= ts.notna() & (ts >= 0)
    df = df[ok].assign(timestamp=ts[ok].astype(np.int64))
    if min_rating is not None:
        rating = pd.to_numeric(df["rating"], errors="coerce")
        df = df[rating >= min_rating]
    # Latest interaction of each pair wins; among equal timestamps the last row wins.
    df = df.reset_index(drop=True)
    df["_row"] = np.arange(len(df))
    df = df.sort_values(["timestamp", "_row"], kind="stable").drop_duplicates(["user", "item"], keep="last")
    return df.drop(columns="_row").reset_index(drop=True)


def _genre_matrix(items: pd.DataFrame, order: pd.Index) -> tuple[tuple[str, ...], np.ndarray]:
    """Multi-hot genres (n_items, n_genres) in ``order``; genre names sorted for determinism."""
    genres = items["genres"].reindex(order).fillna("").astype(str) if "genres" in items else None
    if genres is None:
        return (), np.zeros((len(order), 0), dtype=np.float32)
    lists = [[g for g in s.split("|") if g and g != "(no genres listed)"] for s in genres]
    names = tuple(sorted({g for gl in lists for g in gl}))
    col = {g: j for j, g in enumerate(names)}
    mat = np.zeros((len(order), len(names)), dtype=np.float32)  # (n_items, n_genres)
    for i, gl in enumerate(lists):
        for g in gl:
            mat[i, col[g]] = 1.0
    return names, mat


def _user_features(users_raw: pd.DataFrame) -> tuple[dict[str, tuple[str, ...]], np.ndarray]:
    """Level-0 generalized user features as codes; vocabulary values sorted, 0 = unknown ('*')."""
    n = len(users_raw)
    codes = np.zeros((n, len(USER_FEATURES)), dtype=np.int32)  # (n_users, 4)
    vocab: dict[str, tuple[str, ...]] = {}
    for j, feat in enumerate(USER_FEATURES):
        raw_col = _RAW_OF_FEATURE[feat]
        if raw_col not in users_raw:
            vocab[feat] = ()
            continue
        values = [generalize_value(raw_col, v, 0) for v in users_raw[raw_col].tolist()]
        known = sorted({v for v in values if v != "*"})
        vocab[feat] = tuple(known)
        index = {v: i + 1 for i, v in enumerate(known)}
        codes[:, j] = [index.get(v, 0) for v in values]
    return vocab, codes


def _catalog(
    raw: RawDataset, item_index: pd.Index, user_index: pd.Index
) -> tuple[Catalog, pd.DataFrame, np.ndarray]:
    """The catalogue of ``item_index``, the users' raw quasi-identifiers and feature codes."""
    n_items = len(item_index)
    items = raw.items
    titles = (
        tuple(items["title"].reindex(item_index).fillna("").astype(str))
        if "title" in items
        else ("",) * n_items
    )
    years = (
        pd.to_numeric(items["year"].reindex(item_index), errors="coerce").fillna(0).to_numpy(np.int32)
        if "year" in items
        else np.zeros(n_items, dtype=np.int32)
    )
    genre_names, genres = _genre_matrix(items, item_index)

    users_raw = (
        raw.users.reindex(user_index) if raw.users is not None else pd.DataFrame(index=user_index)
    ).copy()
    vocab, user_codes = _user_features(users_raw)

    catalog = Catalog(
        item_ids=tuple(str(x) for x in item_index),
        titles=titles,
        genre_names=genre_names,
        genres=genres,
        years=years,
        user_vocab=vocab,
    )
    return catalog, users_raw, user_codes


def prepare_dataset(raw: RawDataset, *, min_rating: float | None = None) -> PreparedData:
    """Clean, reindex, featurize and split ``raw``. Raises :class:`DataError` for unusable data."""
    df = clean(raw.interactions, min_rating=min_rating)
    if df.empty:
        raise DataError(f"no valid interactions left in {raw.source} after cleaning")

    user_index = pd.Index(df["user"].unique())
    user_index = user_index[_sort_key(user_index)]
    item_index = pd.Index(df["item"].unique())
    item_index = item_index[_sort_key(item_index)]
    n_users, n_items = len(user_index), len(item_index)
    if n_items < 2:
        raise DataError(f"{raw.source} has {n_items} distinct item(s); a recommender needs at least 2")

    u = user_index.get_indexer(df["user"]).astype(np.int64)
    i = item_index.get_indexer(df["item"]).astype(np.int32)
    ts = df["timestamp"].to_numpy(np.int64)

    # Sort by (user, timestamp, item index): time order within a user, ties by item index.
    order = np.lexsort((i, ts, u))
    u, i, ts = u[order], i[order], ts[order]
    when = pd.to_datetime(ts, unit="s", utc=True)
    ctx = np.stack([when.hour.to_numpy(), when.day_of_week.to_numpy()], axis=1).astype(np.int8)  # (nnz, 2)

    counts = np.bincount(u, minlength=n_users)
    ends = np.cumsum(counts)  # end offset of each user's row in the sorted arrays
    has_eval = counts >= 3
    test_pos = np.where(has_eval, ends - 1, -1)
    val_pos = np.where(has_eval, ends - 2, -1)
    keep = np.ones(len(u), dtype=bool)
    keep[test_pos[has_eval]] = False
    keep[val_pos[has_eval]] = False

    train_counts = counts - 2 * has_eval
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(train_counts, out=indptr[1:])

    def held_out(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        item = np.full(n_users, -1, dtype=np.int32)
        c = np.full((n_users, 2), -1, dtype=np.int8)
        item[has_eval] = i[pos[has_eval]]
        c[has_eval] = ctx[pos[has_eval]]
        return item, c

    val_item, val_ctx = held_out(val_pos)
    test_item, test_ctx = held_out(test_pos)

    catalog, users_raw, user_codes = _catalog(raw, item_index, user_index)
    split = UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=i[keep].astype(np.int32),
        train_ctx=ctx[keep],
        val_item=val_item,
        test_item=test_item,
        val_ctx=val_ctx,
        test_ctx=test_ctx,
        user_features=user_codes,
    )
    return PreparedData(
        catalog=catalog,
        split=split,
        user_ids=tuple(str(x) for x in user_index),
        users_raw=users_raw,
        source=raw.source,
        n_interactions=len(df),
    )


def require_evaluable(data: PreparedData, *, min_users: int = 2) -> None:
    """Refuse a dataset too small to train and evaluate on (clear one-line error)."""
    if data.split.test_sizes is not None:
        n_eval = int((data.split.test_sizes > 0).sum())
        if n_eval < min_users:
            raise DataError(f"{data.source} has {n_eval} test user(s); need at least {min_users}")
        return
    n_eval = int((data.split.test_item >= 0).sum())
    if n_eval < min_users:
        raise DataError(
            f"{data.source} is too small to split: {n_eval} user(s) have the 3+ interactions needed for "
            f"a validation and a test item (need at least {min_users})"
        )


# ------------------------------------------------------------------ given splits

#: How validation is drawn on a given split (also written to metrics.json).
GIVEN_VALIDATION = (
    "one random training item per user with ≥ 2 training items (seeded), held out of TRAIN; TEST is never "
    "used for tuning"
)


def _context(ts: np.ndarray) -> np.ndarray:
    """(hour, weekday) in UTC of unix-second timestamps, (n, 2) int8."""
    when = pd.to_datetime(ts, unit="s", utc=True)
    return np.stack([when.hour.to_numpy(), when.day_of_week.to_numpy()], axis=1).astype(np.int8)


def prepare_given_split(
    train: RawDataset, test: RawDataset, *, seed: int = 0, min_rating: float | None = None
) -> PreparedData:
    """Build the training structures from a given TRAIN/TEST pair, used as is (no leave-one-out).

    Rules (each tested; DESIGN.md "given splits"):

    * both files are cleaned like a single log (invalid rows dropped, ``min_rating`` applied, a
      repeated (user, item) pair counted once);
    * the catalogue is TRAIN's items. A TEST item absent from TRAIN cannot be ranked: it stays in its
      user's test set (recall's denominator) and is always a miss;
    * a TEST item that is also in the user's TRAIN is masked like every training item: a miss;
    * every TEST user must be a TRAIN user, and TEST must share items with TRAIN — otherwise TEST
      belongs to another train file and this is a :class:`DataError`;
    * validation (early stopping, tuning) holds out one random TRAIN item per user with at least two
      (:data:`GIVEN_VALIDATION`); the model and baselines train on the rest of TRAIN.
    """
    tr = clean(train.interactions, min_rating=min_rating)
    te = clean(test.interactions, min_rating=min_rating)
    if tr.empty:
        raise DataError(f"no valid interactions left in {train.source} after cleaning")
    if te.empty:
        raise DataError(f"no valid interactions left in {test.source} after cleaning")
    user_index = pd.Index(tr["user"].unique())
    user_index = user_index[_sort_key(user_index)]
    item_index = pd.Index(tr["item"].unique())
    item_index = item_index[_sort_key(item_index)]
    n_users, n_items = len(user_index), len(item_index)
    if n_items < 2:
        raise DataError(f"{train.source} has {n_items} distinct item(s); a recommender needs at least 2")

    tu = user_index.get_indexer(te["user"]).astype(np.int64)  # (m,) -1 = not a TRAIN user
    ti = item_index.get_indexer(te["item"]).astype(np.int64)  # (m,) -1 = not a TRAIN item
    test_users = int(te["user"].nunique())
    if (tu < 0).all():
        raise DataError(
            f"TEST shares no user with TRAIN ({test.source} vs {train.source}): "
            "it belongs to another train file"
        )
    if (ti < 0).all():
        raise DataError(
            f"TEST shares no item with TRAIN ({test.source} vs {train.source}): "
            "it belongs to another train file"
        )
    if (tu < 0).any():
        strangers = int(te["user"][tu < 0].nunique())
        raise DataError(
            f"TEST has {strangers} of its {test_users} user(s) that are not in TRAIN ({test.source}); "
            "every test user needs training items — remove them from TEST or use the matching TRAIN file"
        )

    # ---- train rows, time (or file) order within a user; one random item per user held out
    u = user_index.get_indexer(tr["user"]).astype(np.int64)
    i = item_index.get_indexer(tr["item"]).astype(np.int32)
    ts = tr["timestamp"].to_numpy(np.int64)
    order = np.lexsort((i, ts, u))
    u, i, ts = u[order], i[order], ts[order]
    ctx = _context(ts)  # (nnz, 2)
    counts = np.bincount(u, minlength=n_users)  # (n_users,)
    starts = np.cumsum(counts) - counts
    has_val = counts >= 2
    rng = np.random.default_rng(seed)
    pick = np.minimum((rng.random(n_users) * counts).astype(np.int64), np.maximum(counts - 1, 0))
    val_pos = np.where(has_val, starts + pick, -1)
    keep = np.ones(len(u), dtype=bool)
    keep[val_pos[has_val]] = False
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts - has_val, out=indptr[1:])
    val_item = np.full(n_users, -1, dtype=np.int32)
    val_ctx = np.full((n_users, 2), -1, dtype=np.int8)
    val_item[has_val] = i[val_pos[has_val]]
    val_ctx[has_val] = ctx[val_pos[has_val]]

    # ---- test sets in file order; unrankable items count in the sizes only
    t_ts = te["timestamp"].to_numpy(np.int64)
    t_order = np.lexsort((np.arange(len(te)), t_ts, tu))
    tu, ti, t_ts = tu[t_order], ti[t_order], t_ts[t_order]
    test_sizes = np.bincount(tu, minlength=n_users).astype(np.int32)  # (n_users,)
    rankable = ti >= 0
    test_indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(tu[rankable], minlength=n_users), out=test_indptr[1:])
    test_items = ti[rankable].astype(np.int32)
    has_rankable = np.diff(test_indptr) > 0
    first = test_indptr[:-1][has_rankable]
    test_item = np.full(n_users, -1, dtype=np.int32)
    test_item[has_rankable] = test_items[first]
    first_row = np.cumsum(test_sizes) - test_sizes  # first TEST row of each user (any item)
    test_ctx = np.full((n_users, 2), -1, dtype=np.int8)
    has_test = test_sizes > 0
    test_ctx[has_test] = _context(t_ts[first_row[has_test]])
    in_train = np.isin(tu[rankable] * n_items + ti[rankable], u * n_items + i)  # TEST pairs also in TRAIN

    catalog, users_raw, user_codes = _catalog(train, item_index, user_index)
    split = UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=i[keep].astype(np.int32),
        train_ctx=ctx[keep],
        val_item=val_item,
        test_item=test_item,
        val_ctx=val_ctx,
        test_ctx=test_ctx,
        user_features=user_codes,
        test_indptr=test_indptr,
        test_items=test_items,
        test_sizes=test_sizes,
    )
    given = {
        "train": train.source,
        "test": test.source,
        "test_users": test_users,
        "test_interactions": len(te),
        "test_only_items": int(pd.Index(te["item"].unique()).difference(item_index).size),
        "test_only_interactions": int((~rankable).sum()),
        "test_in_train": int(in_train.sum()),
        "validation": GIVEN_VALIDATION,
    }
    return PreparedData(
        catalog=catalog,
        split=split,
        user_ids=tuple(str(x) for x in user_index),
        users_raw=users_raw,
        source=f"given split: {train.source} + {test.source}",
        n_interactions=len(tr) + len(te),
        given=given,
    )

"""In-memory training structures shared by centralized training, the ClientApp and serving.

Two objects describe a dataset after cleaning and the leave-one-out split:

* :class:`Catalog` — the public item side (ids, titles, genres, years) and the vocabularies of the
  generalized user features. Identical for every tenant; it goes into ``model.json``.
* :class:`UserSplit` — per-user interactions in CSR form (rows are users, ordered by time within a
  row) with each user's held-out validation and test item. A tenant's partition is one
  ``UserSplit``; it never leaves the tenant.

Item indices are dense ``0 .. n_items-1``; ``n_items`` itself is the padding index of the model.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Generalized user features, in this order, as columns of ``UserSplit.user_features``.
USER_FEATURES: tuple[str, ...] = ("age_band", "gender", "occupation", "region")

#: Schema version of the serialized ``UserSplit`` (bumped on any incompatible change).
SPLIT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Catalog:
    """Public item metadata and user-feature vocabularies (no user data)."""

    item_ids: tuple[str, ...]  # original item id of dense index i
    titles: tuple[str, ...]  # display title of item i ("" if unknown)
    genre_names: tuple[str, ...]  # column names of ``genres``
    genres: np.ndarray  # (n_items, n_genres) float32 multi-hot
    years: np.ndarray  # (n_items,) int32 release year, 0 = unknown
    # Vocabulary of each generalized user feature; code 0 = unknown/suppressed, code i+1 = value i.
    user_vocab: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if len(self.titles) != n:
            raise ValueError(f"catalog has {n} item ids but {len(self.titles)} titles")
        if self.genres.shape != (n, len(self.genre_names)):
            raise ValueError(
                f"genres must be (n_items, n_genres) = ({n}, {len(self.genre_names)}), "
                f"got {self.genres.shape}"
            )
        if self.years.shape != (n,):
            raise ValueError(f"years must be ({n},), got {self.years.shape}")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_genres(cls, genres: np.ndarray) -> Catalog:
        """An id-less catalogue over ``genres`` (n_items, n_genres): what evaluation needs (item count,
        genre vectors for intra-list diversity) when only a model is at hand."""
        n, g = genres.shape
        return cls(
            item_ids=tuple(str(i) for i in range(n)),
            titles=("",) * n,
            genre_names=tuple(f"g{j}" for j in range(g)),
            genres=np.asarray(genres, dtype=np.float32),
            years=np.zeros(n, dtype=np.int32),
        )

    def cardinalities(self) -> tuple[int, ...]:
        """Embedding-table sizes of the user features, in ``USER_FEATURES`` order (incl. code 0)."""
        return tuple(len(self.user_vocab.get(f, ())) + 1 for f in USER_FEATURES)

    def index_of(self) -> dict[str, int]:
        """Map original item id → dense index."""
        return {iid: i for i, iid in enumerate(self.item_ids)}

    def to_json(self) -> dict[str, object]:
        return {
            "item_ids": list(self.item_ids),
            "titles": list(self.titles),
            "genre_names": list(self.genre_names),
            # genres as lists of indices: compact and readable
            "genres": [np.flatnonzero(row).tolist() for row in self.genres],
            "years": self.years.tolist(),
            "user_vocab": {k: list(v) for k, v in self.user_vocab.items()},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Catalog:
        item_ids = tuple(str(x) for x in obj["item_ids"])
        genre_names = tuple(str(x) for x in obj["genre_names"])
        genres = np.zeros((len(item_ids), len(genre_names)), dtype=np.float32)
        for i, idx in enumerate(obj["genres"]):
            genres[i, list(idx)] = 1.0
        vocab = obj.get("user_vocab", {})
        return cls(
            item_ids=item_ids,
            titles=tuple(str(x) for x in obj["titles"]),
            genre_names=genre_names,
            genres=genres,
            years=np.asarray(obj["years"], dtype=np.int32),
            user_vocab={str(k): tuple(str(x) for x in v) for k, v in vocab.items()},
        )


@dataclass(frozen=True)
class UserSplit:
    """Leave-one-out split of some users' interactions, CSR by user.

    Row ``u`` holds user ``u``'s training items in time order (ties broken by item index):
    ``train_items[indptr[u]:indptr[u+1]]``. ``val_item[u]``/``test_item[u]`` are the second-last
    and last interactions, or -1 for users with fewer than 3 interactions (train-only users).
    """

    n_items: int
    indptr: np.ndarray  # (n_users+1,) int64
    train_items: np.ndarray  # (nnz,) int32
    train_ctx: np.ndarray  # (nnz, 2) int8: hour 0..23, weekday 0..6 of each training interaction
    val_item: np.ndarray  # (n_users,) int32, -1 = none
    test_item: np.ndarray  # (n_users,) int32, -1 = none
    val_ctx: np.ndarray  # (n_users, 2) int8 hour, weekday of the validation interaction (-1 = none)
    test_ctx: np.ndarray  # (n_users, 2) int8 hour, weekday of the test interaction (-1 = none)
    user_features: np.ndarray  # (n_users, len(USER_FEATURES)) int32 codes into Catalog.user_vocab
    # Keyed pseudonyms of the users (tenant partitions only); () when not needed.
    pseudonyms: tuple[str, ...] = ()
    # Given splits only (None under leave-one-out): each user's whole test set, CSR like the training
    # rows. ``test_items[test_indptr[u]:test_indptr[u+1]]`` are the rankable test items (in the
    # catalogue); ``test_sizes[u]`` ≥ their number also counts test items that cannot be ranked (not in
    # the catalogue): they stay in recall's denominator as misses. ``test_item[u]`` is then the first
    # rankable test item (or -1), kept for code that wants one item per user (sampled protocol).
    test_indptr: np.ndarray | None = None  # (n_users+1,) int64
    test_items: np.ndarray | None = None  # (nnz_test,) int32
    test_sizes: np.ndarray | None = None  # (n_users,) int32

    def __post_init__(self) -> None:
        n = self.n_users
        nnz = int(self.indptr[-1]) if len(self.indptr) else 0
        assert self.indptr.ndim == 1 and len(self.indptr) == n + 1, "indptr must be (n_users+1,)"
        assert self.train_items.shape == (nnz,), f"train_items must be ({nnz},), got {self.train_items.shape}"
        assert self.train_ctx.shape == (nnz, 2), f"train_ctx must be ({nnz}, 2), got {self.train_ctx.shape}"
        for name in ("val_item", "test_item"):
            arr = getattr(self, name)
            assert arr.shape == (n,), f"{name} must be ({n},), got {arr.shape}"
        for name in ("val_ctx", "test_ctx"):
            arr = getattr(self, name)
            assert arr.shape == (n, 2), f"{name} must be ({n}, 2), got {arr.shape}"
        assert self.user_features.shape == (n, len(USER_FEATURES)), "user_features must be (n_users, 4)"
        assert not self.pseudonyms or len(self.pseudonyms) == n, "one pseudonym per user"
        given = (self.test_indptr, self.test_items, self.test_sizes)
        assert all(a is None for a in given) or all(a is not None for a in given), "test sets: all or none"
        if self.test_indptr is not None and self.test_items is not None and self.test_sizes is not None:
            assert self.test_indptr.shape == (n + 1,), "test_indptr must be (n_users+1,)"
            assert self.test_items.shape == (int(self.test_indptr[-1]),), "test_items must match test_indptr"
            assert self.test_sizes.shape == (n,), "test_sizes must be (n_users,)"
            assert np.all(self.test_sizes >= np.diff(self.test_indptr)), "test_sizes below the rankable count"

    # ------------------------------------------------------------------ views
    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_train(self) -> int:
        return int(self.indptr[-1])

    def history(self, u: int) -> np.ndarray:
        """Training items of user ``u`` in time order, (n_u,) int32."""
        return self.train_items[self.indptr[u] : self.indptr[u + 1]]

    @property
    def has_test_sets(self) -> bool:
        """True for a given split (multi-item test sets), False under leave-one-out."""
        return self.test_indptr is not None

    def test_set(self, u: int) -> np.ndarray:
        """Rankable test items of user ``u`` (given splits), (m_u,) int32."""
        assert self.test_indptr is not None and self.test_items is not None, "not a given split"
        return self.test_items[self.test_indptr[u] : self.test_indptr[u + 1]]

    def train_counts(self) -> np.ndarray:
        """Number of training interactions per user, (n_users,) int64."""
        return np.diff(self.indptr)

    def eval_history(self, u: int, which: str) -> np.ndarray:
        """History fed to the model when scoring ``which`` ∈ {"val", "test"}.

        For validation: the training items. For test: training items + the validation item (it is
        known by then, and must not be recommended again).
        """
        h = self.history(u)
        if which == "test" and self.val_item[u] >= 0:
            h = np.append(h, np.int32(self.val_item[u]))
        return h

    def subset(self, users: Sequence[int] | np.ndarray) -> UserSplit:
        """A new split with only ``users`` (in the given order)."""
        users = np.asarray(users, dtype=np.int64)
        counts = self.train_counts()[users]
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        rows = [np.arange(self.indptr[u], self.indptr[u + 1]) for u in users]
        take = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        given: dict[str, np.ndarray | None] = {"test_indptr": None, "test_items": None, "test_sizes": None}
        if self.test_indptr is not None and self.test_items is not None and self.test_sizes is not None:
            t_counts = np.diff(self.test_indptr)[users]
            t_indptr = np.zeros(len(users) + 1, dtype=np.int64)
            np.cumsum(t_counts, out=t_indptr[1:])
            t_rows = [np.arange(self.test_indptr[u], self.test_indptr[u + 1]) for u in users]
            t_take = np.concatenate(t_rows) if t_rows else np.zeros(0, dtype=np.int64)
            given = {
                "test_indptr": t_indptr,
                "test_items": self.test_items[t_take],
                "test_sizes": self.test_sizes[users],
            }
        return UserSplit(
            n_items=self.n_items,
            indptr=indptr,
            train_items=self.train_items[take],
            train_ctx=self.train_ctx[take],
            val_item=self.val_item[users],
            test_item=self.test_item[users],
            val_ctx=self.val_ctx[users],
            test_ctx=self.test_ctx[users],
            user_features=self.user_features[users],
            pseudonyms=tuple(self.pseudonyms[u] for u in users) if self.pseudonyms else (),
            **given,
        )

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        """Serialize to an ``.npz`` byte string (no pickle). Encrypt before it touches disk."""
        buf = io.BytesIO()
        given: dict[str, Any] = {}
        if self.test_indptr is not None and self.test_items is not None and self.test_sizes is not None:
            # given splits only; absent keys mean leave-one-out
            given = {
                "test_indptr": self.test_indptr,
                "test_items": self.test_items,
                "test_sizes": self.test_sizes,
            }
        np.savez(
            buf,
            **given,
            schema=np.int64(SPLIT_SCHEMA_VERSION),
            n_items=np.int64(self.n_items),
            indptr=self.indptr,
            train_items=self.train_items,
            train_ctx=self.train_ctx,
            val_item=self.val_item,
            test_item=self.test_item,
            val_ctx=self.val_ctx,
            test_ctx=self.test_ctx,
            user_features=self.user_features,
            pseudonyms=np.asarray(self.pseudonyms, dtype=np.str_),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> UserSplit:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            version = int(z["schema"])
            if version != SPLIT_SCHEMA_VERSION:
                raise ValueError(
                    f"partition schema version {version} is not supported (want {SPLIT_SCHEMA_VERSION})"
                )
            return cls(
                n_items=int(z["n_items"]),
                indptr=z["indptr"].astype(np.int64),
                train_items=z["train_items"].astype(np.int32),
                train_ctx=z["train_ctx"].astype(np.int8),
                val_item=z["val_item"].astype(np.int32),
                test_item=z["test_item"].astype(np.int32),
                val_ctx=z["val_ctx"].astype(np.int8),
                test_ctx=z["test_ctx"].astype(np.int8),
                user_features=z["user_features"].astype(np.int32),
                pseudonyms=tuple(str(x) for x in z["pseudonyms"]),
                test_indptr=z["test_indptr"].astype(np.int64) if "test_indptr" in z else None,
                test_items=z["test_items"].astype(np.int32) if "test_items" in z else None,
                test_sizes=z["test_sizes"].astype(np.int32) if "test_sizes" in z else None,
            )


def concat_splits(parts: Sequence[UserSplit]) -> UserSplit:
    """Stack several splits over the same catalogue (e.g. all tenants, for centralized baselines)."""
    if not parts:
        raise ValueError("concat_splits needs at least one split")
    n_items = parts[0].n_items
    if any(p.n_items != n_items for p in parts):
        raise ValueError("all splits must share one catalogue (same n_items)")
    counts = np.concatenate([p.train_counts() for p in parts])
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    with_ps = all(p.pseudonyms for p in parts)
    given: dict[str, np.ndarray | None] = {"test_indptr": None, "test_items": None, "test_sizes": None}
    if any(p.has_test_sets for p in parts):
        if not all(p.has_test_sets for p in parts):
            raise ValueError("cannot stack a given split with a leave-one-out split")
        t_counts = np.concatenate([np.diff(p.test_indptr) for p in parts if p.test_indptr is not None])
        t_indptr = np.zeros(len(t_counts) + 1, dtype=np.int64)
        np.cumsum(t_counts, out=t_indptr[1:])
        given = {
            "test_indptr": t_indptr,
            "test_items": np.concatenate([p.test_items for p in parts if p.test_items is not None]),
            "test_sizes": np.concatenate([p.test_sizes for p in parts if p.test_sizes is not None]),
        }
    return UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=np.concatenate([p.train_items for p in parts]),
        train_ctx=np.concatenate([p.train_ctx for p in parts]),
        val_item=np.concatenate([p.val_item for p in parts]),
        test_item=np.concatenate([p.test_item for p in parts]),
        val_ctx=np.concatenate([p.val_ctx for p in parts]),
        test_ctx=np.concatenate([p.test_ctx for p in parts]),
        user_features=np.concatenate([p.user_features for p in parts]),
        pseudonyms=tuple(x for p in parts for x in p.pseudonyms) if with_ps else (),
        **given,
    )

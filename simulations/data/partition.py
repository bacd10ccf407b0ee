"""Partition a dataset's users into tenants (pure functions; nothing here touches disk).

Schemes (``--partition``), each assigning every user to exactly one tenant:

* ``iid`` — users shuffled and cut into tenants; with ``size_skew`` S > 0 tenant ``i`` gets a share
  ∝ 1/(i+1)^S of the users (S = 0: equal sizes, S = 1: Zipf-like sizes).
* ``dirichlet:A`` — non-IID by taste. A user's cluster is their dominant genre in training (the
  genre with the most training interactions; users without any genre form one extra cluster).
  Each cluster draws its own Dirichlet(A·1) distribution over tenants (times the size-skew
  weights, renormalized) and its users are cut into tenants in those proportions. Small A ⇒ each
  genre concentrates in few tenants. Draws that leave a tenant below ``min_users`` are redrawn
  (deterministically, up to ``DIRICHLET_TRIES`` times).
* ``by:FIELD`` for FIELD in age_band, gender, occupation, region — natural partitions: users are
  grouped by their level-0 value (unknown values form one group) and groups are assigned to
  tenants greedily, largest group first, each to the tenant with the fewest users so far.

The split (train/validation/test) is per user, so it travels with the user. Determinism: the
same data, scheme, tenant count and seed give the same assignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedrec.shared_model.data import USER_FEATURES, Catalog, UserSplit
from fedrec.simulations.errors import DataError

DIRICHLET_TRIES = 50  # redraws of a dirichlet:A partition before giving up on min_users
TOP_GENRES = 3  # genres listed per tenant in the partition summary


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition`` value."""

    kind: str  # "iid" | "dirichlet" | "by"
    alpha: float = 0.0  # Dirichlet concentration (kind "dirichlet")
    field: str = ""  # user feature (kind "by"), one of USER_FEATURES

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "by":
            return f"by:{self.field}"
        return "iid"


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:A`` (A > 0) or ``by:FIELD``; anything else is a DataError."""
    value = text.strip()
    if value == "iid":
        return PartitionSpec("iid")
    kind, sep, arg = value.partition(":")
    if sep and kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha) or alpha <= 0:
            raise DataError(f"--partition dirichlet:A needs a number A > 0, got {arg!r}")
        return PartitionSpec("dirichlet", alpha=alpha)
    if sep and kind == "by":
        if arg not in USER_FEATURES:
            raise DataError(f"--partition by:FIELD needs FIELD in {', '.join(USER_FEATURES)}, got {arg!r}")
        return PartitionSpec("by", field=arg)
    raise DataError(f"unknown --partition {text!r}; use iid, dirichlet:A (e.g. dirichlet:0.5) or by:FIELD")


# ------------------------------------------------------------------ assignment


def partition_users(
    split: UserSplit,
    catalog: Catalog,
    n_tenants: int,
    spec: PartitionSpec,
    *,
    seed: int = 0,
    size_skew: float = 0.0,
    min_users: int = 10,
) -> list[np.ndarray]:
    """Users (dense indices, ascending) of each tenant; every user appears exactly once.

    Raises :class:`DataError` for more tenants than users, fewer ``by:`` groups than tenants, a
    size skew with ``by:``, or a tenant left with fewer than ``min_users`` users.
    """
    n_users = split.n_users
    if n_tenants < 1:
        raise DataError(f"--tenants must be at least 1, got {n_tenants}")
    if n_tenants > n_users:
        raise DataError(f"cannot split {n_users} users into {n_tenants} tenants (more tenants than users)")
    if min_users < 1:
        raise DataError(f"--min-users must be at least 1, got {min_users}")
    if n_tenants * min_users > n_users:
        raise DataError(
            f"{n_users} users cannot give {n_tenants} tenants at least {min_users} users each; "
            "use fewer tenants or a smaller --min-users"
        )
    if not math.isfinite(size_skew) or size_skew < 0:
        raise DataError(f"--size-skew must be a number ≥ 0, got {size_skew}")
    rng = np.random.default_rng(seed)
    weights = tenant_weights(n_tenants, size_skew)
    if spec.kind == "iid":
        order = rng.permutation(n_users)
        sizes = _apportion(n_users, weights)
        parts = np.split(order, np.cumsum(sizes)[:-1])
    elif spec.kind == "dirichlet":
        parts = _dirichlet(split, catalog, n_tenants, spec.alpha, weights, rng, min_users)
    elif spec.kind == "by":
        if size_skew:
            raise DataError("--size-skew applies to iid and dirichlet partitions, not to by:FIELD")
        parts = _by_field(split, catalog, n_tenants, spec.field)
    else:  # pragma: no cover - PartitionSpec comes from parse_partition
        raise DataError(f"unknown partition kind {spec.kind!r}")
    tenants = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    _check_sizes(tenants, spec, min_users)
    return tenants


def tenant_weights(n_tenants: int, size_skew: float) -> np.ndarray:
    """Relative tenant sizes ∝ 1/(i+1)^S, normalized to sum 1, (n_tenants,) float64."""
    w = 1.0 / np.arange(1, n_tenants + 1, dtype=np.float64) ** size_skew
    return w / w.sum()


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer sizes summing to ``total``, proportional to ``shares`` (largest remainder method)."""
    exact = shares * total
    sizes = np.floor(exact).astype(np.int64)
    remainder = total - int(sizes.sum())
    if remainder:
        # Largest fractional parts first; ties go to the lower tenant index (stable sort).
        sizes[np.argsort(-(exact - sizes), kind="stable")[:remainder]] += 1
    return sizes


def dominant_genres(split: UserSplit, catalog: Catalog) -> np.ndarray:
    """Each user's most frequent training genre (lowest index on ties); n_genres when none, (n_users,)."""
    n_genres = len(catalog.genre_names)
    if n_genres == 0 or split.n_train == 0:
        return np.full(split.n_users, n_genres, dtype=np.int64)
    owner = np.repeat(np.arange(split.n_users), split.train_counts())  # (nnz,)
    mass = np.zeros((split.n_users, n_genres), dtype=np.float64)  # (n_users, n_genres)
    np.add.at(mass, owner, catalog.genres[split.train_items])
    dominant = mass.argmax(axis=1)
    dominant[mass.max(axis=1) <= 0] = n_genres
    return dominant.astype(np.int64)


def _dirichlet(
    split: UserSplit,
    catalog: Catalog,
    n_tenants: int,
    alpha: float,
    weights: np.ndarray,
    rng: np.random.Generator,
    min_users: int,
) -> list[np.ndarray]:
    clusters = dominant_genres(split, catalog)
    members = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    smallest = 0
    for _ in range(DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_tenants)]
        for users in members:
            share = rng.dirichlet(np.full(n_tenants, alpha)) * weights
            # Tiny alphas can underflow to all zeros (or NaN): fall back to the size weights.
            ok = bool(np.isfinite(share).all()) and share.sum() > 0
            share = share / share.sum() if ok else weights
            cuts = np.cumsum(_apportion(len(users), share))[:-1]
            for t, chunk in enumerate(np.split(rng.permutation(users), cuts)):
                buckets[t].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        smallest = min(len(p) for p in parts)
        if smallest >= min_users:
            return parts
    raise DataError(
        f"dirichlet:{alpha:g} left a tenant with only {smallest} user(s) (< --min-users {min_users}) in "
        f"{DIRICHLET_TRIES} draws; use a larger alpha, fewer tenants or a smaller --min-users"
    )


def _by_field(split: UserSplit, catalog: Catalog, n_tenants: int, field: str) -> list[np.ndarray]:
    codes = split.user_features[:, USER_FEATURES.index(field)]
    values, counts = np.unique(codes, return_counts=True)
    if len(values) < n_tenants:
        names = ", ".join(group_name(catalog, field, int(v)) for v in values)
        raise DataError(
            f"by:{field} gives {len(values)} group(s) ({names}) for {n_tenants} tenants; "
            "use at most that many tenants or another partition"
        )
    # Largest group first (ties: smaller code), each to the tenant with the fewest users (ties: lower id).
    order = sorted(range(len(values)), key=lambda g: (-int(counts[g]), int(values[g])))
    loads = [0] * n_tenants
    groups: list[list[int]] = [[] for _ in range(n_tenants)]
    for g in order:
        t = min(range(n_tenants), key=lambda i: (loads[i], i))
        groups[t].append(int(values[g]))
        loads[t] += int(counts[g])
    return [np.flatnonzero(np.isin(codes, gs)) for gs in groups]


def group_name(catalog: Catalog, field: str, code: int) -> str:
    """The level-0 value of feature code ``code`` ("*" for unknown)."""
    vocab = catalog.user_vocab.get(field, ())
    return vocab[code - 1] if 0 < code <= len(vocab) else "*"


def _check_sizes(tenants: list[np.ndarray], spec: PartitionSpec, min_users: int) -> None:
    for t, users in enumerate(tenants):
        if len(users) < min_users:
            raise DataError(
                f"partition {spec} gives tenant-{t} only {len(users)} user(s) (< --min-users {min_users}); "
                "use fewer tenants, a smaller --size-skew or another partition"
            )


# ------------------------------------------------------------------ summary


def summarize_tenant(split: UserSplit, catalog: Catalog) -> dict[str, object]:
    """Aggregate facts about one tenant's split (no identifiers): counts and top training genres."""
    summary: dict[str, object] = {
        "users": split.n_users,
        "train_interactions": split.n_train,
        "users_with_test": int((split.test_item >= 0).sum()),
    }
    top: list[dict[str, object]] = []
    if len(catalog.genre_names) and split.n_train:
        mass = catalog.genres[split.train_items].sum(axis=0)  # (n_genres,)
        total = float(mass.sum())
        for g in np.argsort(-mass, kind="stable")[:TOP_GENRES]:
            if mass[g] > 0:
                top.append({"genre": catalog.genre_names[g], "share": round(float(mass[g]) / total, 4)})
    summary["top_genres"] = top
    return summary

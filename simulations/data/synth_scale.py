"""The ``scale`` synthetic generator: implicit logs that look like a real catalogue, at any size.

``fedrec data synth --profile scale`` / ``--data synthetic --synth-profile scale``. Where the default
generator (:func:`fedrec.simulations.data.sources.synthetic`) is a small MovieLens look-alike, this one
makes the shapes that decide whether a private model beats counting on a real catalogue:

* **tens of thousands of items with a long-tailed popularity**: item ``i`` of popularity rank ``r``
  has weight ``r^(−zipf)`` (``zipf`` = 0.7 by default, a random permutation of the ids);
* **few items per user**: ``n_u`` log-normal with median ``per_user`` (σ = 0.45), clipped to
  ``[min_per_user, 10·per_user]`` — about 15–30 items for most users at the default 20;
* **low-rank tastes plus noise**: ``rank`` taste topics (200 by default: niches of ~200 items at 40k
  items); every item belongs to one topic (topic sizes log-normal); every user has a sparse Dirichlet
  mixture over the topics whose weights are themselves long-tailed — topic ``t`` gets concentration
  ``alpha · (t+1)^−topic_zipf`` (rescaled to mean ``alpha``), so a few broad tastes are shared by many
  users and most topics are niches. Each of a user's draws is, with probability ``1 − noise``, a topic
  from the user's mixture and then an item of that topic ∝ its popularity, and with probability
  ``noise`` an item of the whole catalogue ∝ popularity. ``P(item | user)`` is therefore a
  rank-``rank`` non-negative matrix plus a rank-one popularity term.

  Why these defaults (docs/PRIVACY_UTILITY.md, "Large catalogues"): the first version (40 equally
  popular topics, ``alpha`` 0.1) had so little item–item structure that even non-private EASE beat
  popularity by only 1.2× and an oracle knowing every topic by 1.6× — no Gram model can win there. The
  defaults were chosen by a **non-private** statistic: non-private EASE on the top items should beat
  popularity by about what it does on real logs (ml-100k ≈ 1.9×, the issue's 30k × 40k real log ≈ 2.8×,
  Recall@20); DP figures were printed beside in that sweep but were not the criterion. At 30k × 40k the
  defaults give only ≈ 1.5× (non-private EASE on the top 4 000 items ÷ popularity). ``--synth-noise 0.1
  --synth-alpha 0.003`` gives ≈ 2.8×, the issue's real log's figure (docs/PRIVACY_UTILITY.md, "A shape with
  a real log's headroom"); the defaults were kept so that earlier figures stay comparable.

Draws are made by inverse-CDF look-ups (one ``searchsorted`` over per-row cumulative sums offset by
the row index), so the cost is O(draws · log(items)) time and memory — no users × items array, and
30 000 users × 40 000 items take about a second. A user's repeated draws collapse to one interaction
(more draws than ``n_u`` are made to leave room for that); the draw order is the time order.

Deterministic per ``seed`` (numpy PCG64), including the order of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.simulations.errors import DataError

__all__ = ["PROFILES", "SynthSpec", "scale_synthetic"]

#: ``--synth-profile`` values: ``movielens`` (the default small generator) and ``scale``.
PROFILES: tuple[str, ...] = ("movielens", "scale")
_T0 = 1_514_764_800  # 2018-01-01 UTC
_YEAR = 365 * 86_400


@dataclass(frozen=True)
class SynthSpec:
    """Shape of the ``scale`` generator (module docstring); unknown profiles are rejected."""

    profile: str = "movielens"  # movielens | scale
    per_user: float = 20.0  # median items per user (scale)
    rank: int = 200  # taste topics (scale)
    noise: float = 0.3  # share of draws from the global popularity instead of the user's topics (scale)
    zipf: float = 0.7  # popularity exponent: weight of the r-th most popular item ∝ r^−zipf (scale)
    alpha: float = 0.01  # mean Dirichlet concentration per topic of a user's mixture: small = few topics each
    topic_zipf: float = 1.0  # topic popularity: topic t's Dirichlet weight ∝ (t + 1)^−topic_zipf
    min_per_user: int = 5  # no user below this (leave-one-out keeps ≥ 3 training items)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise DataError(f"--synth-profile must be one of {', '.join(PROFILES)}, got {self.profile!r}.")
        if not (self.per_user >= 2):
            raise DataError(f"--synth-per-user must be ≥ 2, got {self.per_user!r}.")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise DataError(f"--synth-rank must be an integer ≥ 1, got {self.rank!r}.")
        if not (0.0 <= self.noise <= 1.0):
            raise DataError(f"--synth-noise must be in [0, 1], got {self.noise!r}.")
        if not (0.0 <= self.topic_zipf <= 3.0):
            raise DataError(f"topic_zipf must be in [0, 3], got {self.topic_zipf!r}.")
        if not (self.alpha > 0) or self.alpha == float("inf"):
            raise DataError(f"--synth-alpha must be a finite number > 0, got {self.alpha!r}.")
        if not (0.0 <= self.zipf <= 3.0):
            raise DataError(f"zipf must be in [0, 3], got {self.zipf!r}.")
        if self.min_per_user < 1:
            raise DataError(f"min_per_user must be ≥ 1, got {self.min_per_user!r}.")


def _inverse_cdf(cum: np.ndarray, row: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Column drawn in row ``row`` of the row-stochastic cumulative sums ``cum`` (R, C) at uniform ``u``.

    The rows are laid end to end with row ``r`` shifted by ``r`` (every row's sums end at 1), so one
    ``searchsorted`` over the flat array answers every draw at once.
    """
    r, c = cum.shape
    flat = (cum + np.arange(r)[:, None]).ravel()  # (R·C,) non-decreasing
    pos = np.searchsorted(flat, row + u * (1.0 - 1e-12), side="right")
    return np.minimum(pos - row * c, c - 1)


def scale_synthetic(
    *, users: int, items: int, seed: int, spec: SynthSpec, genres: tuple[str, ...]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items) frames of the ``scale`` generator (module docstring), ids as strings.

    An item's genre is ``genres[topic mod len(genres)]`` (a public, readable trace of its topic).
    """
    if users < 1 or items < 10:
        raise DataError(f"A synthetic data set needs at least 1 user and 10 items (got {users} and {items}).")
    rng = np.random.default_rng(seed)
    k = min(spec.rank, items)

    # ---- items: popularity and topic
    pop_rank = rng.permutation(items) + 1
    weight = pop_rank.astype(np.float64) ** -spec.zipf  # (I,)
    topic_size = rng.lognormal(0.0, 0.5, k)
    topic = rng.choice(k, size=items, p=topic_size / topic_size.sum())  # (I,)
    topic[rng.permutation(items)[:k]] = np.arange(k)  # every topic has at least one item
    by_topic = np.lexsort((np.arange(items), topic))  # items grouped by topic
    w_sorted = weight[by_topic]
    t_sorted = topic[by_topic]
    starts = np.searchsorted(t_sorted, np.arange(k))
    ends = np.searchsorted(t_sorted, np.arange(k), side="right")
    within = np.cumsum(w_sorted)
    before = np.concatenate([[0.0], within])[starts]  # (K,) mass before each topic's block
    total = within[ends - 1] - before  # (K,)
    within_cum = (within - before[t_sorted]) / total[t_sorted]  # (I,) in (0, 1] within each topic
    global_cum = np.cumsum(weight) / weight.sum()  # (I,)

    # ---- users: count and topic mixture
    hi = max(spec.min_per_user, int(10 * spec.per_user))
    n_u = np.clip(np.round(rng.lognormal(np.log(spec.per_user), 0.45, users)), spec.min_per_user, hi)
    n_u = np.minimum(n_u.astype(np.int64), items)
    # Topics have a long-tailed popularity too: topic t's Dirichlet weight ∝ (t + 1)^−topic_zipf, scaled
    # to mean alpha (a few broad tastes many users share, many niches; topic ids carry no other meaning).
    base = np.arange(1, k + 1, dtype=np.float64) ** -spec.topic_zipf
    mix = rng.gamma(spec.alpha * base / base.mean(), 1.0, (users, k))  # (U, K) Dirichlet once normalised
    empty = mix.sum(axis=1) <= 0  # every draw underflowed (tiny alpha): one random topic
    mix[np.flatnonzero(empty), rng.integers(0, k, int(empty.sum()))] = 1.0
    mix_cum = np.cumsum(mix / mix.sum(axis=1, keepdims=True), axis=1)  # (U, K)
    mix_cum[:, -1] = 1.0

    # ---- draws: 1.5·n_u + 4 per user, deduplicated, the first n_u distinct ones kept (in order)
    d_u = (np.ceil(1.5 * n_u) + 4).astype(np.int64)
    user = np.repeat(np.arange(users), d_u)  # (D,)
    d = len(user)
    from_topic = rng.random(d) >= spec.noise
    t = _inverse_cdf(mix_cum, user[from_topic], rng.random(int(from_topic.sum())))
    item = np.empty(d, dtype=np.int64)
    pos = np.searchsorted(within_cum + t_sorted, t + rng.random(len(t)) * (1.0 - 1e-12), side="right")
    item[from_topic] = by_topic[np.minimum(pos, ends[t] - 1)]
    g = ~from_topic
    item[g] = np.minimum(np.searchsorted(global_cum, rng.random(int(g.sum())), side="right"), items - 1)
    # first occurrence of each (user, item), then at most n_u per user, in draw order
    key = user * items + item
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(d, dtype=bool)
    keep[first] = True
    user, item = user[keep], item[keep]
    rank_in_user = np.arange(len(user)) - np.searchsorted(user, user)  # 0, 1, … within each user
    keep = rank_in_user < n_u[user]
    user, item, rank_in_user = user[keep], item[keep], rank_in_user[keep]
    start = _T0 + rng.integers(0, _YEAR, users)
    ts = start[user] + rank_in_user * 3_600 + rng.integers(0, 3_600, len(user))

    inter = pd.DataFrame(
        {
            "user": (user + 1).astype(str),
            "item": (item + 1).astype(str),
            "rating": np.full(len(user), np.nan),
            "timestamp": ts.astype(np.int64),
        }
    ).astype({"user": "str", "item": "str"})
    item_ids = np.arange(1, items + 1).astype(str)
    item_frame = pd.DataFrame(
        {
            "title": [f"Synthetic item {i}" for i in item_ids],
            "genres": np.array(genres)[topic % len(genres)],
            "year": np.zeros(items, dtype=np.int64),
        },
        index=pd.Index(item_ids, name="item", dtype="str"),
    )
    return inter, item_frame

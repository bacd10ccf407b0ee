"""Top-K for arbitrary histories: the path shared by ``fedrec recommend`` and ``fedrec serve``.

The item side of the model is precomputed once at load; a request then costs one batched pass over
the catalogue (``HistoryMLP.score_all``), masking of seen/excluded items to -inf, and a top-K.
Many histories are scored in one call, in chunks of at most ``PAIR_BUDGET`` (user, item) pairs so the
MLP's (rows × items × h1) activations stay cache-sized on large catalogues.

Candidate generation + re-rank (``candidates`` C > 0, MLP models only): the exact pass runs the MLP
over every item, N × (h1·h2 + …) multiply-adds per request. With C > 0 a linear retrieval score,
u·r_i + a_i (the model's logit linearized in the user vector: its dot-product and bias terms exactly,
the MLP by its value and slope at the mean item vector; ``HistoryMLP.retrieval_side``), one (d × N)
product per request, ranks the catalogue; the C best items not seen or excluded are kept
(``argpartition``, O(N)) and the MLP scores only those. The final top-K / MMR / explanations then run
on the C re-ranked items exactly as on the full catalogue. It is approximate: an item the MLP would
rank high but the retrieval score ranks below C is missed (docs/BENCHMARKS.md measures the overlap
with the exact top-10). C = 0 is the exact pass; C ≥ N re-ranks every unmasked item and gives the exact top-K.

``candidates=None`` (``--candidates auto``) on an MLP of ≥ 800 items checks at load: it ranks 128 drawn
histories exactly and with C = 200 (then 500, 1 000; each only if ≤ N/4) and keeps the smallest C whose
top-10 holds ≥ 99 % of the exact one; if none does, the exact pass up to 5 000 items, else the best C.
What it measured is :attr:`Recommender.auto_check` (``/healthz`` shows it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec.shared_model.artifacts import LoadedModel
from fedrec.shared_model.diversity import mmr
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.mlp_kernel import MLPKernel
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.ranking import mask_items, top_k
from fedrec.shared_model.training import pad_rows

#: Most (user, item) pairs scored per model call: 16 ml-100k users (1 682 items), or one user of a
#: 40k catalogue at a time (more rows only add memory traffic there).
PAIR_BUDGET = 1 << 15
#: ``--candidates auto``: catalogues up to this size are ranked exactly unless a candidate re-rank is
#: verified on the loaded model to give the exact top-10 (:func:`auto_candidates`) …
AUTO_EXACT_MAX_ITEMS = 5_000
#: … larger ones by the MLP re-ranking this many candidates of the linearized retrieval score (or more,
#: see :data:`AUTO_TRIES`): at 200 the re-rank held 99.9-100 % of the exact top-10 on the trained
#: ml-100k and 41k-item models (87 % on an untrained random-weight 40k MLP, the worst case) and served
#: 1.7-2.7x the reference at 41k items (docs/BENCHMARKS.md, serve).
AUTO_CANDIDATES = 200
#: Candidate counts ``auto`` tries, smallest first; one is used only if it is at most a quarter of the
#: catalogue (a re-rank of more saves too little over the exact pass).
AUTO_TRIES = (AUTO_CANDIDATES, 500, 1_000)
#: The mean share of the exact top-10 a re-rank must keep on the load-time check to be picked.
AUTO_MIN_OVERLAP = 0.99
#: Histories of the load-time check: 20 items each, drawn long-tailed (p ∝ rank^-0.8) over the catalogue.
AUTO_CHECK_ROWS, AUTO_CHECK_ITEMS = 128, 20


@dataclass(frozen=True)
class AutoCheck:
    """What ``--candidates auto`` measured at load: overlap@10 with the exact top-10 per count tried."""

    rows: int
    overlaps: dict[int, float]
    picked: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "overlap@10": {str(c): round(v, 4) for c, v in self.overlaps.items()},
            "picked": self.picked,
            "reason": self.reason,
        }


def parse_candidates(text: str) -> int | None:
    """``--candidates`` value: ``auto`` → None (see :func:`resolve_candidates`), else an integer ≥ 0."""
    t = text.strip().lower()
    if t == "auto":
        return None
    if not t.isdigit():
        raise FedrecError(
            f"--candidates must be 'auto' or an integer ≥ 0 (0 = exact ranking of the whole catalogue), "
            f"got {text!r}"
        )
    return int(t)


def resolve_candidates(candidates: int | None, n_items: int) -> int:
    """How many candidates the MLP re-ranks (0 = exact): ``None`` (auto) picks by catalogue size only
    (the :class:`Recommender` refines auto by a load-time check, :func:`auto_candidates`)."""
    if candidates is None:
        return 0 if n_items <= AUTO_EXACT_MAX_ITEMS else AUTO_CANDIDATES
    if candidates < 0:
        raise FedrecError(f"candidates must be ≥ 0 (0 = exact), got {candidates}")
    return candidates


def check_histories(n_items: int, rows: int = AUTO_CHECK_ROWS, seed: int = 0) -> list[np.ndarray]:
    """The load-time check's histories: ``rows`` × 20 distinct items drawn with p ∝ (i+1)^-0.8 (the
    long-tailed draws of ``fedrec bench serve`` and scripts/measure_candidates.py), seeded."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    p /= p.sum()
    size = min(AUTO_CHECK_ITEMS, n_items)
    return [rng.choice(n_items, size, replace=False, p=p) for _ in range(rows)]


@dataclass(frozen=True)
class Ranked:
    """Masked scores of each row's items, ready for a top-K or MMR (one row per history).

    Exact ranking: ``scores`` (B, N), column j is item j (``items`` None). Candidate re-rank:
    ``scores`` (B, C) of the items ``items`` (B, C), ascending item index per row (so the ties rule of
    ``top_k``, lower item index first, is the catalogue's), -1 / -inf where a row has fewer than C
    items left after masking. Masked (seen/excluded) items are -inf or absent: never returned.
    """

    scores: np.ndarray
    items: np.ndarray | None = None

    def top(self, k: int, rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``top_k`` of the given rows (all by default) as dense item indices (-1 pads) and scores."""
        s = self.scores if rows is None else self.scores[list(rows)]
        idx, sc = top_k(s, k)
        if self.items is not None:
            it = self.items if rows is None else self.items[list(rows)]
            idx = np.where(idx >= 0, np.take_along_axis(it, np.maximum(idx, 0), 1), -1)
        return idx, sc

    def mmr(
        self, row: int, unit_vecs: np.ndarray, k: int, diversity: float, vec_rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`mmr` of one row; ``unit_vecs``/``vec_rows`` are the catalogue's (see ``mmr``)."""
        if self.items is None:
            return mmr(self.scores[row], unit_vecs, k, diversity, vec_rows)
        items = np.maximum(self.items[row], 0)  # (C,) padding columns are -inf: never picked
        pos, sc = mmr(
            self.scores[row], unit_vecs, k, diversity, items if vec_rows is None else vec_rows[items]
        )
        return items[pos], sc


@dataclass(frozen=True)
class Recommendation:
    items: np.ndarray  # (k,) dense item indices, best first
    scores: np.ndarray  # (k,) logits


def now_context() -> np.ndarray:
    """(hour, weekday) of the current UTC time — the context a live request is scored in."""
    t = time.gmtime()
    return np.array([t.tm_hour, t.tm_wday], dtype=np.int64)


def _contexts(context: np.ndarray | None, n: int) -> np.ndarray:
    """(n, 2) int64 (hour, weekday) rows: now, one context for every row (2,), or one per row (n, 2)."""
    c = np.asarray(now_context() if context is None else context, dtype=np.int64)
    if c.ndim == 1:
        return np.tile(c, (n, 1))
    assert c.shape == (n, 2), f"context must be (2,) or ({n}, 2), got {c.shape}"
    return c


class Recommender:
    """A loaded model ready to rank: item side cached, one code path for every caller."""

    def __init__(
        self, loaded: LoadedModel, *, candidates: int | None = 0, retrieval_model: HistoryMLP | None = None
    ) -> None:
        """``candidates``: how many items the MLP re-ranks (0 = all: exact; None = auto by catalogue
        size, see :func:`resolve_candidates`). Item-release models are always ranked exactly (their
        scoring is already one sparse-row product, no MLP per item). ``retrieval_model``: the fp32
        model the retrieval tables are derived from when ``loaded`` holds an int8 copy (no gradient).
        """
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.catalog = loaded.catalog
        self.index = loaded.catalog.index_of()
        # The MLP's per-item precomputation (item models ignore it: theirs would be N × support floats).
        self._item_side: Any = self.model.item_side() if isinstance(self.model, HistoryMLP) else None
        self.rows_per_call = max(1, PAIR_BUDGET // self.catalog.n_items)
        self._n_feats = len(self.model.cfg.user_cardinalities)
        n_items = self.catalog.n_items
        is_mlp = isinstance(self.model, HistoryMLP)
        tries = [c for c in AUTO_TRIES if 4 * c <= n_items] if candidates is None and is_mlp else []
        self.candidates = resolve_candidates(candidates, n_items) if is_mlp else 0
        self._retrieval: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.candidates or tries:
            src = retrieval_model if retrieval_model is not None else self.model
            assert isinstance(src, HistoryMLP)
            self._retrieval = src.retrieval_side(src.item_side())
        # The same arithmetic without nn.Module calls (fp32 Linear/ReLU MLPs; None: the torch path).
        self._kernel = (
            MLPKernel.build(self.model, self._item_side, loaded.sampling.max_eval_history)
            if isinstance(self.model, HistoryMLP) and self._item_side is not None
            else None
        )
        #: ``--candidates auto`` on an MLP large enough for a re-rank: what the load-time check measured.
        self.auto_check: AutoCheck | None = self._auto_check(tries) if tries else None
        if self.auto_check is not None:
            self.candidates = self.auto_check.picked
            if not self.candidates:
                self._retrieval = None

    def _auto_check(self, tries: Sequence[int]) -> AutoCheck:
        """``--candidates auto``: the smallest count in ``tries`` whose re-rank keeps ≥ AUTO_MIN_OVERLAP of
        the exact top-10 on :func:`check_histories`; none → exact up to AUTO_EXACT_MAX_ITEMS items, else
        the count with the best overlap (the exact pass is too slow to serve there)."""
        n_items = self.catalog.n_items
        rows = AUTO_CHECK_ROWS if n_items <= AUTO_EXACT_MAX_ITEMS else AUTO_CHECK_ROWS // 2
        hists = check_histories(n_items, rows)
        ctx = np.tile(np.array([12, 3], dtype=np.int64), (rows, 1))
        exact = Ranked(mask_items(self.scores(hists, ctx), hists, None)).top(10)[0]  # (rows, 10)
        overlaps: dict[int, float] = {}
        picked, reason = -1, ""
        for c in sorted(tries):
            got = self._rerank(hists, None, ctx, c).top(10)[0]
            overlaps[c] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)]))
            if overlaps[c] >= AUTO_MIN_OVERLAP:
                picked = c
                reason = f"re-rank of {c} keeps {overlaps[c]:.3f} of the exact top-10 (≥ {AUTO_MIN_OVERLAP})"
                break
        if picked < 0:
            best = max(overlaps, key=lambda k: (overlaps[k], -k))
            if n_items <= AUTO_EXACT_MAX_ITEMS:
                picked = 0
                reason = (
                    f"no re-rank keeps {AUTO_MIN_OVERLAP} of the exact top-10 (best {overlaps[best]:.3f})"
                )
            else:
                picked = best
                reason = (
                    f"no re-rank keeps {AUTO_MIN_OVERLAP} of the exact top-10; {best} keeps {overlaps[best]:.3f} "
                    f"(exact ranking of {n_items} items is too slow to serve; pass --candidates 0 to force it)"
                )
        return AutoCheck(rows=rows, overlaps=overlaps, picked=picked, reason=reason)

    def to_indices(self, ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Map original item ids to dense indices; returns (known indices, unknown ids)."""
        known, unknown = [], []
        for x in ids:
            j = self.index.get(str(x).strip())
            if j is None:
                unknown.append(str(x))
            else:
                known.append(j)
        return np.asarray(known, dtype=np.int64), unknown

    def scores(self, histories: Sequence[np.ndarray], context: np.ndarray | None = None) -> np.ndarray:
        """Raw scores (B, n_items) for dense-index histories (most recent items last)."""
        cap = self.loaded.sampling.max_eval_history
        n = len(histories)
        ctx = _contexts(context, n)  # (B, 2)
        out = np.empty((n, self.catalog.n_items), dtype=np.float32)  # (B, N)
        if self._kernel is not None:
            with torch.inference_mode():
                for a in range(0, n, self.rows_per_call):
                    b = min(n, a + self.rows_per_call)
                    out[a:b] = self._kernel.score_all(histories[a:b], ctx[a:b])
            return out
        feats = torch.zeros((n, self._n_feats), dtype=torch.int64)  # unknown demographics
        with torch.inference_mode():
            for a in range(0, n, self.rows_per_call):
                b = min(n, a + self.rows_per_call)
                hist = pad_rows([np.asarray(h)[-cap:] for h in histories[a:b]], self.catalog.n_items)
                s = self.model.score_all(
                    torch.from_numpy(hist), feats[a:b], torch.from_numpy(ctx[a:b]), self._item_side
                )
                out[a:b] = s.numpy()
        return out

    def rank_scores(
        self,
        histories: Sequence[np.ndarray],
        exclude: Sequence[np.ndarray] | None = None,
        context: np.ndarray | None = None,
        *,
        min_candidates: int = 0,
    ) -> Ranked:
        """Masked scores for a top-K: every item (exact) or the re-ranked candidates (module docstring).

        ``exclude``: one array of dense indices per history, never recommended (like the history).
        ``min_candidates``: at least this many candidates (a request's k, or its MMR pool).
        """
        if exclude is not None and len(exclude) == 0:
            exclude = None
        if self.candidates == 0:
            s = self.scores(histories, context)
            return Ranked(mask_items(s, histories, exclude))
        return self._rerank(histories, exclude, context, max(self.candidates, min_candidates))

    def _rerank(
        self,
        histories: Sequence[np.ndarray],
        exclude: Sequence[np.ndarray] | None,
        context: np.ndarray | None,
        n_cand: int,
    ) -> Ranked:
        assert isinstance(self.model, HistoryMLP) and self._retrieval is not None
        cap = self.loaded.sampling.max_eval_history
        n, n_items = len(histories), self.catalog.n_items
        c = min(n_cand, n_items)
        ctx = _contexts(context, n)  # (B, 2)
        kern = self._kernel
        feats = torch.zeros((n, self._n_feats), dtype=torch.int64) if kern is None else None  # unknown
        items = np.empty((n, c), dtype=np.int64)  # (B, C)
        scores = np.empty((n, c), dtype=np.float32)  # (B, C)
        per_call = max(1, PAIR_BUDGET // c)
        with torch.inference_mode():
            for a in range(0, n, per_call):
                b = min(n, a + per_call)
                if kern is not None:
                    ku, kh1, kc = kern.user_parts([np.asarray(h) for h in histories[a:b]], ctx[a:b])
                    r = self.model.retrieval_scores(torch.from_numpy(ku), self._retrieval).numpy()  # (b, N)
                else:
                    assert feats is not None
                    hist = pad_rows([np.asarray(h)[-cap:] for h in histories[a:b]], n_items)
                    u, cv = self.model.user_parts(
                        torch.from_numpy(hist), feats[a:b], torch.from_numpy(ctx[a:b])
                    )
                    r = self.model.retrieval_scores(u, self._retrieval).numpy()  # (b, N)
                mask_items(r, histories[a:b], None if exclude is None else exclude[a:b])
                if c < n_items:
                    cand = np.argpartition(r, n_items - c, axis=1)[:, n_items - c :]  # (b, C), unordered
                else:
                    cand = np.broadcast_to(np.arange(n_items), (b - a, n_items)).copy()
                cand[r[np.arange(b - a)[:, None], cand] == -np.inf] = n_items  # masked: sorted last
                cand.sort(axis=1)
                none = cand == n_items  # (b, C) no item in this column
                short = bool(none.any())  # a row with fewer than C items left
                safe = np.where(none, 0, cand) if short else cand
                if kern is not None:
                    s = kern.score_items(ku, kh1, kc, safe)
                else:
                    s = self.model.score_items(u, cv, self._item_side, torch.from_numpy(safe)).numpy()
                items[a:b] = np.where(none, -1, cand) if short else cand
                scores[a:b] = np.where(none, -np.inf, s) if short else s
        return Ranked(scores, items)

    def recommend(
        self,
        histories: Sequence[np.ndarray],
        k: int = 10,
        exclude: Sequence[np.ndarray] | None = None,
        context: np.ndarray | None = None,
    ) -> list[Recommendation]:
        """Top-``k`` per history; history and excluded items are never recommended."""
        idx, sc = self.rank_scores(histories, exclude, context, min_candidates=k).top(k)
        out = []
        for row_i, row_s in zip(idx, sc, strict=True):
            keep = row_i >= 0
            out.append(Recommendation(items=row_i[keep], scores=row_s[keep]))
        return out

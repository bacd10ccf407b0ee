"""Top-K for arbitrary histories: the path shared by ``fedrec recommend`` and ``fedrec serve``.

The item side of the model is precomputed once at load; a request then costs one batched pass over
the catalogue (``HistoryMLP.score_all``), masking of seen/excluded items to -inf, and a top-K.
Many histories are scored in one call, in chunks of at most ``PAIR_BUDGET`` (user, item) pairs so the
MLP's (rows × items × h1) activations stay cache-sized on large catalogues.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec.shared_model.artifacts import LoadedModel
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.ranking import mask_items, top_k
from fedrec.shared_model.training import pad_rows

#: Most (user, item) pairs scored per model call: 16 ml-100k users (1 682 items), or one user of a
#: 40k catalogue at a time (more rows only add memory traffic there).
PAIR_BUDGET = 1 << 15


@dataclass(frozen=True)
class Recommendation:
    items: np.ndarray  # (k,) dense item indices, best first
    scores: np.ndarray  # (k,) logits


def now_context() -> np.ndarray:
    """(hour, weekday) of the current UTC time — the context a live request is scored in."""
    t = time.gmtime()
    return np.array([t.tm_hour, t.tm_wday], dtype=np.int64)


class Recommender:
    """A loaded model ready to rank: item side cached, one code path for every caller."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.catalog = loaded.catalog
        self.index = loaded.catalog.index_of()
        # The MLP's per-item precomputation (item models ignore it: theirs would be N × support floats).
        self._item_side: Any = self.model.item_side() if isinstance(self.model, HistoryMLP) else None
        self.rows_per_call = max(1, PAIR_BUDGET // self.catalog.n_items)
        self._n_feats = len(self.model.cfg.user_cardinalities)

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
        ctx = np.tile(now_context() if context is None else context, (n, 1))  # (B, 2)
        feats = torch.zeros((n, self._n_feats), dtype=torch.int64)  # unknown demographics
        out = np.empty((n, self.catalog.n_items), dtype=np.float32)  # (B, N)
        with torch.inference_mode():
            for a in range(0, n, self.rows_per_call):
                b = min(n, a + self.rows_per_call)
                hist = pad_rows([np.asarray(h)[-cap:] for h in histories[a:b]], self.catalog.n_items)
                s = self.model.score_all(
                    torch.from_numpy(hist), feats[a:b], torch.from_numpy(ctx[a:b]), self._item_side
                )
                out[a:b] = s.numpy()
        return out

    def recommend(
        self,
        histories: Sequence[np.ndarray],
        k: int = 10,
        exclude: Sequence[np.ndarray] | None = None,
        context: np.ndarray | None = None,
    ) -> list[Recommendation]:
        """Top-``k`` per history; history and excluded items are never recommended."""
        s = self.scores(histories, context)
        masks = (
            [np.concatenate([h, e]) for h, e in zip(histories, exclude, strict=True)]
            if exclude
            else list(histories)
        )
        mask_items(s, masks)
        idx, sc = top_k(s, k)
        out = []
        for row_i, row_s in zip(idx, sc, strict=True):
            keep = row_i >= 0
            out.append(Recommendation(items=row_i[keep], scores=row_s[keep]))
        return out

"""Diversity by maximal marginal relevance (MMR) re-ranking of the model's candidates.

Given the masked scores of one user, take the ``pool`` best items, min–max normalise their scores
to rel ∈ [0, 1], and pick K items greedily:

    next = argmax_{i ∉ S}  (1 − λ) · rel(i) − λ · max_{j ∈ S} cos(v_i, v_j)

with λ = ``diversity`` ∈ [0, 1] and v the item vectors (genre multi-hots, or the model's item
embeddings for a catalogue without genres). λ = 0 is the plain top-K; λ = 1 picks the most
dissimilar items among the pool. Masked (seen/excluded) items are never in the pool.
"""

from __future__ import annotations

import numpy as np

from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.evaluate import Scorer
from fedrec.shared_model.metrics import intra_list_diversity
from fedrec.shared_model.ranking import mask_items, top_k


def unit_rows(vecs: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (similarity 0 with everything)."""
    v = np.asarray(vecs, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)  # (N, 1)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def pool_size(k: int) -> int:
    """Candidates MMR chooses among: enough to diversify, few enough to keep a request cheap."""
    return max(50, 5 * k)


def mmr(
    scores: np.ndarray,
    unit_vecs: np.ndarray,
    k: int,
    diversity: float,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MMR top-``k`` of one row of masked scores (N,), with unit item vectors (N, G).

    ``rows`` (N,), when given, maps item i to its vector ``unit_vecs[rows[i]]`` (R, G): a large
    catalogue whose items mostly share one vector (e.g. zero outside a model's support) then needs
    R rows, not N. Returns (items (≤k,), their scores (≤k,)) in MMR order; -inf items never appear.
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    n_vecs = scores.shape[0] if rows is None else rows.shape[0]
    assert scores.ndim == 1 and n_vecs == scores.shape[0], (
        f"scores (N,) and unit_vecs (N, G) (or rows (N,)) must agree, got {scores.shape} and {n_vecs}"
    )
    idx, sc = top_k(scores[None, :], pool_size(k) if diversity > 0 else k)
    keep = idx[0] >= 0
    cand, cand_s = idx[0][keep], sc[0][keep]  # (P,), best first
    if diversity == 0.0 or len(cand) <= 1:
        return cand[:k], cand_s[:k]
    span = float(cand_s[0] - cand_s[-1])
    rel = (cand_s - cand_s[-1]) / span if span > 0 else np.ones(len(cand))  # (P,) in [0, 1]
    vecs = unit_vecs[cand if rows is None else rows[cand]]  # (P, G)
    sims = vecs @ vecs.T  # (P, P) cosine
    max_sim = np.zeros(len(cand))  # (P,) max similarity to the chosen
    chosen: list[int] = []
    free = np.ones(len(cand), dtype=bool)
    for _ in range(min(k, len(cand))):
        gain = np.where(free, (1.0 - diversity) * rel - diversity * max_sim, -np.inf)
        best = int(np.argmax(gain))  # ties → the more relevant (earlier) candidate
        chosen.append(best)
        free[best] = False
        max_sim = np.maximum(max_sim, sims[best])
    sel = np.asarray(chosen, dtype=np.int64)
    return cand[sel], cand_s[sel]


def evaluate_mmr(
    scorer: Scorer,
    split: UserSplit,
    catalog: Catalog,
    *,
    diversity: float,
    k: int = 10,
    which: str = "test",
    batch_size: int = 512,
) -> dict[str, float]:
    """HR@k and intra-list diversity (over genres) of MMR top-k lists, full ranking protocol.

    Same users, histories and masking as :func:`fedrec.shared_model.evaluate.evaluate`; only the top-k
    selection differs, so at ``diversity=0`` the HR@k is evaluate's (up to score ties).
    """
    held = split.test_item if which == "test" else split.val_item  # (n_users,)
    users = np.flatnonzero(held >= 0)
    vecs = unit_rows(catalog.genres)
    hits, ild, n = 0.0, 0.0, 0
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]  # (B,)
        histories = [split.eval_history(int(u), which) for u in batch]
        scores = np.array(scorer.score(split, batch, histories, which), dtype=np.float32, copy=True)
        mask_items(scores, histories)
        lists = np.full((len(batch), k), -1, dtype=np.int64)  # (B, k), -1 = padding
        for b in range(len(batch)):
            items, _ = mmr(scores[b], vecs, k, diversity)
            lists[b, : len(items)] = items
            hits += float(held[batch[b]] in items)
        ild += float(intra_list_diversity(lists, catalog.genres).sum())
        n += len(batch)
    return {f"hr@{k}": hits / max(n, 1), f"ild@{k}": ild / max(n, 1), "users": float(n)}

"""The MLP initialised from a DP item release (issue 16, item 2): post-processing, no extra ε.

With ``release-init`` = s > 0 (approach ``mlp``), round 1 of the run is one item release per tenant
(``fedrec.privacy.gram``, popularity and Gram, ρ = :data:`POP_SHARE`), calibrated by each tenant
ALONE to s·cap and charged and logged before it leaves the tenant; the DP-SGD rounds that follow are
calibrated on the rest (the accountant composes the release segment (σ_rel, q = 1, 1 step) with
them, so the total stays within the cap). From the server's sum of the releases — post-processing
only — the global model gets:

* a fixed per-item log-prior ``log_prior(p̃, s_pop) + log(N / negatives)`` (``fedrec.shared_model.priors``):
  the model starts ranking like DP popularity;
* item embeddings = the top ≤ d EigenGram components of the noisy Gram above its noise edge, each
  scaled by √shrink, rows of the support scaled to mean L2 norm :data:`EMB_NORM` (others 0). They
  stay FROZEN: DP-SGD then trains only the small rest (MLP, genre projection, user-feature and context
  embeddings), so its noise is spread over ~5 k parameters instead of ~60 k; with the dot term the
  model starts at prior + a (scaled) EigenGram score, and the output layer starts at 0;
* or, with ``release-init-items ease``, DP-EASE's item–item model of the same release as a frozen
  history table and a frozen candidate-side table (:func:`ease_tables`): the dot term is then DP-EASE's
  score of the history (over its length).

Nothing here sees a user: the inputs are the summed release and the public noise figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.privacy import gram
from fedrec.server.release import release_problem
from fedrec.shared_model import item_text
from fedrec.shared_model.codec import Weights
from fedrec.shared_model.data import Catalog
from fedrec.shared_model.dp_item import DPEASERule, EigenGram, _shrink
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import ModelConfig
from fedrec.shared_model.priors import log_prior
from fedrec.shared_model.runconfig import RunConfig
from fedrec.shared_model.training import SamplingConfig

#: ρ of the initialising release: half the sensitivity to popularity (the prior), half to the Gram.
POP_SHARE = 0.5
#: Mean L2 norm of the initialised item embeddings on the Gram's support.
EMB_NORM = 1.0


#: Where the frozen item table comes from: the release's EigenGram vectors (DP, post-processing), the
#: public genres (no ε), the public title-text embeddings (``fedrec.shared_model.item_text``, no ε),
#: blocks side by side in the order named (genres first; each later block fills the width left), or
#: ``ease``: DP-EASE's item–item model of the same release written as two frozen tables
#: (:func:`ease_tables`; the model needs ``cand_table``).
ITEM_SOURCES: tuple[str, ...] = ("eigen", "genres", "genres+eigen", "text", "genres+text", "ease")


@dataclass
class InitTables:
    """What the global model gets from the summed release (post-processing, no ε)."""

    emb: np.ndarray  # (n, dim) float32: the frozen item table (history and candidate side)
    prior: np.ndarray  # (n,) float32: the fixed per-item log-prior
    facts: dict[str, Any]  # JSON facts for rounds.jsonl
    candidate: np.ndarray | None = None  # (n, dim) float32: the candidate-side table (``ease`` only)


def init_model_config(
    base: ModelConfig,
    *,
    dot_mix: float | None = None,
    trainable: tuple[str, ...] = (),
    prior_negatives: bool = False,
    candidate_table: bool = False,
    item_rows: int = 0,
) -> ModelConfig:
    """The MLP trained on top of the release: fixed prior, frozen item table, no item bias, output at 0.

    ``dot_mix``: a learned weight on the dot term, started there, with the genre projection, user-feature
    and context embeddings started at 0 (the model then starts at prior + dot_mix · u·v).
    ``trainable``: the only modules DP-SGD trains (the rest keep their initial values).
    ``prior_negatives``: training negatives drawn from the DP prior (``ModelConfig.prior_negatives``).
    ``candidate_table``: a frozen candidate-side table too (``ModelConfig.cand_table``; the ``ease`` table).
    ``item_rows``: M > 0 trains a delta on the rows of M items only (``ModelConfig.item_rows``; the server
    picks them from the release's DP popularity, :func:`row_selection`).
    """
    return replace(
        base,
        fixed_prior=True,
        freeze_item_emb=True,
        zero_init_output=True,
        item_bias=False,
        dot_mix=dot_mix,
        zero_init_side=dot_mix is not None,
        trainable=trainable,
        prior_negatives=prior_negatives,
        cand_table=candidate_table,
        item_rows=item_rows,
    )


def row_selection(prior: np.ndarray, rows: int) -> np.ndarray:
    """The ``rows`` items whose embedding rows DP-SGD trains (DP-FEST-style sparsity): the top of the
    release's DP popularity prior, ties by item index. Post-processing of the release: no extra ε."""
    order = np.argsort(-np.asarray(prior, dtype=np.float64), kind="stable")
    return np.sort(order[: int(rows)])


def release_keys(pop_share: float) -> tuple[str, ...]:
    """The arrays an initialising release of popularity share ``pop_share`` holds."""
    return tuple(k for k, on in (("popularity", pop_share > 0), ("gram", pop_share < 1)) if on)


def init_shapes(n_items: int, pop_share: float = POP_SHARE) -> dict[str, tuple[int, ...]]:
    """The shape of each array an initialising release over ``n_items`` items holds."""
    sizes = {"popularity": (n_items,), "gram": (n_items * (n_items + 1) // 2,)}
    return {k: sizes[k] for k in release_keys(pop_share)}


def init_problem(
    weights: Weights, n_items: int, users: int, max_users: int | None, pop_share: float = POP_SHARE
) -> str | None:
    """Why a tenant's initialising release must not be summed, or None (it holds the parts ρ asks for)."""
    return release_problem(weights, init_shapes(n_items, pop_share), users, max_users)


def genre_embeddings(genres: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) public item vectors: each item's genre multi-hot scaled to unit L2 norm (items without a
    genre: 0), in the first columns. Public data only: no ε."""
    n, k = genres.shape
    if k > dim:
        raise FedrecError(f"{k} genres do not fit in embedding width {dim}; raise dim")
    g = np.asarray(genres, dtype=np.float64)
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    emb = np.zeros((n, dim), dtype=np.float64)
    emb[:, :k] = np.divide(g, norm, out=np.zeros_like(g), where=norm > 0)
    return emb


def _release_prior(
    total: dict[str, np.ndarray], n_items: int, noise: gram.ReleaseNoise, sigma_sum: float
) -> np.ndarray:
    """The model's fixed per-item log-prior from the summed popularity part (floored at one noise std),
    offset by log(N / negatives)."""
    pop_std = noise.pop_std() if sigma_sum > 0 else 0.0
    prior = log_prior(np.asarray(total["popularity"], dtype=np.float64), pop_std)
    return prior + math.log(n_items / SamplingConfig().negatives)


def ease_tables(
    gram_sum: np.ndarray, *, users: int, offdiag_std: float, diag_std: float, dim: int, rule: DPEASERule
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """DP-EASE's model of a (noisy, summed) Gram as frozen tables: (support items, history rows h (M, k),
    candidate scales a (M,), facts), k ≤ ``dim``.

    DP-EASE (``fedrec.shared_model.dp_item.DPEASE``, denoised) keeps the eigencomponents (v_k, η_k) of the
    support's Gram above the noise edge, shrunk, and solves EASE with ridge λ: P = (Ĝ + λI)⁻¹ =
    (I − Σ_k c_k v_k v_kᵀ)/λ with c_k = η_k/(η_k + λ), and B_ij = −P_ij/P_jj. So for i ≠ j

        B_ij = h_i·h_j · a_j,   h_i = (√c_k · v_ik)_k,   a_j = 1 / (1 − Σ_k c_k v_jk²)

    — a dot product of one table, times a per-candidate scale. The model reads it as a history table h
    and a candidate table a_j·h_j (``ModelConfig.cand_table``): its dot term is then the EASE score of
    the user's history over n (it averages the history), exactly when every kept component fits in
    ``dim`` (else the top ``dim`` by c_k, with a_j still from all of them). Both are scaled by one α
    so that the mean self-affinity a_j·‖αh_j‖² over the support is 1 (a fixed scale, so the start value
    of the dot term's weight, ``AUTO_EASE``, means the same for every release). Without noise
    (``offdiag_std`` 0) every component with η > 0 is kept: plain EASE.
    """
    support = rule.support(np.diag(gram_sum), diag_std)
    m = len(support)
    a = gram_sum[np.ix_(support, support)].astype(np.float64)
    vals, vecs = np.linalg.eigh(0.5 * (a + a.T))  # ascending
    lam = rule.lam_per_user * max(users, 1)
    if offdiag_std > 0:
        keep = vals > 2.0 * offdiag_std * math.sqrt(m)
        eta = _shrink(vals[keep], offdiag_std * math.sqrt(m), "soft")
    else:
        keep = vals > 0
        eta = vals[keep]
    v = vecs[:, keep]  # (M, K)
    c = eta / (eta + lam)  # (K,) ascending with η
    scale = 1.0 / np.maximum(1.0 - (v * v) @ c, 1e-12)  # (M,) a_j = λ P_jj⁻¹
    k = min(dim, v.shape[1])
    h = v[:, v.shape[1] - k :] * np.sqrt(c[v.shape[1] - k :])[None, :]  # the top k
    self_aff = float((scale * (h * h).sum(1)).mean()) if k else 0.0
    if self_aff > 0:
        h = h / math.sqrt(self_aff)
    facts = {
        "components": int(keep.sum()),
        "used": int(k),
        "support": int(m),
        "lam": round(lam, 6),
        "candidate_scale_max": round(float(scale.max()) if m else 0.0, 4),
    }
    return support, h, scale, facts


def init_tables_from_release(
    total: dict[str, np.ndarray],
    *,
    n_items: int,
    users: int,
    sigma_sum: float,
    dim: int,
    pop_share: float = POP_SHARE,
    source: str = "eigen",
    genres: np.ndarray | None = None,
    text: np.ndarray | None = None,
) -> InitTables:
    """:func:`init_from_release` with the candidate-side table of the ``ease`` source."""
    if source != "ease":
        emb, prior, facts = init_from_release(
            total,
            n_items=n_items,
            users=users,
            sigma_sum=sigma_sum,
            dim=dim,
            pop_share=pop_share,
            source=source,
            genres=genres,
            text=text,
        )
        return InitTables(emb, prior, facts)
    if pop_share <= 0 or pop_share >= 1:
        raise FedrecError(
            "release-init item table 'ease' needs a popularity and a Gram part (0 < pop share < 1)"
        )
    noise = gram.ReleaseNoise(sigma=sigma_sum, pop_share=pop_share)
    prior = _release_prior(total, n_items, noise, sigma_sum)
    g = gram.unpack_gram(np.asarray(total["gram"], dtype=np.float64), n_items)
    support, h, scale, facts = ease_tables(
        g,
        users=users,
        offdiag_std=noise.offdiag_std() if sigma_sum > 0 else 0.0,
        diag_std=noise.diag_std() if sigma_sum > 0 else 0.0,
        dim=dim,
        rule=DPEASERule(),
    )
    emb = np.zeros((n_items, dim), dtype=np.float64)
    cand = np.zeros((n_items, dim), dtype=np.float64)
    emb[support, : h.shape[1]] = h
    cand[support, : h.shape[1]] = (scale - 1.0)[:, None] * h  # candidate vector = a_j · h_j
    return InitTables(
        emb.astype(np.float32), prior.astype(np.float32), {"source": source, **facts}, cand.astype(np.float32)
    )


def init_from_release(
    total: dict[str, np.ndarray],
    *,
    n_items: int,
    users: int,
    sigma_sum: float,
    dim: int,
    pop_share: float = POP_SHARE,
    source: str = "eigen",
    genres: np.ndarray | None = None,
    text: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(item embeddings (n, dim), log-prior (n,), facts) from the SUMMED release (natural units).

    ``sigma_sum`` is the noise multiplier of the sum (0 without DP: the exact statistics); ``pop_share``
    the release's ρ; ``source`` one of :data:`ITEM_SOURCES` (``genres`` needs the public genre matrix,
    ``text`` the public title embeddings of ``fedrec.shared_model.item_text.title_embeddings``).
    """
    if source not in ITEM_SOURCES:
        raise FedrecError(f"release-init item table must be one of {', '.join(ITEM_SOURCES)}, got {source!r}")
    if source == "ease":
        raise FedrecError(
            "release-init item table 'ease' has a candidate table: use init_tables_from_release"
        )
    if pop_share <= 0:
        raise FedrecError("the initialising release needs a popularity part (pop share > 0) for the prior")
    noise = gram.ReleaseNoise(sigma=sigma_sum, pop_share=pop_share)
    prior = _release_prior(total, n_items, noise, sigma_sum)
    emb = np.zeros((n_items, dim), dtype=np.float64)
    first = 0
    if source.startswith("genres"):
        if genres is None:
            raise FedrecError("release-init from genres needs the catalogue's genres")
        emb = genre_embeddings(genres, dim)
        first = genres.shape[1]
    facts: dict[str, Any] = {"source": source, "genre_columns": first}
    if source.endswith("text"):
        if text is None or text.shape[0] != n_items:
            raise FedrecError("release-init from title text needs the catalogue's title embeddings")
        width = dim - first
        if width < 1:
            raise FedrecError(f"no room for title text in embedding width {dim} after {first} genre columns")
        emb[:, first:] = item_text.text_table(text, width)
        facts.update({"text_columns": width, "items_with_text": int((np.abs(text).sum(axis=1) > 0).sum())})
    if source.endswith("eigen"):
        if pop_share >= 1:
            raise FedrecError(f"release-init item table {source!r} needs a Gram part (pop share < 1)")
        offdiag = noise.offdiag_std() if sigma_sum > 0 else 0.0
        diag = noise.diag_std() if sigma_sum > 0 else 0.0
        g = gram.unpack_gram(np.asarray(total["gram"], dtype=np.float64), n_items)
        eig = EigenGram(DPEASERule()).fit_gram(g, offdiag_std=offdiag, diag_std=diag, users=users)
        assert eig.vectors is not None and eig.shrink is not None and eig.items is not None
        k = min(dim - first, eig.components)
        if k:
            v = eig.vectors[:, -k:] * np.sqrt(eig.shrink[-k:])[None, :]  # eigh is ascending: the top k
            rows = EMB_NORM * v / max(float(np.linalg.norm(v, axis=1).mean()), 1e-12)
            emb[eig.items, first : first + k] = rows
        facts.update({"components": int(eig.components), "used": int(k), "support": len(eig.items)})
    return emb.astype(np.float32), prior.astype(np.float32), facts


def text_cache_dir(cfg: RunConfig) -> Path:
    """Where the title embeddings are cached: beside the public catalogue (no user data there)."""
    folder = Path(cfg.catalog).parent if cfg.catalog else Path(cfg.fed_dir)
    return folder / item_text.CACHE_DIR_NAME


def public_item_text(cfg: RunConfig, catalog: Catalog) -> np.ndarray | None:
    """The title embeddings that ``release-init-items`` text / genres+text needs (None for the others):
    the titles of ``item-titles`` (a CSV) or else the catalogue's own, embedded by the bundled sentence
    model and cached by :func:`text_cache_dir`. Public data only: no ε."""
    if not (cfg.release_init > 0 and cfg.release_init_items.endswith("text")):
        return None
    titles = (
        item_text.read_titles_file(cfg.item_titles, catalog.item_ids) if cfg.item_titles else catalog.titles
    )
    if not any(titles):
        raise FedrecError(
            f"release-init-items {cfg.release_init_items} needs item titles: the catalogue has none; "
            "give --item-titles FILE (a CSV with item and title columns)"
        )
    return item_text.title_embeddings(titles, text_cache_dir(cfg))

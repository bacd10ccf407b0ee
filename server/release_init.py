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
  model starts at prior + a (scaled) EigenGram score, and the output layer starts at 0.

Nothing here sees a user: the inputs are the summed release and the public noise figures.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.privacy import gram
from fedrec.server.release import release_problem
from fedrec.shared_model import item_text
from fedrec.shared_model.codec import Weights
from fedrec.shared_model.data import Catalog
from fedrec.shared_model.dp_item import DPEASERule, EigenGram
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
#: public genres (no ε), the public title-text embeddings (``fedrec.shared_model.item_text``, no ε), or
#: blocks side by side in the order named (genres first; each later block fills the width left).
ITEM_SOURCES: tuple[str, ...] = ("eigen", "genres", "genres+eigen", "text", "genres+text")


def init_model_config(
    base: ModelConfig,
    *,
    dot_mix: float | None = None,
    trainable: tuple[str, ...] = (),
    prior_negatives: bool = False,
) -> ModelConfig:
    """The MLP trained on top of the release: fixed prior, frozen item table, no item bias, output at 0.

    ``dot_mix``: a learned weight on the dot term, started there, with the genre projection, user-feature
    and context embeddings started at 0 (the model then starts at prior + dot_mix · u·v).
    ``trainable``: the only modules DP-SGD trains (the rest keep their initial values).
    ``prior_negatives``: training negatives drawn from the DP prior (``ModelConfig.prior_negatives``).
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
    )


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
    if pop_share <= 0:
        raise FedrecError("the initialising release needs a popularity part (pop share > 0) for the prior")
    noise = gram.ReleaseNoise(sigma=sigma_sum, pop_share=pop_share)
    pop_std = noise.pop_std() if sigma_sum > 0 else 0.0
    prior = log_prior(np.asarray(total["popularity"], dtype=np.float64), pop_std)
    prior = prior + math.log(n_items / SamplingConfig().negatives)
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

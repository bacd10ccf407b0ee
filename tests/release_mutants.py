"""Planted broken item releases for the mutation tests of ``fedrec audit --empirical``.

Each function has the signature of ``fedrec.client.task.release_message`` (the product's release) and
is injected through the audit's documented hook, ``--release-mechanism tests.release_mutants:NAME``;
nothing of the product is patched. Each breaks the mechanism in one way a real bug could:

* ``halved_noise`` — the noise std is half what σ says (e.g. σ/2 applied twice, or variance for std);
* ``unbounded_norm`` — the per-user norm bound is not enforced: rows are 0/1 instead of unit rows,
  so a user with k items moves the release by √k (×10 for the audit's 100-item canary);
* ``reused_noise`` — every second release reuses the noise of the previous one (a cached draw);
* ``config_seeded_noise`` — the noise generator is seeded from public facts (catalogue size, σ),
  so anyone can regenerate and subtract it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import scipy.sparse as sp

from fedrec.client.task import release_message
from fedrec.privacy import gram
from fedrec.shared_model.codec import Weights


def halved_noise(
    indptr: np.ndarray, items: np.ndarray, n_items: int, noise: gram.ReleaseNoise, rng: np.random.Generator
) -> Weights:
    return release_message(indptr, items, n_items, dataclasses.replace(noise, sigma=noise.sigma / 2), rng)


def _publish(rel: gram.ItemRelease) -> Weights:
    out: Weights = {}
    if rel.popularity is not None:
        out["popularity"] = rel.popularity.astype(np.float32)
    if rel.gram is not None:
        out["gram"] = gram.pack_gram(rel.gram)
    return out


def unbounded_norm(
    indptr: np.ndarray, items: np.ndarray, n_items: int, noise: gram.ReleaseNoise, rng: np.random.Generator
) -> Weights:
    x = gram.unit_rows(indptr, items, n_items)
    x = sp.csr_matrix((np.ones_like(x.data), x.indices, x.indptr), shape=x.shape)  # no 1/√n_u
    return _publish(gram.release(x, noise, rng))


_cached: dict[str, np.random.Generator] = {}


def reused_noise(
    indptr: np.ndarray, items: np.ndarray, n_items: int, noise: gram.ReleaseNoise, rng: np.random.Generator
) -> Weights:
    # Keep the state of the generator of one call and hand it to the next: both draw the same noise.
    saved = _cached.pop("state", None)
    if saved is None:
        _cached["state"] = np.random.default_rng()
        _cached["state"].bit_generator.state = rng.bit_generator.state
        use = rng
    else:
        use = saved
    return release_message(indptr, items, n_items, noise, use)


def config_seeded_noise(
    indptr: np.ndarray, items: np.ndarray, n_items: int, noise: gram.ReleaseNoise, rng: np.random.Generator
) -> Weights:
    public = f"{n_items}:{noise.sigma}:{noise.pop_share}".encode()
    seed = int.from_bytes(hashlib.sha256(public).digest()[:8], "little")
    return release_message(indptr, items, n_items, noise, np.random.default_rng(seed))

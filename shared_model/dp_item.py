"""DP-EASE: EASE fitted on a released noisy item–item Gram (``fedrec.privacy.gram``), with a fixed rule for M and λ.

The Gram ``G̃ = Σ_u x_u x_uᵀ + E`` (unit-norm user rows, symmetric Gaussian noise ``E`` with std ``s``
off the diagonal) is all the server has. Two choices make EASE work on it, both by a RULE from public
facts — the noise std (from σ, which comes from ε, δ) and the number of contributing users — never
tuned on the tenants' validation data:

* **Support (M).** Items are ranked by the noisy diagonal ``G̃_ii = Σ_u 1[i ∈ u]/n_u + noise`` and the
  model covers the items whose noisy diagonal is at least ``diag_z`` noise stds, clipped to
  ``[min_items, max_items]``: an item the noise swamps has no usable row anyway, and every extra item
  adds noise to the others' solution (and O(M³) time).
* **Denoising, then the non-private ridge** (the default, ``denoise=True``). The noise matrix of an
  M-item support has spectral norm ≈ ``edge = 2·s·√M`` (semicircle edge). ``G̃_M`` is replaced by
  ``Σ_k (λ_k − edge)·v_k v_kᵀ`` over its eigencomponents with ``λ_k > edge`` (soft-thresholding the
  spectrum at the noise edge: components the noise could have produced are dropped, the others
  shrunk by the noise's reach), and EASE runs on that with the non-private ridge
  ``λ = lam_per_user · users`` (≈ 2 at 1 000 users: the Gram's scale grows linearly with the users).
  With no noise the edge is 0 and this is exactly EASE. Measured on synthetic *validation* items
  (docs/PRIVACY_UTILITY.md) it beats the ridge rule below by 0.01–0.04 HR@10 at ≥ 10 000 users and
  ties it on ml-100k and at 1 000 users.
* **Ridge only** (``denoise=False``, the first version): ``λ = max(lam_per_user · users,
  noise_mult · 2·s·√M)`` keeps ``G̃_M + λI`` positive definite with a margin and shrinks every
  direction by the same, noise-sized amount.

The constants of :class:`DPEASERule` were set on *synthetic* data (validation split, a seed not used for
the reported figures) and are applied unchanged to every data set (see docs/PRIVACY_UTILITY.md).

Scores: binary history row times ``B`` inside the support; items outside it get
``OUT_OF_SUPPORT_SCORE`` plus, when a prior is given, the prior (so a DP popularity prior orders
them below every supported item but among themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from fedrec.shared_model.baselines import OUT_OF_SUPPORT_SCORE, _binary_rows
from fedrec.shared_model.data import UserSplit


@dataclass(frozen=True)
class DPEASERule:
    """The fixed rule that picks the support size M and the ridge λ from the noise and the users."""

    diag_z: float = 2.0  # keep items whose noisy diagonal ≥ diag_z · (diagonal noise std)
    min_items: int = 20  # never fewer items than this (the top of the noisy diagonal)
    max_items: int = 2000  # compute cap: the solve is O(M³)
    noise_mult: float = 3.0  # λ ≥ noise_mult × (spectral norm of the noise, 2·s·√M)
    lam_per_user: float = 0.002  # non-private λ per contributing user (unit-norm rows)

    def __post_init__(self) -> None:
        if self.min_items < 1 or self.max_items < self.min_items:
            raise ValueError(f"need 1 ≤ min_items ≤ max_items, got {self.min_items}, {self.max_items}")
        if self.noise_mult < 0 or self.lam_per_user <= 0 or self.diag_z < 0:
            raise ValueError("noise_mult and diag_z must be ≥ 0 and lam_per_user > 0")

    def support(self, noisy_diag: np.ndarray, diag_std: float) -> np.ndarray:
        """Item indices (ascending) of the model's support, from the noisy diagonal."""
        n = len(noisy_diag)
        order = np.lexsort((np.arange(n), -noisy_diag))  # largest first, ties → lower index
        above = int((noisy_diag >= self.diag_z * diag_std).sum()) if diag_std > 0 else n
        m = min(n, self.max_items, max(self.min_items, above))
        return np.sort(order[:m])

    def lam(self, offdiag_std: float, m: int, users: int) -> float:
        """λ from the off-diagonal noise std, the support size and the number of users."""
        return max(self.lam_per_user * max(users, 1), self.noise_mult * 2.0 * offdiag_std * math.sqrt(m))


SHRINKAGES = ("soft", "optimal")


def _shrink(vals: np.ndarray, s: float, kind: str) -> np.ndarray:
    """Denoised eigenvalues from noisy ones above the edge ``2s`` (s = off-diagonal std · √M).

    ``soft``: ``λ − 2s``. ``optimal``: for a low-rank signal plus symmetric Gaussian noise (spiked
    Wigner), an eigenvalue θ of the signal appears at ``λ = θ + s²/θ`` with its eigenvector at squared
    cosine ``1 − s²/θ²`` to the true one; the Frobenius-optimal shrinker keeps ``θ·(1 − s²/θ²)`` =
    ``θ − s²/θ`` with ``θ = (λ + √(λ² − 4s²))/2`` — 0 at the edge, ≈ ``λ − 2s²/λ`` far above it (far
    less shrinkage of the strong components than soft-thresholding).
    """
    if kind == "soft":
        return np.maximum(vals - 2.0 * s, 0.0)
    if kind == "optimal":
        theta = 0.5 * (vals + np.sqrt(np.maximum(vals * vals - 4.0 * s * s, 0.0)))
        return np.maximum(theta - s * s / np.maximum(theta, 1e-300), 0.0)
    raise ValueError(f"shrinkage must be one of {SHRINKAGES}, got {kind!r}")


def _cross_shrink(vals: np.ndarray, shrunk: np.ndarray, s: float) -> np.ndarray:
    """Per kept component of a noisy head Gram, the factor that puts a noisy cross column's projection
    on it in the units the head's denoised eigenvalue ``shrunk`` (η) is in.

    Spiked Wigner (see :func:`_shrink`): a signal eigenvalue θ appears at λ = θ + s²/θ, and its noisy
    eigenvector has cosine c = √(1 − s²/θ²) to the true one. A cross column's projection on the noisy
    vector carries c × its true coordinate, which the head's regression should divide by θ; the head's
    ridge inverse divides by η instead, so the factor is η / (c·θ) — 1 without noise, → 0 at the edge
    (where η → 0 faster than c). Without it a component just above the edge (η ≪ λ) inflates the tier's
    scores by λ/η, which on a flat-topic catalogue put tier items above better head items
    (tests/test_two_stage.py's tier run lost 0.02 HR@10 that way)."""
    theta = 0.5 * (vals + np.sqrt(np.maximum(vals * vals - 4.0 * s * s, 0.0)))
    cos = np.sqrt(np.clip(1.0 - (s / np.maximum(theta, 1e-300)) ** 2, 0.0, 1.0))
    out: np.ndarray = np.where(cos * theta > 0, shrunk / np.maximum(cos * theta, 1e-300), 0.0)
    return out


@dataclass(frozen=True)
class Spectrum:
    """What a denoised fit kept of a noisy Gram's spectrum: eigenvectors (M, k) above the edge, their
    noisy eigenvalues (k,), the shrunk ones η (k,), and s = off-diagonal std · √M."""

    vectors: np.ndarray
    vals: np.ndarray
    shrunk: np.ndarray
    s: float


@dataclass
class DPEASE:
    """EASE on a released (noisy) Gram; a :class:`fedrec.shared_model.evaluate.Scorer`."""

    rule: DPEASERule = field(default_factory=DPEASERule)
    weights: np.ndarray | None = field(default=None, repr=False)  # (M, M) float32
    items: np.ndarray | None = field(default=None, repr=False)  # (M,)
    column_of: np.ndarray | None = field(default=None, repr=False)  # (N,) column or -1
    prior: np.ndarray | None = field(default=None, repr=False)  # (N,) for out-of-support items
    lam_used: float = 0.0
    denoise: bool = True  # soft-threshold the noisy spectrum at the noise edge (module docstring)
    shrinkage: str = "soft"  # soft: λ_k − edge | optimal: θ_k − s²M/θ_k (spiked Wigner, module docstring)
    components: int = 0  # eigencomponents kept by the denoising (0: not denoised)
    tier_items: int = 0  # items scored by fit_gram_tiered's regression on the head (0: no tier)

    def fit_gram(
        self,
        gram: np.ndarray,
        *,
        offdiag_std: float,
        diag_std: float,
        users: int,
        prior: np.ndarray | None = None,
        lam: float | None = None,
        items: np.ndarray | None = None,
    ) -> DPEASE:
        """Fit on the (summed) released Gram; ``lam``/``items`` override the rule (tests, ablations)."""
        self._fit(
            gram, offdiag_std=offdiag_std, diag_std=diag_std, users=users, prior=prior, lam=lam, items=items
        )
        return self

    def _fit(
        self,
        gram: np.ndarray,
        *,
        offdiag_std: float,
        diag_std: float,
        users: int,
        prior: np.ndarray | None = None,
        lam: float | None = None,
        items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Spectrum | None]:
        """:meth:`fit_gram`'s work; returns (Ĝ + λI)⁻¹ over the support and, when the spectrum was
        denoised, what was kept of it (for :meth:`fit_gram_tiered`'s tier columns)."""
        n = gram.shape[0]
        assert gram.shape == (n, n), f"gram must be square, got {gram.shape}"
        support = self.rule.support(np.diag(gram), diag_std) if items is None else np.sort(items)
        m = len(support)
        a = gram[np.ix_(support, support)].astype(np.float64)  # (M, M)
        a = 0.5 * (a + a.T)
        self.components = 0
        spectrum = None
        if self.denoise and offdiag_std > 0 and lam is None:
            lam_v = self.rule.lam_per_user * max(users, 1)
            vals, vecs = np.linalg.eigh(a)  # ascending
            edge = 2.0 * offdiag_std * math.sqrt(m)
            keep = vals > edge
            v = vecs[:, keep]  # (M, k)
            shrunk = _shrink(vals[keep], offdiag_std * math.sqrt(m), self.shrinkage)  # (k,)
            # (Ĝ + λI)⁻¹ with Ĝ = V diag(η_k) Vᵀ: V diag(1/(η_k + λ) − 1/λ) Vᵀ + I/λ
            p = (v * (1.0 / (shrunk + lam_v) - 1.0 / lam_v)) @ v.T + np.eye(m) / lam_v
            self.components = int(keep.sum())
            spectrum = Spectrum(v, vals[keep], shrunk, offdiag_std * math.sqrt(m))
        else:
            lam_v = self.rule.lam(offdiag_std, m, users) if lam is None else float(lam)
            a[np.diag_indices(m)] += lam_v
            try:
                p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), np.eye(m))  # (M, M)
            except np.linalg.LinAlgError:  # not PD (a λ below the noise edge): the general inverse
                p = np.linalg.inv(a)
        b = -p / np.diag(p)[None, :]
        b[np.diag_indices(m)] = 0.0
        column_of = np.full(n, -1, dtype=np.int64)
        column_of[support] = np.arange(m)
        self.weights, self.items, self.column_of, self.lam_used = (
            b.astype(np.float32),
            support,
            column_of,
            lam_v,
        )
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float64)
        return p, spectrum

    def fit_gram_tiered(
        self,
        gram: np.ndarray,
        head: np.ndarray,
        *,
        offdiag_std: float,
        diag_std: float,
        users: int,
    ) -> DPEASE:
        """DP-EASE on the ``head`` block of ``gram``; every other item of it (the tier) is scored by a
        ridge regression on the head from the released head × tier block.

        The head (indices into ``gram``) is fitted exactly as :meth:`fit_gram` fits a Gram of its own —
        its own support rule and noise edge 2·s·√M_head, which a larger Gram would raise for every item.
        A tier item j gets the column ``w_j = (Ĝ_head + λI)⁻¹ P G̃[head, j]``: the ridge regression of j
        on the head items (what EASE's column is for a head item, so the two tiers' scores are in the
        same units), with the noisy column first projected (P = V diag(f) Vᵀ) onto the head's k
        eigencomponents above the noise edge — k noise dimensions of M_head kept instead of all — each
        scaled by :func:`_cross_shrink` (no projection without noise, where w_j is the exact ridge
        regression). A tier item is kept if its noisy diagonal passes the
        rule's ``diag_z`` test; it scores users by their head items only (as evidence its own noisy
        row is too weak: measured in docs/PRIVACY_UTILITY.md). Post-processing of the one release.
        """
        n = gram.shape[0]
        assert gram.shape == (n, n), f"gram must be square, got {gram.shape}"
        head = np.sort(np.asarray(head, dtype=np.int64))
        tier = np.setdiff1d(np.arange(n), head)
        inverse, spectrum = self._fit(
            gram[np.ix_(head, head)], offdiag_std=offdiag_std, diag_std=diag_std, users=users
        )
        assert self.items is not None and self.weights is not None
        h_items = head[self.items]  # the head's support, as indices into gram
        diag = np.diag(gram)[tier]
        t_items = tier[diag >= self.rule.diag_z * diag_std] if diag_std > 0 else tier
        cross = gram[np.ix_(h_items, t_items)].astype(np.float64)  # (M_head, T) noisy head × tier block
        if spectrum is not None:
            # onto the head's components above the edge, each put in its denoised eigenvalue's units:
            # V diag(f) Vᵀ G̃[head, tier], f = η/(cos·θ) (_cross_shrink)
            f = _cross_shrink(spectrum.vals, spectrum.shrunk, spectrum.s)
            cross = spectrum.vectors @ (f[:, None] * (spectrum.vectors.T @ cross))
        w = inverse @ cross  # (M_head, T)
        items = np.concatenate([h_items, t_items])
        order = np.argsort(items, kind="stable")
        k, t = len(h_items), len(t_items)
        weights = np.zeros((k + t, k + t), dtype=np.float32)
        weights[:k, :k] = self.weights
        weights[:k, k:] = w
        self.weights = np.ascontiguousarray(weights[np.ix_(order, order)])
        self.items = items[order]
        self.column_of = np.full(n, -1, dtype=np.int64)
        self.column_of[self.items] = np.arange(k + t)
        self.tier_items = t
        return self

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        if self.weights is None or self.items is None or self.column_of is None:
            raise RuntimeError("DPEASE is not fitted; call .fit_gram(...) first")
        m = len(self.items)
        x = _binary_rows(histories, self.column_of, m)  # (B, M)
        inside = x @ self.weights  # (B, M)
        out = np.full((len(histories), split.n_items), OUT_OF_SUPPORT_SCORE, dtype=np.float64)  # (B, N)
        if self.prior is not None:
            ranked = np.argsort(np.argsort(self.prior, kind="stable"), kind="stable") / len(self.prior)
            out += ranked[None, :]  # keeps the prior's order outside the support, below every item inside
        out[:, self.items] = inside
        return out


@dataclass
class EigenGram:
    """Top eigenvectors of the noisy Gram as frozen item representations (the ablation of DP-EASE).

    On the rule's support, keep the components of ``G̃_M`` whose eigenvalue exceeds ``edge_mult``
    times the noise edge ``2·s·√M`` and score ``x_h · V diag(1 − edge/λ_k) Vᵀ`` (each kept component
    shrunk by how far it clears the edge). ``components`` is how many survive — the "only components
    above the noise survive" figure of the issue. ``vectors`` (M, k) can initialise a model's item table.
    """

    rule: DPEASERule = field(default_factory=DPEASERule)
    edge_mult: float = 1.0
    vectors: np.ndarray | None = field(default=None, repr=False)  # (M, k)
    shrink: np.ndarray | None = field(default=None, repr=False)  # (k,)
    items: np.ndarray | None = field(default=None, repr=False)
    column_of: np.ndarray | None = field(default=None, repr=False)
    components: int = 0

    def fit_gram(self, gram: np.ndarray, *, offdiag_std: float, diag_std: float, users: int) -> EigenGram:
        n = gram.shape[0]
        support = self.rule.support(np.diag(gram), diag_std)
        m = len(support)
        a = gram[np.ix_(support, support)]
        vals, vecs = np.linalg.eigh(0.5 * (a + a.T))  # ascending
        edge = self.edge_mult * 2.0 * offdiag_std * math.sqrt(m)
        keep = vals > max(edge, 1e-12)
        self.vectors = vecs[:, keep]
        self.shrink = 1.0 - edge / vals[keep]
        self.components = int(keep.sum())
        self.items = support
        self.column_of = np.full(n, -1, dtype=np.int64)
        self.column_of[support] = np.arange(m)
        return self

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        if self.vectors is None or self.shrink is None or self.items is None or self.column_of is None:
            raise RuntimeError("EigenGram is not fitted; call .fit_gram(...) first")
        x = _binary_rows(histories, self.column_of, len(self.items))  # (B, M)
        inside = ((x @ self.vectors) * self.shrink[None, :]) @ self.vectors.T  # (B, M)
        out = np.full((len(histories), split.n_items), OUT_OF_SUPPORT_SCORE, dtype=np.float64)
        out[:, self.items] = inside
        return out

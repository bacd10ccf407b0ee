"""The one-shot user-level DP item release: DP popularity + noisy item–item Gram, one Gaussian mechanism.

Each user ``u`` of a tenant is a unit vector ``x_u`` over the catalogue: ``1/√n_u`` on each of the
``n_u`` distinct items of their training history (McSherry & Mironov 2009 normalise rows the same
way). A tenant publishes, ONCE, the sum over its users of

    r_u = ( √ρ · x_u ,  √(2(1−ρ)) · [x_ui·x_uj]_{i<j} ,  √(1−ρ) · [x_ui²]_i )

plus Gaussian noise ``N(0, σ²)`` on every coordinate, where ``σ`` is the noise multiplier calibrated
for (ε, δ) at L2 sensitivity 1 with ``sample_rate = 1, steps = 1`` (:func:`calibrate_release_sigma`).

Exact sensitivity. With ``s = Σ_i x_ui²`` (= 1 for a non-empty history) and ``f = Σ_i x_ui⁴``::

    ‖r_u‖² = ρ·s + 2(1−ρ)·Σ_{i<j} x_ui² x_uj² + (1−ρ)·f = ρ·s + (1−ρ)·(s² − f) + (1−ρ)·f = ρ·s + (1−ρ)·s²

so ``‖r_u‖ = 1`` for every user with a history (0 for an empty one): adding or removing one user moves
the release by exactly 1 in L2, whatever their history. Note the factor √2 on the strict upper
triangle: the symmetric Gram ``G_u = x_u x_uᵀ`` has ``‖G_u‖_F = 1``, but its *upper triangle with
the diagonal*, the vector one actually adds noise to, has norm ``√((1 + f)/2) ≤ 1`` (tight only for a
one-item user). Scaling the off-diagonal entries by √2 relative to the diagonal makes the norm
exactly ``1`` for everyone — the same guarantee with √2 less noise on every off-diagonal entry
than "noise the upper triangle at sensitivity 1".

In natural units (what the server uses after dividing the scaling back out, a post-processing):

* popularity vector ``p = Σ_u x_u``: noise std ``σ/√ρ`` per item (ρ = 1 is exactly the project's
  DP popularity release);
* Gram ``G = Σ_u x_u x_uᵀ``: noise std ``σ/√(2(1−ρ))`` off the diagonal (one draw per pair,
  mirrored), ``σ/√(1−ρ)`` on the diagonal.

Distributed noise (secure aggregation). With ``k`` tenants whose releases the server only sees
summed (SecAgg+), each tenant adds noise of variance ``σ²/k_min`` where ``k_min = k − t`` is the
number of tenants guaranteed to be honest *and* present (``t`` = tolerated colluders + dropouts).
The sum of any ``k_min`` honest contributions then carries at least one full release's noise, so
each tenant's users get the guarantee of ``σ``; if the assumptions fail (no SecAgg, or more than
``t`` colluders/dropouts), a tenant's own share still protects its users at ``σ/√k_min``. Both
figures go into the ledger (:func:`release_ledger_fields`). ``k_min = 1`` is the local mode.

Two stages (``dp_two_stage``, catalogues above the Gram limit). Stage 1 is the release above with
ρ = 1 (popularity only) at noise multiplier ``σ/√f``: it spends the share ``f`` (``select-share``, 0.1)
of the budget's μ² (Gaussian mechanisms compose by adding 1/σ²). The server keeps the top ``M`` items
of the noisy sum (:func:`select_top`, post-processing). Stage 2 is the Gram release (ρ = 0) over the
selected items only, each user's row renormalised to unit norm over the items of their history that
are in the selection (:func:`selected_rows`; sensitivity still exactly 1), at the σ that spends the
rest of the tenant's cap. Both stages are ledger entries of their own; composing them is the
accountant's job, like DP-SGD rounds. Items outside the selection are ranked by the stage-1 release.

Everything here is a pure function of its arguments (noise from the ``rng`` passed in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from fedrec.privacy.accounting import Accountant, calibrate_noise, epsilon
from fedrec.privacy.errors import BudgetError

#: Mechanism name written into the ledger entry of the release.
MECHANISM = "gaussian:item_release(popularity,gram)/unit_rows/v1"
#: The two stages of ``dp_two_stage`` (module docstring, "Two stages").
MECHANISM_SELECT = "gaussian:item_release(popularity)/unit_rows/two_stage_select/v1"
MECHANISM_SELECTED_GRAM = "gaussian:item_release(gram)/unit_rows_on_selection/two_stage/v1"


# ------------------------------------------------------------------ user rows


def unit_rows(indptr: np.ndarray, items: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Users × items CSR (float64): 1/√n_u on each of user u's n_u DISTINCT items; empty rows stay 0.

    ``indptr``/``items`` are a CSR user → item list (``UserSplit.indptr``/``train_items``).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    n_users = len(indptr) - 1
    if n_users < 0 or (len(items) and (items.min() < 0 or items.max() >= n_items)):
        raise BudgetError("unit_rows needs a CSR indptr and item indices in [0, n_items)")
    user_of = np.repeat(np.arange(n_users), np.diff(indptr))  # (nnz,)
    x = sp.csr_matrix((np.ones(len(items)), (user_of, items)), shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0  # duplicates collapse to one distinct item
    n_u = np.diff(x.indptr)  # (n_users,) distinct items
    scale = np.repeat(1.0 / np.sqrt(np.maximum(n_u, 1)), n_u)
    x.data *= scale
    return x


def selected_rows(
    indptr: np.ndarray, items: np.ndarray, n_items: int, selection: np.ndarray
) -> sp.csr_matrix:
    """Users × M unit rows over the ``selection`` (M sorted distinct item indices) only.

    A user's items outside the selection are dropped BEFORE normalising, so every user with at least
    one selected item has a row of norm exactly 1 (and the stage-2 release keeps sensitivity 1).
    """
    selection = check_selection(selection, n_items)
    items = np.asarray(items, dtype=np.int64)
    col = np.full(n_items, -1, dtype=np.int64)
    col[selection] = np.arange(len(selection))
    mapped = col[items] if len(items) else items  # (nnz,) column in the selection or -1
    keep = mapped >= 0
    indptr = np.asarray(indptr, dtype=np.int64)
    user_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))  # (nnz,)
    counts = np.bincount(user_of[keep], minlength=len(indptr) - 1)
    sub_indptr = np.concatenate([[0], np.cumsum(counts)])
    return unit_rows(sub_indptr, mapped[keep], len(selection))


def check_selection(selection: np.ndarray, n_items: int) -> np.ndarray:
    """``selection`` as sorted, distinct int64 indices in [0, n_items); a clear error otherwise."""
    sel = np.asarray(selection)
    if sel.ndim != 1 or len(sel) < 1 or not np.issubdtype(sel.dtype, np.integer):
        raise BudgetError("an item selection must be a non-empty 1-D list of item indices")
    sel = sel.astype(np.int64)
    if sel.min() < 0 or sel.max() >= n_items or np.any(np.diff(sel) <= 0):
        raise BudgetError(f"an item selection must be sorted, distinct indices in [0, {n_items})")
    return sel


def select_top(scores: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` highest-scoring items, as sorted indices: O(n) argpartition, then a sort of the m kept."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if m < 1:
        raise BudgetError(f"select at least one item, got m = {m}")
    if m >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.argpartition(-scores, m - 1)[:m]).astype(np.int64)


def stage_one_sigma(sigma: float, select_share: float) -> float:
    """σ of the selecting popularity release: σ/√f spends the share f of the μ² of a σ release."""
    if not 0 < select_share < 1:
        raise BudgetError(f"select_share must be in (0, 1), got {select_share!r}")
    return sigma / math.sqrt(select_share)


def release_vector(x: np.ndarray, pop_share: float) -> np.ndarray:
    """One user's scaled release ``r_u`` (module docstring) from their row ``x`` (n,) — the naive form.

    Order: ``√ρ·x``, then ``√(2(1−ρ))·x_i x_j`` for i < j (row-major), then ``√(1−ρ)·x_i²``. Used by
    tests to check the sensitivity against the definition; the server path never builds it.
    """
    rho = _check_share(pop_share)
    x = np.asarray(x, dtype=np.float64)
    iu = np.triu_indices(len(x), k=1)
    outer = np.outer(x, x)
    return np.concatenate(
        [math.sqrt(rho) * x, math.sqrt(2.0 * (1.0 - rho)) * outer[iu], math.sqrt(1.0 - rho) * x * x]
    )


def sensitivity(pop_share: float) -> float:
    """L2 sensitivity of the scaled release to adding/removing one user: exactly 1 (module docstring)."""
    _check_share(pop_share)
    return 1.0


# ------------------------------------------------------------------ noise


@dataclass(frozen=True)
class ReleaseNoise:
    """Noise of one tenant's release in natural units (standard deviations per entry)."""

    sigma: float  # noise multiplier of the whole mechanism (sensitivity 1), as the accountant sees it
    pop_share: float  # ρ: the share of the squared sensitivity given to the popularity vector
    shares: int = 1  # k_min: this tenant adds 1/shares of the variance (1 = local / central mode)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise BudgetError(f"sigma must be a finite number ≥ 0, got {self.sigma!r}")
        _check_share(self.pop_share)
        if isinstance(self.shares, bool) or not isinstance(self.shares, int) or self.shares < 1:
            raise BudgetError(f"shares must be an integer ≥ 1, got {self.shares!r}")

    @property
    def local_sigma(self) -> float:
        """σ of this tenant's own share: σ/√shares."""
        return self.sigma / math.sqrt(self.shares)

    def pop_std(self) -> float:
        """Noise std per item of the popularity vector (inf when ρ = 0: not released)."""
        return self.local_sigma / math.sqrt(self.pop_share) if self.pop_share > 0 else math.inf

    def offdiag_std(self) -> float:
        """Noise std of each off-diagonal Gram entry (inf when ρ = 1: no Gram released)."""
        return self.local_sigma / math.sqrt(2.0 * (1.0 - self.pop_share)) if self.pop_share < 1 else math.inf

    def diag_std(self) -> float:
        """Noise std of each diagonal Gram entry."""
        return self.local_sigma / math.sqrt(1.0 - self.pop_share) if self.pop_share < 1 else math.inf


def symmetric_noise(n: int, offdiag_std: float, diag_std: float, rng: np.random.Generator) -> np.ndarray:
    """(n, n) symmetric Gaussian noise: one draw per pair i < j (std ``offdiag_std``), mirrored."""
    z = rng.normal(0.0, offdiag_std, size=(n, n))
    z = np.triu(z, k=1)
    z = z + z.T
    z[np.diag_indices(n)] = rng.normal(0.0, diag_std, size=n)
    return z


@dataclass(frozen=True)
class ItemRelease:
    """What one tenant publishes (natural units), or the server's sum of several."""

    popularity: np.ndarray | None  # (n,) Σ_u x_u + noise, None when ρ = 0
    gram: np.ndarray | None  # (n, n) symmetric Σ_u x_u x_uᵀ + noise, None when ρ = 1
    users: int  # users who contributed (a count the tenant reports anyway)

    def __add__(self, other: ItemRelease) -> ItemRelease:
        def add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if (a is None) != (b is None):
                raise BudgetError("cannot sum releases of different kinds (popularity / Gram)")
            return None if a is None or b is None else a + b

        return ItemRelease(
            add(self.popularity, other.popularity), add(self.gram, other.gram), self.users + other.users
        )


def exact_statistics(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(p, G): Σ_u x_u (n,) and Σ_u x_u x_uᵀ (n, n) dense, by one sparse matmul (no noise)."""
    p = np.asarray(x.sum(axis=0)).ravel()
    g = (x.T @ x).toarray()
    return p, g


def release(x: sp.csr_matrix, noise: ReleaseNoise, rng: np.random.Generator) -> ItemRelease:
    """One tenant's release from its unit rows ``x`` (users × items): exact sums + its noise share."""
    n = x.shape[1]
    pop: np.ndarray | None = None
    gram: np.ndarray | None = None
    if noise.pop_share > 0:
        pop = np.asarray(x.sum(axis=0)).ravel() + (
            rng.normal(0.0, noise.pop_std(), size=n) if noise.sigma > 0 else 0.0
        )
    if noise.pop_share < 1:
        gram = (x.T @ x).toarray()
        if noise.sigma > 0:
            gram += symmetric_noise(n, noise.offdiag_std(), noise.diag_std(), rng)
    return ItemRelease(pop, gram, int(x.shape[0]))


#: Largest catalogue whose item–item Gram a tenant releases: n(n+1)/2 float32 entries in one message
#: (32 MB at 4 000 items) and an O(M³) fit on the server.
MAX_GRAM_ITEMS = 4000


def pack_gram(g: np.ndarray) -> np.ndarray:
    """The upper triangle (with the diagonal) of a symmetric (n, n) matrix, row-major, as float32."""
    return np.asarray(g[np.triu_indices(g.shape[0])], dtype=np.float32)


def unpack_gram(v: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_gram`: the symmetric (n, n) float64 matrix."""
    if v.shape != (n * (n + 1) // 2,):
        raise BudgetError(f"a packed Gram of {n} items has {n * (n + 1) // 2} entries, got {v.shape}")
    g = np.zeros((n, n))
    g[np.triu_indices(n)] = v
    out: np.ndarray = g + np.triu(g, k=1).T
    return out


def server_sum(releases: list[ItemRelease]) -> ItemRelease:
    """The server's total of the tenants' releases (under SecAgg it only ever sees this sum)."""
    if not releases:
        raise BudgetError("server_sum needs at least one release")
    total = releases[0]
    for r in releases[1:]:
        total = total + r
    return total


# ------------------------------------------------------------------ accounting


def calibrate_release_sigma(
    *,
    target_epsilon: float,
    delta: float,
    accountant: Accountant = "prv",
    history_before: list[tuple[float, float, int]] | None = None,
) -> float:
    """σ of the one-shot release (sensitivity 1, ``sample_rate = 1``, ``steps = 1``) for (ε, δ).

    ``history_before`` is what the tenant already spent (e.g. DP-SGD segments); the release then
    takes the rest of the target. ``target_epsilon = inf`` returns 0 (no noise, no guarantee).
    """
    if target_epsilon == math.inf:
        return 0.0
    return calibrate_noise(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=1.0,
        steps=1,
        accountant=accountant,
        history_before=history_before or [],
    )


def distributed_share(*, tenants: int, tolerated: int = 0) -> int:
    """k_min = tenants − tolerated: how many shares the noise is split into under SecAgg.

    ``tolerated`` counts the tenants that may collude with the server or drop out after masking
    (their noise is then missing from the sum the server sees). Must leave at least one share.
    """
    if isinstance(tenants, bool) or not isinstance(tenants, int) or tenants < 1:
        raise BudgetError(f"tenants must be an integer ≥ 1, got {tenants!r}")
    if isinstance(tolerated, bool) or not isinstance(tolerated, int) or not 0 <= tolerated < tenants:
        raise BudgetError(f"tolerated must be an integer in [0, tenants), got {tolerated!r}")
    return tenants - tolerated


def effective_sigma(*, local_sigma: float, honest_shares: int) -> float:
    """Noise multiplier the server-visible sum carries when ``honest_shares`` shares of σ_local are in it."""
    if honest_shares < 1:
        raise BudgetError(f"honest_shares must be ≥ 1, got {honest_shares!r}")
    return local_sigma * math.sqrt(honest_shares)


def release_ledger_fields(
    *,
    tenant: str,
    users: int,
    sigma: float,
    shares: int,
    pop_share: float,
    delta: float,
    accountant: Accountant,
    cap: float,
    history_before: list[tuple[float, float, int]] | None = None,
    mechanism: str = MECHANISM,
) -> dict[str, Any]:
    """The fields a tenant writes for its release (before it leaves the tenant), pure.

    * ``noise_multiplier`` = σ, ``sample_rate`` = 1, ``steps`` = 1: the segment that composes with
      the tenant's later DP-SGD segments under the same cap; ``epsilon`` is the cumulative ε with it
      under the SecAgg assumption (≥ ``shares`` honest, present shares in the sum);
    * ``local_noise_multiplier`` = σ/√shares and ``epsilon_if_alone``: the cumulative ε if the
      server saw this tenant's share alone (the worst case when SecAgg or the collusion/dropout
      assumption fails). With ``shares = 1`` (local mode) the two coincide.
    """
    before = list(history_before or [])
    noise = ReleaseNoise(sigma=sigma, pop_share=pop_share, shares=shares)
    if sigma <= 0:
        raise BudgetError("a release with sigma = 0 is not private and is never charged")
    eps = epsilon(history=[*before, (sigma, 1.0, 1)], delta=delta, accountant=accountant)
    eps_alone = epsilon(history=[*before, (noise.local_sigma, 1.0, 1)], delta=delta, accountant=accountant)
    return {
        "tenant": tenant,
        "unit": "user",
        "users": int(users),
        "mechanism": mechanism,
        "sample_rate": 1.0,
        "noise_multiplier": float(sigma),
        "steps": 1,
        "pop_share": float(pop_share),
        "noise_mode": "distributed" if shares > 1 else "local",
        "shares": int(shares),
        "local_noise_multiplier": float(noise.local_sigma),
        "delta": float(delta),
        "accountant": accountant,
        "epsilon": float(eps),
        "epsilon_if_alone": float(eps_alone),
        "cap": float(cap),
        "secure_mode": False,
    }


def _check_share(pop_share: float) -> float:
    if not (isinstance(pop_share, int | float) and 0.0 <= float(pop_share) <= 1.0):
        raise BudgetError(f"pop_share must be in [0, 1], got {pop_share!r}")
    return float(pop_share)

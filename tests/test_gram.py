"""fedrec.privacy.gram: exact sensitivity of the release, noise scales, calibration, distributed-noise accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedrec.privacy import gram
from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.privacy.errors import BudgetError


def _csr(histories: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum([len(h) for h in histories], out=indptr[1:])
    items = np.array([i for h in histories for i in h], dtype=np.int32)
    return indptr, items


def test_unit_rows_are_unit_norm_and_collapse_duplicates() -> None:
    indptr, items = _csr([[0, 2, 2, 3], [1], [], [4, 0]])
    x = gram.unit_rows(indptr, items, 5).toarray()
    assert x.shape == (4, 5)
    np.testing.assert_allclose(x[0], [1 / math.sqrt(3), 0, 1 / math.sqrt(3), 1 / math.sqrt(3), 0])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), [1, 1, 0, 1])


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5, 1.0])
def test_release_vector_has_norm_exactly_one(rho: float) -> None:
    """‖r_u‖ = 1 for every non-empty history: one-item users, long histories, any ρ."""
    rng = np.random.default_rng(0)
    for n_u in (1, 2, 3, 7, 30):
        x = np.zeros(40)
        x[rng.choice(40, n_u, replace=False)] = 1 / math.sqrt(n_u)
        assert np.linalg.norm(gram.release_vector(x, rho)) == pytest.approx(1.0, abs=1e-12)
    assert gram.sensitivity(rho) == 1.0


def test_naive_upper_triangle_with_diagonal_is_not_the_tight_sensitivity() -> None:
    """Why the √2: the unscaled upper triangle (with diagonal) has norm √((1+Σx⁴)/2) < 1."""
    for n_u in (1, 2, 10):
        x = np.full(n_u, 1 / math.sqrt(n_u))
        upper = np.outer(x, x)[np.triu_indices(n_u)]
        assert np.linalg.norm(upper) == pytest.approx(math.sqrt((1 + 1 / n_u) / 2))
        assert np.linalg.norm(np.outer(x, x)) == pytest.approx(1.0)  # Frobenius of the symmetric G_u


def test_release_vector_matches_the_statistics_the_server_uses() -> None:
    """Σ_u r_u unscaled = (p, upper(G), diag(G)) from the sparse path."""
    indptr, items = _csr([[0, 1, 2], [1, 3], [4], [0, 4, 3, 2]])
    x = gram.unit_rows(indptr, items, 5)
    p, g = gram.exact_statistics(x)
    rho = 0.3
    total = np.sum([gram.release_vector(row, rho) for row in x.toarray()], axis=0)
    iu = np.triu_indices(5, k=1)
    np.testing.assert_allclose(total[:5] / math.sqrt(rho), p)
    np.testing.assert_allclose(total[5 : 5 + len(iu[0])] / math.sqrt(2 * (1 - rho)), g[iu])
    np.testing.assert_allclose(total[-5:] / math.sqrt(1 - rho), np.diag(g))
    naive_g = sum(np.outer(r, r) for r in x.toarray())
    np.testing.assert_allclose(g, naive_g)


def test_noise_stds_in_natural_units() -> None:
    n = gram.ReleaseNoise(sigma=2.0, pop_share=0.2)
    assert n.pop_std() == pytest.approx(2.0 / math.sqrt(0.2))
    assert n.offdiag_std() == pytest.approx(2.0 / math.sqrt(1.6))
    assert n.diag_std() == pytest.approx(2.0 / math.sqrt(0.8))
    gram_only = gram.ReleaseNoise(sigma=2.0, pop_share=0.0)
    assert gram_only.offdiag_std() == pytest.approx(2.0 / math.sqrt(2))
    assert gram_only.diag_std() == pytest.approx(2.0)
    assert gram_only.pop_std() == math.inf
    split = gram.ReleaseNoise(sigma=2.0, pop_share=0.0, shares=4)
    assert split.local_sigma == pytest.approx(1.0)
    assert split.offdiag_std() == pytest.approx(1.0 / math.sqrt(2))


def test_symmetric_noise_variances() -> None:
    rng = np.random.default_rng(1)
    z = gram.symmetric_noise(400, 0.5, 2.0, rng)
    np.testing.assert_array_equal(z, z.T)
    off = z[np.triu_indices(400, k=1)]
    assert off.std() == pytest.approx(0.5, rel=0.02)
    assert np.diag(z).std() == pytest.approx(2.0, rel=0.1)


def test_distributed_shares_sum_to_one_release() -> None:
    """k tenants each adding σ²/k variance: the sum's noise has the std of one σ release."""
    rng = np.random.default_rng(2)
    k, n = 5, 60
    x = gram.unit_rows(*_csr([[0, 1], [2]]), n)
    noise = gram.ReleaseNoise(sigma=1.5, pop_share=0.5, shares=k)
    exact_p, exact_g = gram.exact_statistics(x)
    draws = [gram.release(x, noise, rng) for _ in range(k * 200)]
    sums = [gram.server_sum(draws[i : i + k]) for i in range(0, len(draws), k)]
    pop_noise = np.stack([s.popularity - k * exact_p for s in sums if s.popularity is not None])
    g_noise = np.stack([s.gram - k * exact_g for s in sums if s.gram is not None])
    one = gram.ReleaseNoise(sigma=1.5, pop_share=0.5)
    assert pop_noise.std() == pytest.approx(one.pop_std(), rel=0.03)
    assert g_noise[:, 0, 1].std() == pytest.approx(one.offdiag_std(), rel=0.1)
    assert sums[0].users == k * 2


def test_release_without_noise_is_exact() -> None:
    x = gram.unit_rows(*_csr([[0, 1], [1, 2]]), 3)
    r = gram.release(x, gram.ReleaseNoise(sigma=0.0, pop_share=0.5), np.random.default_rng(0))
    p, g = gram.exact_statistics(x)
    assert r.popularity is not None and r.gram is not None
    np.testing.assert_allclose(r.popularity, p)
    np.testing.assert_allclose(r.gram, g)
    assert gram.release(x, gram.ReleaseNoise(sigma=1.0, pop_share=1.0), np.random.default_rng(0)).gram is None


def test_calibration_is_the_single_gaussian_release() -> None:
    sigma = gram.calibrate_release_sigma(target_epsilon=3.0, delta=1e-5)
    assert sigma == calibrate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=1.0, steps=1)
    assert epsilon(history=[(sigma, 1.0, 1)], delta=1e-5) <= 3.0
    # Analytic Gaussian mechanism (Balle & Wang 2018) at ε = 3, δ = 1e-5 needs σ ≈ 1.39.
    assert sigma == pytest.approx(1.39, abs=0.02)
    assert gram.calibrate_release_sigma(target_epsilon=math.inf, delta=1e-5) == 0.0
    after = gram.calibrate_release_sigma(target_epsilon=3.0, delta=1e-5, history_before=[(1.0, 0.01, 100)])
    assert after > sigma


def test_distributed_accounting_helpers_and_ledger_fields() -> None:
    assert gram.distributed_share(tenants=5) == 5
    assert gram.distributed_share(tenants=5, tolerated=2) == 3
    with pytest.raises(BudgetError):
        gram.distributed_share(tenants=3, tolerated=3)
    assert gram.effective_sigma(local_sigma=0.5, honest_shares=4) == pytest.approx(1.0)
    sigma = gram.calibrate_release_sigma(target_epsilon=4.0, delta=1e-5)
    f = gram.release_ledger_fields(
        tenant="tenant-0", users=100, sigma=sigma, shares=4, pop_share=0.25, delta=1e-5,
        accountant="prv", cap=4.0,
    )  # fmt: skip
    assert f["epsilon"] <= 4.0 and f["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert f["local_noise_multiplier"] == pytest.approx(sigma / 2)
    assert f["epsilon_if_alone"] > f["epsilon"]
    assert f["noise_mode"] == "distributed" and f["sample_rate"] == 1.0 and f["steps"] == 1
    local = gram.release_ledger_fields(
        tenant="t", users=100, sigma=sigma, shares=1, pop_share=0.0, delta=1e-5, accountant="prv", cap=4.0
    )
    assert local["noise_mode"] == "local" and local["epsilon_if_alone"] == local["epsilon"]
    with pytest.raises(BudgetError):
        gram.release_ledger_fields(
            tenant="t", users=1, sigma=0.0, shares=1, pop_share=0.0, delta=1e-5, accountant="prv", cap=1.0
        )


def test_bad_arguments() -> None:
    with pytest.raises(BudgetError):
        gram.ReleaseNoise(sigma=1.0, pop_share=1.5)
    with pytest.raises(BudgetError):
        gram.ReleaseNoise(sigma=-1.0, pop_share=0.5)
    with pytest.raises(BudgetError):
        gram.unit_rows(np.array([0, 1]), np.array([7]), 3)


def test_release_is_one_budget_segment_that_composes_with_dp_sgd(tmp_path: Path) -> None:
    """Charging the release as round 0 (σ, q=1, steps=1) gives the ledger fields' ε; DP-SGD composes after."""
    from fedrec.privacy.budget import TenantBudget

    sigma = gram.calibrate_release_sigma(target_epsilon=2.0, delta=1e-5)
    budget = TenantBudget(tmp_path, tenant_id="tenant-0", cap=4.0, delta=1e-5)
    eps = budget.charge(round=0, noise_multiplier=sigma, sample_rate=1.0, steps=1)
    fields = gram.release_ledger_fields(
        tenant="tenant-0",
        users=50,
        sigma=sigma,
        shares=1,
        pop_share=0.0,
        delta=1e-5,
        accountant="prv",
        cap=4.0,
    )
    assert eps == pytest.approx(fields["epsilon"]) and eps <= 2.0
    dp_sgd_sigma = calibrate_noise(
        target_epsilon=4.0, delta=1e-5, sample_rate=0.1, steps=50, history_before=budget.history
    )
    after = budget.charge(round=1, noise_multiplier=dp_sgd_sigma, sample_rate=0.1, steps=50)
    assert 2.0 < after <= 4.0

"""fedrec.shared_model.choose: the automatic choice from tenant sizes, σ and the noise mode."""

from __future__ import annotations

import math

import pytest

from fedrec.shared_model.choose import DP_EASE_MIN_USERS_PER_NOISE, choose, sum_sigma


def test_sum_sigma_local_and_distributed() -> None:
    assert sum_sigma(2.0, 4, "local") == pytest.approx(4.0)
    assert sum_sigma(2.0, 4, "distributed") == pytest.approx(2.0)
    with pytest.raises(ValueError):
        sum_sigma(1.0, 2, "central")  # type: ignore[arg-type]


def test_no_noise_picks_ease() -> None:
    c = choose([100, 100], 0.0, epsilon=math.inf)
    assert c.approach == "ease" and c.users_per_noise == math.inf and "no noise" in c.reason


def test_small_tenants_get_dp_popularity_large_get_dp_ease() -> None:
    sigma = 1.3955  # ε = 3, δ = 1e-5
    small = choose([189] * 5, sigma, epsilon=3.0)  # ml-100k-sized, local noise
    assert small.approach == "dp_popularity"
    assert small.users_per_noise == pytest.approx(945 / (sigma * math.sqrt(5)))
    assert small.reason.count(".") <= 2 and "DP popularity" in small.reason
    big = choose([20_000] * 5, sigma, epsilon=3.0)
    assert big.approach == "dp_ease" and "DP-EASE" in big.reason


def test_distributed_noise_moves_the_switch() -> None:
    """At the same σ, SecAgg's distributed noise (√k less noise in the sum) can flip the choice."""
    k = 5
    sigma = 1.0
    n_each = math.ceil(DP_EASE_MIN_USERS_PER_NOISE * sigma / k) + 1  # just above the threshold centrally
    assert choose([n_each] * k, sigma, noise_mode="local").approach == "dp_popularity"
    assert choose([n_each] * k, sigma, noise_mode="distributed").approach == "dp_ease"


def test_threshold_boundary_and_bad_input() -> None:
    assert choose([400], 1.0, threshold=400.0).approach == "dp_ease"
    assert choose([399], 1.0, threshold=400.0).approach == "dp_popularity"
    with pytest.raises(ValueError):
        choose([], 1.0)
    with pytest.raises(ValueError):
        choose([-1, 5], 1.0)

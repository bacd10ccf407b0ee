"""dp_two_stage's tier: DP-EASE on the head of the released Gram, a ridge regression on the head for
the rest of it (``DPEASE.fit_gram_tiered``), and the tier size (``server.release.tier_size``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.privacy import gram
from fedrec.server.release import fit_release, tier_size
from fedrec.shared_model.dp_item import DPEASE
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.item_model import ItemModelConfig
from fedrec.shared_model.runconfig import RunConfig


def _blocks(users: int = 3000, seed: int = 3) -> np.ndarray:
    """Unit rows over 60 items in 3 taste blocks of 20; within a block the first items are the most
    popular, so the top of the prior (the head) and its tail (the tier) share tastes."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((users, 60))
    weights = 1.0 / np.arange(1, 21) ** 0.8
    for u in range(users):
        block = u % 3
        items = block * 20 + rng.choice(20, 4, replace=False, p=weights / weights.sum())
        rows[u, items] = 0.5  # 4 items × 1/√4: unit norm
    return rows


def _head_tier(g: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.diag(g), kind="stable")
    return np.sort(order[:m]), np.sort(order[m:])


def test_without_noise_the_head_is_plain_ease_and_the_tier_the_exact_ridge_regression() -> None:
    x = _blocks()
    g = x.T @ x
    head, tier = _head_tier(g, 24)
    users = len(x)
    model = DPEASE().fit_gram_tiered(g, head, offdiag_std=0.0, diag_std=0.0, users=users)
    alone = DPEASE().fit_gram(g[np.ix_(head, head)], offdiag_std=0.0, diag_std=0.0, users=users)
    assert model.items is not None and model.weights is not None and alone.weights is not None
    assert np.array_equal(model.items, np.arange(60)) and model.tier_items == len(tier)
    np.testing.assert_allclose(model.weights[np.ix_(head, head)], alone.weights, rtol=1e-5, atol=1e-7)
    lam = alone.lam_used
    ridge = np.linalg.solve(g[np.ix_(head, head)] + lam * np.eye(len(head)), g[np.ix_(head, tier)])
    np.testing.assert_allclose(model.weights[np.ix_(head, tier)], ridge, rtol=1e-4, atol=1e-6)
    assert np.abs(model.weights[np.ix_(tier, np.arange(60))]).max() == 0.0  # a tier item is no evidence
    # a user of block 0's head items ranks block 0's tier items above every other block's tier items
    hist = np.zeros(60)
    hist[head[head < 20][:3]] = 1.0
    s = hist @ model.weights
    own = [t for t in tier if t < 20]
    other = [t for t in tier if t >= 20]
    assert min(s[own]) > max(s[other])


def test_with_noise_the_tier_columns_live_on_the_heads_components_above_the_edge() -> None:
    x = _blocks(users=6000, seed=5)
    rng = np.random.default_rng(0)
    noise = gram.ReleaseNoise(
        sigma=gram.calibrate_release_sigma(target_epsilon=4.0, delta=1e-5), pop_share=0.0
    )
    g = x.T @ x + gram.symmetric_noise(60, noise.offdiag_std(), noise.diag_std(), rng)
    head, _ = _head_tier(g, 30)
    s = noise.offdiag_std()
    model = DPEASE().fit_gram_tiered(g, head, offdiag_std=s, diag_std=noise.diag_std(), users=6000)
    assert model.items is not None and model.weights is not None
    # a direct reference: the head's support, its eigencomponents above 2·s·√M, shrunk by 2·s·√M
    support = head[DPEASE().rule.support(np.diag(g)[head], noise.diag_std())]
    a = g[np.ix_(support, support)]
    vals, vecs = np.linalg.eigh(0.5 * (a + a.T))
    keep = vals > 2 * s * math.sqrt(len(support))
    v, eta = vecs[:, keep], vals[keep] - 2 * s * math.sqrt(len(support))
    lam = model.lam_used
    assert lam == pytest.approx(0.002 * 6000)  # the rule's non-private ridge (lam_per_user × users)
    assert model.components == int(keep.sum()) > 0
    kept_tier = np.setdiff1d(model.items, support)
    assert model.tier_items == len(kept_tier) > 0
    # every kept tier item passed the rule's diagonal test; the others were dropped
    dropped = np.setdiff1d(np.setdiff1d(np.arange(60), head), kept_tier)
    assert (np.diag(g)[kept_tier] >= 2 * noise.diag_std()).all()
    assert (np.diag(g)[dropped] < 2 * noise.diag_std()).all()
    # each component's projection is put in η's units (spiked Wigner: θ from λ, the eigenvector's cosine)
    edge2 = 4 * s * s * len(support)
    theta = 0.5 * (vals[keep] + np.sqrt(vals[keep] ** 2 - edge2))
    cos = np.sqrt(1 - edge2 / 4 / theta**2)
    factor = eta / (cos * theta)
    assert (factor > 0).all() and (factor <= 1 + 1e-9).all()  # never inflates a tier score
    expected = v @ (factor[:, None] * (v.T @ g[np.ix_(support, kept_tier)]) / (eta + lam)[:, None])
    col = {int(i): k for k, i in enumerate(model.items)}
    got = model.weights[np.ix_([col[int(i)] for i in support], [col[int(i)] for i in kept_tier])]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)


def test_fit_release_takes_the_head_by_the_stage_one_prior_and_maps_back_to_the_catalogue() -> None:
    x = _blocks()
    users, n = len(x), 200  # the 60 items sit at catalogue indices 100..159 of a 200-item catalogue
    selection = np.arange(100, 160)
    prior = np.full(n, -5.0)
    prior[selection] = np.log1p(x.sum(0))
    g = x.T @ x
    model = fit_release(
        {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users, sigma_sum=0.0, dp=False,
        stage=2, selection=selection, prior=prior, head=24,
    )  # fmt: skip
    items = model.items.numpy()
    assert np.array_equal(items, selection)  # no noise: every item of the selection kept
    top = selection[np.sort(np.argsort(-prior[selection], kind="stable")[:24])]
    rest = np.setdiff1d(selection, top)
    w = model.weights.numpy()
    col = {int(i): k for k, i in enumerate(items)}
    assert np.abs(w[np.ix_([col[int(i)] for i in rest], range(len(items)))]).max() == 0.0
    assert np.abs(w[np.ix_([col[int(i)] for i in top], [col[int(i)] for i in rest])]).max() > 0.0
    plain = fit_release(
        {"gram": gram.pack_gram(g)}, "dp_two_stage", n_items=n, users=users, sigma_sum=0.0, dp=False,
        stage=2, selection=selection, prior=prior,
    )  # fmt: skip
    assert np.abs(plain.weights.numpy()[np.ix_([col[int(i)] for i in rest], range(60))]).max() > 0.0


def test_tier_size_and_its_settings() -> None:
    covered, why = tier_size(1000, 1.5, 4000)
    assert covered == 1500 and "DP-EASE fits the top 1000, the next 500" in why
    assert (
        tier_size(3000, 1.5, 4000)[0] == 4000 and "capped at the gram-limit" in tier_size(3000, 1.5, 4000)[1]
    )
    assert tier_size(1000, 1.0, 4000) == (1000, "")  # no tier
    assert tier_size(4000, 1.5, 4000) == (4000, "")  # the M rule already reached the cap
    for bad in (0.5, float("nan"), float("inf"), True):
        with pytest.raises(FedrecError, match="tier must be a number ≥ 1"):
            RunConfig(tier=bad)  # type: ignore[arg-type]
    assert RunConfig.from_mapping(RunConfig(tier=2.0).to_mapping()).tier == 2.0
    with pytest.raises(FedrecError, match="there is no M rule"):
        RunConfig(tier=1.5, select_rule=0.0, gram_limit=1000)
    with pytest.raises(FedrecError, match="head must be 0 or in 1..select-1"):
        ItemModelConfig("dp_popularity", 100, 0, has_prior=True, select=50, head=50)
    cfg = ItemModelConfig("dp_popularity", 100, 0, has_prior=True, select=50, head=30)
    assert ItemModelConfig.from_json(cfg.to_json()) == cfg and cfg.to_json()["head"] == 30

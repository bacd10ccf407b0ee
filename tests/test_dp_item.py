"""DP-EASE on a released Gram: equals baselines.EASE without noise; the M/λ rule; the prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from fedrec.privacy import gram
from fedrec.shared_model.baselines import EASE, OUT_OF_SUPPORT_SCORE
from fedrec.shared_model.data import USER_FEATURES, UserSplit
from fedrec.shared_model.dp_item import DPEASE, DPEASERule
from fedrec.shared_model.priors import PriorPlus, PriorScorer, log_prior


def _split(histories: list[list[int]], n_items: int) -> UserSplit:
    n = len(histories)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(h) for h in histories], out=indptr[1:])
    nnz = int(indptr[-1])
    return UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=np.array([i for h in histories for i in h], dtype=np.int32),
        train_ctx=np.zeros((nnz, 2), dtype=np.int8),
        val_item=np.full(n, -1, np.int32),
        test_item=np.full(n, -1, np.int32),
        val_ctx=np.full((n, 2), -1, np.int8),
        test_ctx=np.full((n, 2), -1, np.int8),
        user_features=np.zeros((n, len(USER_FEATURES)), np.int32),
    )


def _random_split(seed: int, n_users: int = 60, n_items: int = 25) -> UserSplit:
    rng = np.random.default_rng(seed)
    hs = [sorted(rng.choice(n_items, rng.integers(2, 8), replace=False).tolist()) for _ in range(n_users)]
    return _split(hs, n_items)


def test_dp_ease_on_a_noiseless_binary_gram_equals_ease() -> None:
    """Fed the exact binary XᵀX and the same λ and support, DPEASE is fedrec.shared_model.baselines.EASE."""
    split = _random_split(0)
    x = sp.csr_matrix(
        (np.ones(split.n_train), split.train_items, split.indptr), shape=(split.n_users, split.n_items)
    )
    g = (x.T @ x).toarray()
    ref = EASE(lam=7.0).fit(split)
    model = DPEASE().fit_gram(g, offdiag_std=0.0, diag_std=0.0, users=split.n_users, lam=7.0)
    assert model.weights is not None and ref.weights is not None
    np.testing.assert_allclose(model.weights, ref.weights, rtol=1e-4, atol=1e-6)
    users = np.arange(split.n_users)
    hist = [split.history(int(u)) for u in users]
    np.testing.assert_allclose(
        model.score(split, users, hist, "test"), ref.score(split, users, hist, "test"), atol=1e-5
    )


def test_restricted_support_matches_ease_max_items() -> None:
    split = _random_split(1)
    x = sp.csr_matrix(
        (np.ones(split.n_train), split.train_items, split.indptr), shape=(split.n_users, split.n_items)
    )
    g = (x.T @ x).toarray()
    ref = EASE(lam=3.0, max_items=10).fit(split)
    assert ref.items is not None
    model = DPEASE().fit_gram(g, offdiag_std=0.0, diag_std=0.0, users=1, lam=3.0, items=ref.items)
    users = np.arange(5)
    hist = [split.history(int(u)) for u in users]
    got = model.score(split, users, hist, "test")
    np.testing.assert_allclose(got, ref.score(split, users, hist, "test"), atol=1e-5)
    outside = np.setdiff1d(np.arange(split.n_items), ref.items)
    assert (got[:, outside] == OUT_OF_SUPPORT_SCORE).all()


def test_rule_support_and_lambda_golden_values() -> None:
    rule = DPEASERule(diag_z=2.0, min_items=2, max_items=4, noise_mult=3.0, lam_per_user=0.002)
    diag = np.array([5.0, 0.1, 3.0, 2.5, 1.9, 2.0])
    # items with diag ≥ 2·1.0: 0, 2, 3, 5 → 4 items (ties by index)
    np.testing.assert_array_equal(rule.support(diag, 1.0), [0, 2, 3, 5])
    np.testing.assert_array_equal(rule.support(diag, 2.0), [0, 2])  # only 0 ≥ 4, min_items = 2
    np.testing.assert_array_equal(rule.support(diag, 0.0), [0, 2, 3, 5])  # no noise: capped at max_items
    # λ = max(0.002·users, 3·2·s·√M)
    assert rule.lam(0.5, 100, 1000) == pytest.approx(30.0)
    assert rule.lam(0.0, 100, 5000) == pytest.approx(10.0)
    assert rule.lam(0.01, 4, 1000) == pytest.approx(2.0)


def test_rule_keeps_noisy_gram_positive_definite() -> None:
    """With λ from the rule, G̃_M + λI is PD for pure-noise Grams of every size tried."""
    rng = np.random.default_rng(3)
    rule = DPEASERule()
    for m, s in ((50, 1.0), (300, 0.4), (800, 2.0)):
        e = gram.symmetric_noise(m, s, s * math.sqrt(2), rng)
        lam = rule.lam(s, m, users=10)
        assert np.linalg.eigvalsh(e + lam * np.eye(m)).min() > 0


def test_dp_ease_on_the_released_gram_recovers_structure() -> None:
    """Two disjoint item blocks, many users: at moderate noise the blocks still recommend each other."""
    rng = np.random.default_rng(4)
    hs = [
        sorted(rng.choice(range(0, 10) if u % 2 else range(10, 20), 4, replace=False).tolist())
        for u in range(4000)
    ]
    split = _split(hs, 20)
    x = gram.unit_rows(split.indptr, split.train_items, 20)
    noise = gram.ReleaseNoise(
        sigma=gram.calibrate_release_sigma(target_epsilon=2.0, delta=1e-5), pop_share=0.0
    )
    rel = gram.release(x, noise, rng)
    assert rel.gram is not None
    model = DPEASE().fit_gram(
        rel.gram, offdiag_std=noise.offdiag_std(), diag_std=noise.diag_std(), users=4000
    )
    s = model.score(split, np.array([0]), [np.array([1, 2, 3])], "test")[0]
    assert s[4:10].min() > s[10:].max()


def test_log_prior_and_prior_plus() -> None:
    p = np.array([10.0, -3.0, 0.5, 4.0])
    lp = log_prior(p, noise_std=1.0)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(lp, np.log(np.array([10.0, 1.0, 1.0, 4.0]) / 16.0))
    split = _split([[0], [1, 2]], 4)
    users = np.arange(2)
    hist = [split.history(0), split.history(1)]
    prior_only = PriorScorer(lp).score(split, users, hist, "test")
    zero = PriorPlus(lp, PriorScorer(np.arange(4.0)), weight=0.0).score(split, users, hist, "test")
    np.testing.assert_array_equal(prior_only, zero)
    one = PriorPlus(lp, PriorScorer(np.arange(4.0)), weight=1.0).score(split, users, hist, "test")
    np.testing.assert_allclose(one, prior_only + np.arange(4.0)[None, :])


def test_out_of_support_items_follow_the_prior() -> None:
    split = _random_split(5, n_items=12)
    x = gram.unit_rows(split.indptr, split.train_items, 12)
    _, g = gram.exact_statistics(x)
    prior = np.arange(12.0)
    model = DPEASE().fit_gram(g, offdiag_std=0.0, diag_std=0.0, users=60, items=np.arange(6), prior=prior)
    s = model.score(split, np.array([0]), [split.history(0)], "test")[0]
    assert (np.diff(s[6:]) > 0).all() and s[6:].max() < s[:6].min()


def test_model_options_default_to_the_original_model_and_start_at_the_prior() -> None:
    import torch

    from fedrec.shared_model.model import HistoryMLP, ModelConfig

    torch.manual_seed(0)
    plain = HistoryMLP(ModelConfig(n_items=6, dim=4, hidden=(8,)))
    assert not hasattr(plain, "prior") or plain.prior is None
    assert "prior" not in plain.state_dict()
    assert ModelConfig.from_json(ModelConfig(n_items=6).to_json()) == ModelConfig(n_items=6)

    cfg = ModelConfig(
        n_items=6,
        dim=4,
        hidden=(8,),
        dot_term=False,
        fixed_prior=True,
        freeze_item_emb=True,
        zero_init_output=True,
    )
    model = HistoryMLP(cfg)
    prior = np.log(np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05]))
    model.set_prior(prior)
    emb = np.arange(24, dtype=np.float32).reshape(6, 4) / 24
    model.set_item_embeddings(emb)
    assert not model.item_emb.weight.requires_grad
    np.testing.assert_allclose(model.item_emb.weight[:6].detach().numpy(), emb)
    hist = torch.tensor([[0, 1, 6]])
    feats = torch.zeros((1, 0), dtype=torch.long)
    ctx = torch.tensor([[3, 2]])
    logits = model(hist, torch.tensor([[2, 3, 4]]), feats, ctx)
    np.testing.assert_allclose(logits.detach().numpy()[0], prior[[2, 3, 4]], atol=1e-6)  # learned part = 0
    full = model.score_all(hist, feats, ctx)
    np.testing.assert_allclose(full.numpy()[0], prior, atol=1e-6)


def test_eigen_gram_keeps_components_above_the_noise_edge() -> None:
    from fedrec.shared_model.dp_item import EigenGram

    rng = np.random.default_rng(6)
    hs = [
        sorted(rng.choice(range(0, 10) if u % 2 else range(10, 20), 4, replace=False).tolist())
        for u in range(4000)
    ]
    split = _split(hs, 20)
    _, g = gram.exact_statistics(gram.unit_rows(split.indptr, split.train_items, 20))
    exact = EigenGram().fit_gram(g, offdiag_std=0.0, diag_std=0.0, users=4000)
    assert exact.components == np.linalg.matrix_rank(g)  # nothing to cut without noise
    # Blocks: top eigenvalue ≈ 200 + 9·66.7 ≈ 800 each, the rest ≈ 133, below the edge 2·40·√20 ≈ 358.
    noisy_g = g + gram.symmetric_noise(20, 40.0, 40.0 * math.sqrt(2), rng)
    model = EigenGram().fit_gram(noisy_g, offdiag_std=40.0, diag_std=40.0 * math.sqrt(2), users=4000)
    assert 2 <= model.components < exact.components
    s = model.score(split, np.array([0]), [np.array([1, 2, 3])], "test")[0]
    assert s[4:10].min() > s[10:].max()


def test_denoising_keeps_exactly_the_components_above_the_noise_edge() -> None:
    g, _ = _two_block_gram()
    s = 0.3
    model = DPEASE().fit_gram(g, offdiag_std=s, diag_std=s * math.sqrt(2), users=400)
    assert model.items is not None and model.weights is not None
    m = len(model.items)
    sub = g[np.ix_(model.items, model.items)]
    expected = int((np.linalg.eigvalsh(0.5 * (sub + sub.T)) > 2 * s * math.sqrt(m)).sum())
    assert model.components == expected > 0
    assert model.lam_used == pytest.approx(0.002 * 400)  # the non-private ridge after denoising
    # noise above every eigenvalue: nothing survives, and no item recommends another
    drowned = DPEASE().fit_gram(g, offdiag_std=1e6, diag_std=0.0, users=400)
    assert drowned.components == 0 and drowned.weights is not None
    assert np.abs(drowned.weights).max() == 0.0
    # the first version's rule stays available (ablation): ridge only, no components
    ridge = DPEASE(denoise=False).fit_gram(g, offdiag_std=s, diag_std=s * math.sqrt(2), users=400)
    assert ridge.components == 0 and ridge.lam_used > model.lam_used


def _two_block_gram() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    rows = np.zeros((400, 20))
    for u in range(400):
        items = rng.choice(range(0, 10) if u % 2 else range(10, 20), 4, replace=False)
        rows[u, items] = 0.5  # unit norm: 4 items × 1/√4
    return rows.T @ rows, rows.sum(0)

"""Local user-level DP training: per-user clipping against a slow reference, noise, sampling plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.client.train import LocalTrainConfig, clipped_backward, make_private, plan_round, train_round
from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.training import SamplingConfig, make_user_batch, per_user_loss


def split_with_heavy_user(n_users: int = 12, n_items: int = 60, heavy: int = 500, seed: int = 0) -> UserSplit:
    """Users with a few items each, user 0 with ``heavy`` interactions (items repeat across users)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, n_items, size=heavy).astype(np.int32)]
    rows += [
        rng.choice(n_items, size=rng.integers(3, 9), replace=False).astype(np.int32)
        for _ in range(n_users - 1)
    ]
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    nnz = int(indptr[-1])
    return UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=np.concatenate(rows),
        train_ctx=rng.integers(0, 7, size=(nnz, 2)).astype(np.int8),
        val_item=np.full(n_users, -1, np.int32),
        test_item=np.full(n_users, -1, np.int32),
        val_ctx=np.full((n_users, 2), -1, np.int8),
        test_ctx=np.full((n_users, 2), -1, np.int8),
        user_features=rng.integers(0, 3, size=(n_users, 4)).astype(np.int32),
    )


def model_for(split: UserSplit, seed: int = 0) -> HistoryMLP:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_items=split.n_items, n_genres=0, user_cardinalities=(3, 3, 3, 3), dim=8, hidden=(16, 8)
    )
    return HistoryMLP(cfg)


SAMPLING = SamplingConfig(max_history=400, targets=100, negatives=2)


def test_ghost_clipping_matches_a_slow_per_user_reference() -> None:
    split = split_with_heavy_user()
    users = np.arange(split.n_users)
    batch = make_user_batch(split, users, SAMPLING, np.random.default_rng(3))
    c = 0.05  # small bound so that several users (the heavy one surely) are clipped

    # slow reference: one backward per user, clip each gradient to C, sum
    ref_model = model_for(split)
    ref = {n: torch.zeros_like(p) for n, p in ref_model.named_parameters()}
    norms = []
    for row in range(len(users)):
        ref_model.zero_grad()
        sub = type(batch)(
            *(
                t[row : row + 1]
                for t in (
                    batch.history,
                    batch.candidates,
                    batch.user_features,
                    batch.context,
                    batch.labels,
                    batch.weights,
                )
            )
        )  # type: ignore[index]
        per_user_loss(ref_model, sub).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters() if p.grad is not None}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(float(norm))
        scale = min(1.0, c / (float(norm) + 1e-6))
        for n, g in grads.items():
            ref[n] += g * scale
    assert max(norms) > 10 * c, "the test must exercise clipping"

    # the DP path (ghost clipping, σ = 0 so the sum is observable)
    model = model_for(split)
    cfg = LocalTrainConfig(max_grad_norm=c, batch_users=split.n_users, sampling=SAMPLING)
    dp_model, dp_opt = make_private(model, cfg, plan_round(split.n_users, cfg), noise_multiplier=0.0, seed=0)
    dp_opt.zero_grad()
    clipped_backward(dp_model, dp_opt, per_user_loss(dp_model, batch))
    for n, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=f"clipped sum differs for {n}")

    # one user's contribution is bounded by C whatever its number of interactions
    dp_opt.zero_grad()
    one = type(batch)(
        *(
            t[0:1]
            for t in (
                batch.history,
                batch.candidates,
                batch.user_features,
                batch.context,
                batch.labels,
                batch.weights,
            )
        )
    )  # type: ignore[index]
    clipped_backward(dp_model, dp_opt, per_user_loss(dp_model, one))
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert float(total) <= c * (1 + 1e-4)


def test_plan_round_uses_opacus_rate_and_epoch_steps() -> None:
    plan = plan_round(1000, LocalTrainConfig(batch_users=64, local_epochs=1.0))
    assert plan.sample_rate == pytest.approx(1 / 16) and plan.steps == 16
    plan = plan_round(10, LocalTrainConfig(batch_users=64, local_epochs=2.0))
    assert plan.sample_rate == 1.0 and plan.steps == 2
    with pytest.raises(ValueError, match="at least one user"):
        plan_round(0, LocalTrainConfig())


def test_dp_round_adds_noise_and_plain_round_does_not() -> None:
    split = split_with_heavy_user()
    cfg = LocalTrainConfig(batch_users=4, sampling=SAMPLING)
    runs = {}
    for name, dp, sigma, seed in (
        ("dp_a", True, 1.0, 1),
        ("dp_b", True, 1.0, 2),
        ("plain_a", False, 0.0, 1),
        ("plain_b", False, 0.0, 1),
    ):
        model = model_for(split)
        stats = train_round(
            model, split, LocalTrainConfig(**{**cfg.__dict__, "dp": dp}), noise_multiplier=sigma, seed=seed
        )
        assert stats.steps == plan_round(split.n_users, cfg).steps
        runs[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert torch.isfinite(runs[name]).all()
    torch.testing.assert_close(runs["plain_a"], runs["plain_b"])  # deterministic for a seed
    assert not torch.allclose(runs["dp_a"], runs["dp_b"])
    # Opacus hooks are gone afterwards: the module trains again without error
    model = model_for(split)
    train_round(model, split, cfg, noise_multiplier=1.0, seed=0)
    train_round(model, split, cfg, noise_multiplier=1.0, seed=1)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_empty_poisson_batches_still_take_a_noised_step() -> None:
    split = split_with_heavy_user(n_users=3)
    # q = 1/3, 30 steps: some batches are empty with probability (2/3)^3 ≈ 0.30 each
    cfg = LocalTrainConfig(batch_users=1, local_epochs=10.0, sampling=SAMPLING)
    model = model_for(split)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    stats = train_round(model, split, cfg, noise_multiplier=1.0, seed=5)
    assert stats.empty_batches > 0 and stats.steps == 30
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_bad_local_config_is_refused() -> None:
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        LocalTrainConfig(max_grad_norm=0)
    with pytest.raises(ValueError, match="batch_users must be >= 1"):
        LocalTrainConfig(batch_users=0)

"""One-backward per-user clipping (client/fastdp.py) vs a slow per-user loop and Opacus' per-sample grads.

Compared in float64 so that 1e-6 relative checks the mathematics, not float32 summation order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedrec.client.fastdp import FastClipper
from fedrec.client.train import LocalTrainConfig, make_private_trainer, plan_round, train_round
from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.model import Batch, HistoryMLP, ModelConfig
from fedrec.shared_model.training import SamplingConfig, make_user_batch, per_user_loss
from tests.test_local_dp import split_with_heavy_user

N_ITEMS, N_GENRES = 60, 5
SAMPLING = SamplingConfig(max_history=400, targets=100, negatives=2)
RTOL = 1e-6
C = 0.45  # per-user norms of the heavy batch span ~0.34–0.75: some users clipped, some not


def full_model(seed: int = 0) -> HistoryMLP:
    """Every layer kind of the real model: item table, genre projection, user features, context, bias."""
    torch.manual_seed(seed)
    genres = (np.random.default_rng(seed).random((N_ITEMS, N_GENRES)) < 0.3).astype(np.float32)
    cfg = ModelConfig(
        n_items=N_ITEMS, n_genres=N_GENRES, user_cardinalities=(3, 3, 3, 3), dim=8, hidden=(16, 8)
    )
    return HistoryMLP(cfg, genres).double()


def heavy_batch(split: UserSplit, seed: int = 3) -> Batch:
    batch = make_user_batch(split, np.arange(split.n_users), SAMPLING, np.random.default_rng(seed))
    assert batch.labels is not None and batch.weights is not None
    batch.labels, batch.weights = batch.labels.double(), batch.weights.double()
    return batch


def user_row(batch: Batch, row: int) -> Batch:
    assert batch.labels is not None and batch.weights is not None
    return Batch(
        history=batch.history[row : row + 1],
        candidates=batch.candidates[row : row + 1],
        user_features=batch.user_features[row : row + 1],
        context=batch.context[row : row + 1],
        labels=batch.labels[row : row + 1],
        weights=batch.weights[row : row + 1],
    )


def slow_reference(batch: Batch, c: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One backward per user, clip each full gradient to C (Opacus' factor), sum. → (sum, norms)."""
    model = full_model()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norms = []
    for row in range(batch.history.shape[0]):
        model.zero_grad()
        per_user_loss(model, user_row(batch, row)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(norm)
        factor = min(1.0, c / (float(norm) + 1e-6))
        for n, g in grads.items():
            total[n] += g * factor
    return total, torch.stack(norms)


@pytest.fixture(scope="module")
def heavy() -> tuple[Batch, dict[str, torch.Tensor], torch.Tensor]:
    split = split_with_heavy_user(n_items=N_ITEMS, heavy=500)
    batch = heavy_batch(split)
    ref, norms = slow_reference(batch, c=C)
    return batch, ref, norms


def test_the_heavy_user_has_duplicated_items_and_is_clipped(
    heavy: tuple[Batch, dict[str, torch.Tensor], torch.Tensor],
) -> None:
    batch, _, norms = heavy
    row = torch.cat([batch.history[0], batch.candidates[0]])
    row = row[row != N_ITEMS]
    assert len(row) >= 400 and len(torch.unique(row)) < len(row), "user 0 must repeat items"
    assert float(norms.max()) > C > float(norms.min()), "some users clipped, some not"


@pytest.mark.parametrize("materialize_limit", [1 << 24, 0], ids=["materialised", "ghost-norm"])
def test_clipped_sum_and_norms_match_the_slow_per_user_loop(
    heavy: tuple[Batch, dict[str, torch.Tensor], torch.Tensor], materialize_limit: int
) -> None:
    batch, ref, ref_norms = heavy
    model = full_model()
    with FastClipper(model, max_grad_norm=C, materialize_limit=materialize_limit) as clipper:
        norms = clipper.clipped_backward(per_user_loss(model, batch))
    torch.testing.assert_close(norms, ref_norms, rtol=RTOL, atol=0.0)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name], rtol=RTOL, atol=1e-12, msg=f"clipped sum of {name}")


def test_norms_match_opacus_per_sample_gradients(
    heavy: tuple[Batch, dict[str, torch.Tensor], torch.Tensor],
) -> None:
    """Opacus' hooks mode materialises every user's gradient: their norms are the reference."""
    batch, _, _ = heavy
    gsm = GradSampleModule(full_model(), loss_reduction="sum")
    per_user_loss(gsm, batch).sum().backward()
    opacus_sq = sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in gsm.parameters())  # type: ignore[union-attr]
    model = full_model()
    with FastClipper(model, max_grad_norm=1.0) as clipper:
        norms = clipper.clipped_backward(per_user_loss(model, batch))
    torch.testing.assert_close(norms, torch.as_tensor(opacus_sq).sqrt(), rtol=RTOL, atol=0.0)


def test_one_users_contribution_is_bounded_by_c(
    heavy: tuple[Batch, dict[str, torch.Tensor], torch.Tensor],
) -> None:
    batch, _, _ = heavy
    model = full_model()
    with FastClipper(model, max_grad_norm=0.05) as clipper:
        clipper.clipped_backward(per_user_loss(model, user_row(batch, 0)))
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert float(total) <= 0.05 * (1 + 1e-9)


def test_fast_and_ghost_trainers_give_the_same_clipped_sum_in_float32() -> None:
    split = split_with_heavy_user(n_items=N_ITEMS, heavy=500)
    batch = make_user_batch(split, np.arange(split.n_users), SAMPLING, np.random.default_rng(3))
    grads = {}
    for mode in ("fast", "ghost"):
        model = full_model().float()
        cfg = LocalTrainConfig(
            max_grad_norm=0.05, batch_users=split.n_users, sampling=SAMPLING, clipping=mode
        )
        trainer = make_private_trainer(
            model, cfg, plan_round(split.n_users, cfg), noise_multiplier=0.0, seed=0
        )
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.backward(per_user_loss(trainer.module, batch))
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        trainer.close()
    assert grads["fast"].keys() == grads["ghost"].keys()
    for name, g in grads["fast"].items():
        torch.testing.assert_close(g, grads["ghost"][name], rtol=1e-4, atol=1e-7, msg=name)


def test_noise_is_opacus_gaussian_sigma_c_on_every_coordinate() -> None:
    """Zero gradients + σ = 2, C = 0.5: after Opacus' add_noise every coordinate is N(0, (σC)²)."""
    split = split_with_heavy_user(n_items=2000, heavy=20)
    torch.manual_seed(0)
    model = HistoryMLP(ModelConfig(n_items=2000, user_cardinalities=(3, 3, 3, 3), dim=16))
    cfg = LocalTrainConfig(max_grad_norm=0.5, batch_users=split.n_users, sampling=SAMPLING)
    trainer = make_private_trainer(model, cfg, plan_round(split.n_users, cfg), noise_multiplier=2.0, seed=1)
    opt = trainer.optimizer
    for p in opt.params:
        p.grad = torch.zeros_like(p)
    opt.accumulate()
    opt.add_noise()
    noise = torch.cat([p.grad.flatten() for p in opt.params])  # type: ignore[union-attr]
    trainer.close()
    assert (noise != 0).all(), "every coordinate, the unused rows of the item table included, is noised"
    assert abs(float(noise.mean())) < 0.01 and float(noise.std()) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("clipping", ["fast", "ghost"])
def test_train_round_runs_each_clipping_and_leaves_a_plain_module(clipping: str) -> None:
    split = split_with_heavy_user()
    model = HistoryMLP(ModelConfig(n_items=split.n_items, user_cardinalities=(3, 3, 3, 3), dim=8))
    cfg = LocalTrainConfig(batch_users=4, sampling=SAMPLING, clipping=clipping)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    stats = train_round(model, split, cfg, noise_multiplier=1.0, seed=0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert stats.steps == plan_round(split.n_users, cfg).steps and not torch.equal(before, after)
    assert not any(hasattr(p, "summed_grad") or hasattr(p, "grad_sample") for p in model.parameters())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    train_round(model, split, cfg, noise_multiplier=1.0, seed=1)  # a second round on the same module


def test_a_layer_used_twice_in_one_forward_is_refused() -> None:
    emb = nn.Embedding(10, 4)
    with FastClipper(emb, max_grad_norm=1.0):
        emb(torch.tensor([[1, 2]]))
        with pytest.raises(ValueError, match="ran twice in one forward pass"):
            emb(torch.tensor([[3, 4]]))


def test_unsupported_layers_are_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match=r"supports nn.Linear and nn.Embedding only"):
        FastClipper(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        FastClipper(nn.Embedding(5, 2, scale_grad_by_freq=True), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        FastClipper(nn.Linear(2, 2), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="clipping must be one of"):
        LocalTrainConfig(clipping="hooks")


def test_padding_idx_rows_get_no_gradient_like_torch() -> None:
    """An embedding with padding_idx: per-user norms exclude the padding row, as the real gradient does."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, padding_idx=0).double()
    ids = torch.tensor([[0, 1, 1, 2], [0, 0, 3, 5]])
    target = torch.randn(2, 4, 3, dtype=torch.float64)

    def loss_of(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((m(x) - t) ** 2).sum((1, 2))

    ref = []
    for b in range(2):
        emb.zero_grad()
        loss_of(emb, ids[b : b + 1], target[b : b + 1]).sum().backward()
        assert emb.weight.grad is not None
        ref.append(emb.weight.grad.norm())
    emb.zero_grad()
    with FastClipper(emb, max_grad_norm=100.0) as clipper:
        norms = clipper.clipped_backward(loss_of(emb, ids, target))
    torch.testing.assert_close(norms, torch.stack(ref), rtol=RTOL, atol=0.0)
    assert emb.weight.grad is not None and float(emb.weight.grad[0].abs().sum()) == 0.0

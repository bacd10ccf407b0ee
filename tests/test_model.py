"""The shared model: shapes, the batched full-catalogue path against forward(), per-user batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.shared_model.artifacts import load_model, save_model
from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.training import SamplingConfig, make_user_batch, pad_rows, per_user_loss


def tiny_split(n_users: int = 6, n_items: int = 12, seed: int = 0) -> UserSplit:
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(n_items, size=rng.integers(2, 8), replace=False).astype(np.int32) for _ in range(n_users)
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


def tiny_model(n_items: int = 12, **kw: bool) -> HistoryMLP:
    torch.manual_seed(0)
    genres = (np.arange(n_items * 3).reshape(n_items, 3) % 2).astype(np.float32)
    cfg = ModelConfig(
        n_items=n_items, n_genres=3, user_cardinalities=(3, 3, 3, 3), dim=8, hidden=(16, 8), **kw
    )
    return HistoryMLP(cfg, genres)


@pytest.mark.parametrize("dot_term", [True, False])
@pytest.mark.parametrize("use_context", [True, False])
def test_score_all_equals_forward_on_every_item(dot_term: bool, use_context: bool) -> None:
    model = tiny_model(dot_term=dot_term, use_context=use_context).eval()
    # give the bias a non-zero value so the test covers it
    with torch.no_grad():
        assert model.bias is not None
        model.bias.weight.normal_()
    hist = torch.tensor([[0, 3, 5, 12], [7, 12, 12, 12]])  # 12 = padding
    feats = torch.tensor([[1, 0, 2, 1], [0, 0, 0, 0]])
    ctx = torch.tensor([[13, 2], [-1, -1]])
    all_items = torch.arange(12).expand(2, -1)  # (B, N)
    with torch.no_grad():
        ref = model(hist, all_items, feats, ctx)  # (2, 12)
        fast = model.score_all(hist, feats, ctx)
    assert fast.shape == (2, 12)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_scores() -> None:
    model = tiny_model().eval()
    feats = torch.zeros(1, 4, dtype=torch.long)
    ctx = torch.tensor([[5, 1]])
    with torch.no_grad():
        a = model.score_all(torch.tensor([[1, 2]]), feats, ctx)
        b = model.score_all(torch.tensor([[1, 2, 12, 12, 12]]), feats, ctx)
    torch.testing.assert_close(a, b)


def test_empty_history_scores_are_finite() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        s = model.score_all(
            torch.tensor([[12, 12]]), torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 0]])
        )
    assert torch.isfinite(s).all()


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="n_items must be >= 1"):
        ModelConfig(n_items=0)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_json({"n_items": 3, "dimm": 4})


def test_user_batch_shapes_and_targets_come_from_the_users_items() -> None:
    split = tiny_split()
    cfg = SamplingConfig(max_history=3, targets=2, negatives=2)
    users = np.array([0, 2, 5])
    batch = make_user_batch(split, users, cfg, np.random.default_rng(1))
    assert batch.history.shape[0] == 3 and batch.history.shape[1] <= 3
    assert batch.labels is not None and batch.weights is not None
    assert batch.candidates.shape == batch.labels.shape == batch.weights.shape
    for row, u in enumerate(users):
        items = set(split.history(int(u)).tolist())
        pos = batch.candidates[row][batch.labels[row] == 1].tolist()
        hist = [i for i in batch.history[row].tolist() if i != split.n_items]
        assert pos and set(pos) <= items, "targets are the user's own training items"
        assert set(hist) <= items and not set(hist) & set(pos), "history and targets are disjoint"
        # negatives the user actually has are weighted out
        negs = batch.candidates[row][(batch.labels[row] == 0) & (batch.weights[row] > 0)].tolist()
        assert not set(negs) & items


def test_per_user_loss_is_one_value_per_user_and_ignores_padding() -> None:
    split = tiny_split()
    model = tiny_model()
    batch = make_user_batch(
        split, np.arange(4), SamplingConfig(targets=3, negatives=2), np.random.default_rng(0)
    )
    loss = per_user_loss(model, batch)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    # padding candidates (weight 0) must not matter: change their ids and compare
    assert batch.weights is not None
    cand = batch.candidates.clone()
    cand[batch.weights == 0] = 0
    batch2 = type(batch)(batch.history, cand, batch.user_features, batch.context, batch.labels, batch.weights)
    torch.testing.assert_close(per_user_loss(model, batch2), loss)


def test_pad_rows() -> None:
    out = pad_rows([np.array([1, 2]), np.array([], dtype=np.int64), np.array([3])], pad=9)
    assert out.tolist() == [[1, 2], [9, 9], [3, 9]]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model().eval()
    n = model.cfg.n_items
    catalog = Catalog(
        item_ids=tuple(str(100 + i) for i in range(n)),
        titles=tuple(f"Movie {i}" for i in range(n)),
        genre_names=("A", "B", "C"),
        genres=(np.arange(n * 3).reshape(n, 3) % 2).astype(np.float32),
        years=np.zeros(n, np.int32),
        user_vocab={"age_band": ("18-24",), "gender": ("F", "M")},
    )
    save_model(tmp_path, model, catalog, SamplingConfig(), run_id="r1")
    loaded = load_model(tmp_path)
    assert loaded.run_id == "r1" and loaded.catalog.item_ids == catalog.item_ids
    x = (torch.tensor([[1, 2]]), torch.zeros(1, 4, dtype=torch.long), torch.tensor([[3, 3]]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.score_all(*x), model.score_all(*x))


def test_load_model_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FedrecError, match="model.pt is missing"):
        load_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"junk")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(FedrecError, match="not valid JSON"):
        load_model(tmp_path)

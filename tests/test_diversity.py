"""MMR re-ranking (hand-checked), its evaluation, and int8 serving layers against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedrec.shared_model.diversity import evaluate_mmr, mmr, unit_rows
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.metrics import intra_list_diversity
from fedrec.shared_model.quantize import Int8DynamicLinear
from fedrec.shared_model.training import ModelScorer
from fedrec.simulations.data.dataset import PreparedData, prepare_dataset
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.centralized import CentralizedConfig, train_centralized

# Four items: 0 and 1 are the same genre, 2 and 3 another; scores favour 0 > 1 > 2 > 3.
VECS = unit_rows(np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32))
SCORES = np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32)


def test_mmr_zero_is_top_k_and_positive_diversifies() -> None:
    assert mmr(SCORES, VECS, 2, 0.0)[0].tolist() == [0, 1]
    # rel = [1, 2/3, 1/3, 0]; λ=0.5: after 0, item 1 gains 0.5·2/3 − 0.5 < item 2's 0.5·1/3 − 0.
    items, scores = mmr(SCORES, VECS, 2, 0.5)
    assert items.tolist() == [0, 2] and scores.tolist() == [4.0, 2.0]
    assert mmr(SCORES, VECS, 4, 0.5)[0].tolist() == [0, 2, 1, 3]


def test_mmr_never_returns_masked_items_and_checks_its_arguments() -> None:
    s = SCORES.copy()
    s[[0, 2]] = -np.inf
    assert mmr(s, VECS, 4, 0.7)[0].tolist() == [1, 3]
    assert mmr(np.full(4, -np.inf, dtype=np.float32), VECS, 3, 0.5)[0].size == 0
    with pytest.raises(ValueError, match="diversity"):
        mmr(SCORES, VECS, 2, 1.5)
    with pytest.raises(ValueError, match="k must be"):
        mmr(SCORES, VECS, 0, 0.5)


@pytest.fixture(scope="module")
def trained() -> tuple[PreparedData, ModelScorer]:
    data = prepare_dataset(load("synthetic", seed=2, synth_users=300, synth_items=200))
    cfg = CentralizedConfig(epochs=2, seed=2)
    model, _ = train_centralized(data, cfg)
    return data, ModelScorer(model, cfg.sampling)


def test_evaluate_mmr_matches_evaluate_at_zero_and_raises_diversity(
    trained: tuple[PreparedData, ModelScorer],
) -> None:
    data, scorer = trained
    plain = evaluate(scorer, data.split, data.catalog, which="test").to_metrics()["full"]
    zero = evaluate_mmr(scorer, data.split, data.catalog, diversity=0.0)
    assert zero["hr@10"] == pytest.approx(plain["hr@10"], abs=1e-9)
    assert zero["ild@10"] == pytest.approx(plain["ild@10"], abs=1e-9)
    div = evaluate_mmr(scorer, data.split, data.catalog, diversity=0.7)
    assert div["ild@10"] > zero["ild@10"]


def test_int8_linear_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.relu(torch.randn(2, 300, 64))  # (B, N, h1) as in score_all
    with torch.no_grad():
        ref = lin(x)
    got = Int8DynamicLinear(lin)(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_intra_list_diversity_of_the_hand_example() -> None:
    lists = np.array([[0, 1], [0, 2]])
    np.testing.assert_allclose(intra_list_diversity(lists, VECS), [0.0, 1.0])

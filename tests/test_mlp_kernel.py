"""The MLP serving kernel (``fedrec.shared_model.mlp_kernel``) scores exactly as the torch model does.

Every architecture option the kernel reads (genres, user features, context, dot term, learned dot
weight, fixed prior, item bias, candidate-side table, 1–3 hidden layers) is checked against ``HistoryMLP.score_all`` and
``score_items`` (scores allclose, top-10 identical), through the ``Recommender`` both the exact pass and
the candidate re-rank; where the kernel does not apply (int8 layers) the torch path answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.shared_model.artifacts import LoadedModel, load_model
from fedrec.shared_model.mlp_kernel import MLPKernel
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.quantize import quantize_for_serving
from fedrec.shared_model.ranking import mask_items, top_k
from fedrec.shared_model.recommend import Recommender
from fedrec.shared_model.training import SamplingConfig, pad_rows
from tests.test_serve import train_small
from tests.test_serve_speed import catalog, write_model

N, CAP = 700, 50
CONFIGS = {
    "default": {"n_genres": 6, "user_cardinalities": (3, 5)},
    "bare": {"use_context": False, "dot_term": False, "item_bias": False, "hidden": (16,)},
    "mix-prior-deep": {"n_genres": 6, "dot_mix": 0.7, "fixed_prior": True, "hidden": (32, 16, 8)},
    # the release-init EASE head: a frozen candidate-side table on top of the history table
    "candidate-table": {"n_genres": 6, "dot_mix": 0.7, "fixed_prior": True, "cand_table": True},
}
CONTEXTS = np.array([[0, 0], [13, 2], [23, 6], [-1, -1]])  # -1 = unknown hour/weekday


def random_model(name: str) -> HistoryMLP:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(n_items=N, dim=8, **CONFIGS[name])  # type: ignore[arg-type]
    genres = (rng.random((N, cfg.n_genres)) < 0.3).astype(np.float32) if cfg.n_genres else None
    model = HistoryMLP(cfg, genres).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the init so every term matters in the ranking
            p.add_(torch.randn_like(p) * 0.3)
        if model.prior is not None:
            model.set_prior(rng.standard_normal(N))
        if model.cand_delta is not None:
            model.set_candidate_delta(rng.standard_normal((N, cfg.dim)))
    return model


def histories(rng: np.random.Generator, n: int = 40) -> list[np.ndarray]:
    """Histories of 0 to 2·CAP items (the kernel must read only the latest CAP)."""
    lengths = [0, 1, CAP, 2 * CAP, *rng.integers(1, 30, n - 4)]
    return [rng.choice(N, int(m), replace=False) for m in lengths]


def torch_scores(model: HistoryMLP, hists: list[np.ndarray], ctx: np.ndarray) -> np.ndarray:
    hist = pad_rows([h[-CAP:] for h in hists], N)
    feats = torch.zeros((len(hists), len(model.cfg.user_cardinalities)), dtype=torch.int64)
    with torch.no_grad():
        return model.score_all(torch.from_numpy(hist), feats, torch.from_numpy(ctx)).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_scores_equal_the_torch_model(name: str) -> None:
    model = random_model(name)
    kern = MLPKernel.build(model, model.item_side(), CAP)
    assert kern is not None
    rng = np.random.default_rng(1)
    hists = histories(rng)
    ctx = CONTEXTS[rng.integers(0, len(CONTEXTS), len(hists))]
    want, got = torch_scores(model, hists, ctx), kern.score_all(hists, ctx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(top_k(mask_items(got, hists), 10)[0], top_k(mask_items(want, hists), 10)[0])
    # Each row's own items (the re-rank): the same numbers as the catalogue pass gives them.
    items = np.sort(rng.choice(N, (len(hists), 60)), axis=1)
    u, uh1, c = kern.user_parts(hists, ctx)
    hist = pad_rows([h[-CAP:] for h in hists], N)
    feats = torch.zeros((len(hists), len(model.cfg.user_cardinalities)), dtype=torch.int64)
    with torch.no_grad():
        tu, tc = model.user_parts(torch.from_numpy(hist), feats, torch.from_numpy(ctx))
        ref = model.score_items(tu, tc, model.item_side(), torch.from_numpy(items)).numpy()
    np.testing.assert_allclose(kern.score_items(u, uh1, c, items), ref, rtol=1e-5, atol=1e-5)
    for r in range(5):  # one row at a time (a lone request's path)
        one = kern.score_items(
            u[r : r + 1], uh1[r : r + 1], None if c is None else c[r : r + 1], items[r : r + 1]
        )
        np.testing.assert_allclose(one, ref[r : r + 1], rtol=1e-5, atol=1e-5)


def recommender_for(model: HistoryMLP, candidates: int) -> Recommender:
    cat = catalog(N, genres=False)
    loaded = LoadedModel(model, cat, SamplingConfig(max_eval_history=CAP), "kernel-test", {})
    return Recommender(loaded, candidates=candidates)


@pytest.mark.parametrize("candidates", [0, 100, N])
def test_recommender_with_the_kernel_ranks_as_the_torch_model(candidates: int) -> None:
    """Exact pass, re-rank of 100 and of every item: top-10 and scores as the model's own scoring."""
    rng = np.random.default_rng(2)
    hists = histories(rng)
    ctx = np.array([13, 2])
    for name in CONFIGS:
        model = random_model(name)
        rec = recommender_for(model, candidates)
        exclude = [rng.choice(N, 5, replace=False) for _ in hists]
        idx, sc = rec.rank_scores(hists, exclude, ctx, min_candidates=10).top(10)
        want = mask_items(torch_scores(model, hists, np.tile(ctx, (len(hists), 1))), hists, exclude)
        if candidates == 0 or candidates == N:  # every item scored: the model's exact top-10
            w_idx, w_sc = top_k(want, 10)
            assert np.array_equal(idx, w_idx), name
            np.testing.assert_allclose(sc, w_sc, rtol=1e-5, atol=1e-5)
        else:  # a subset: each returned item carries the model's exact score for it
            np.testing.assert_allclose(sc, np.take_along_axis(want, idx, 1), rtol=1e-5, atol=1e-5)


def test_trained_model_top10_identical(tmp_path: Path) -> None:
    """A trained model (not random weights): the served ranking with the kernel is the torch ranking."""
    loaded = load_model(train_small(tmp_path / "run"))
    rec = Recommender(loaded)
    model = rec.model
    assert isinstance(model, HistoryMLP) and rec.candidates == 0
    n = loaded.catalog.n_items
    rng = np.random.default_rng(3)
    hists = [rng.choice(n, int(m), replace=False) for m in rng.integers(0, 40, 200)]
    ctx = np.array([[h % 24, h % 7] for h in range(len(hists))])
    cap = loaded.sampling.max_eval_history
    hist = pad_rows([h[-cap:] for h in hists], n)
    feats = torch.zeros((len(hists), len(model.cfg.user_cardinalities)), dtype=torch.int64)
    with torch.no_grad():
        want = model.score_all(torch.from_numpy(hist), feats, torch.from_numpy(ctx)).numpy()
    got = rec.scores(hists, ctx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(top_k(mask_items(got, hists), 10)[0], top_k(mask_items(want, hists), 10)[0])


def test_no_kernel_for_int8_layers(tmp_path: Path) -> None:
    loaded = load_model(write_model(tmp_path / "run", "mlp", 300))
    q = quantize_for_serving(loaded)
    assert isinstance(q.model, HistoryMLP)
    assert MLPKernel.build(q.model, q.model.item_side(), 200) is None  # int8 layers: the torch path
    assert isinstance(loaded.model, HistoryMLP)
    assert MLPKernel.build(loaded.model, loaded.model.item_side(), 200) is not None

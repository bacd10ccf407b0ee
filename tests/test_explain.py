"""Leave-one-out explanations: exact contributions, and removing the top reason hurts most."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.explain import explain, leave_one_out_contributions
from fedrec.shared_model.recommend import Recommender
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.centralized import CentralizedConfig, run_centralized

CTX = np.array([12, 3], dtype=np.int64)


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    data = prepare_dataset(load("synthetic", seed=1, synth_users=300, synth_items=200))
    out = tmp_path_factory.mktemp("explain") / "run"
    run_centralized(data, CentralizedConfig(epochs=2, seed=1), out)
    return Recommender(load_model(Path(out)))


def n_feats(rec: Recommender) -> int:
    return len(rec.model.cfg.user_cardinalities)


def test_contributions_equal_score_drops_on_the_ranking_path(rec: Recommender) -> None:
    """c(h, j) from the batched forward equals the drop of Recommender.scores (score_all) per removal."""
    history = np.array([3, 17, 42, 8, 99], dtype=np.int64)
    items = np.array([0, 5, 150], dtype=np.int64)
    c = leave_one_out_contributions(rec.model, history, items, CTX, n_feats(rec))  # (L, K)
    full = rec.scores([history], CTX)[0]
    for r in range(len(history)):
        without = rec.scores([np.delete(history, r)], CTX)[0]
        np.testing.assert_allclose(c[r], full[items] - without[items], atol=1e-4)


def test_removing_the_top_reason_lowers_the_score_more_than_a_random_item(rec: Recommender) -> None:
    rng = np.random.default_rng(0)
    top_drops, random_drops = [], []
    for _ in range(40):
        history = rng.choice(rec.catalog.n_items, size=int(rng.integers(3, 15)), replace=False)
        r = rec.recommend([history], k=5, context=CTX)[0]
        reasons = explain(rec.model, history, r.items, CTX, n_feats(rec))
        full = rec.scores([history], CTX)[0]
        for j, rs in zip(r.items, reasons, strict=True):
            if not rs:
                continue
            top = int(np.flatnonzero(history == rs[0].item)[0])
            rand = int(rng.integers(len(history)))
            top_drops.append(full[j] - rec.scores([np.delete(history, top)], CTX)[0][j])
            random_drops.append(full[j] - rec.scores([np.delete(history, rand)], CTX)[0][j])
    assert len(top_drops) > 50
    assert np.mean(top_drops) > np.mean(random_drops) + 1e-3
    assert np.mean(np.array(top_drops) >= np.array(random_drops) - 1e-5) == 1.0


def test_reasons_are_positive_distinct_history_items(rec: Recommender) -> None:
    history = np.array([4, 4, 10, 20], dtype=np.int64)  # a duplicate is merged into one reason
    reasons = explain(rec.model, history, np.array([1, 2, 3]), CTX, n_feats(rec), top=3)
    for rs in reasons:
        named = [x.item for x in rs]
        assert len(named) == len(set(named)) and set(named) <= {4, 10, 20}
        assert all(x.contribution > 0 for x in rs)
        assert [x.contribution for x in rs] == sorted((x.contribution for x in rs), reverse=True)


def test_degenerate_inputs(rec: Recommender) -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert explain(rec.model, empty, np.array([1, 2]), CTX, n_feats(rec)) == [[], []]
    assert explain(rec.model, np.array([5]), empty, CTX, n_feats(rec)) == []
    one = leave_one_out_contributions(rec.model, np.array([5]), np.array([7]), CTX, n_feats(rec))
    drop = rec.scores([np.array([5])], CTX)[0][7] - rec.scores([empty], CTX)[0][7]
    np.testing.assert_allclose(one[0, 0], drop, atol=1e-4)  # one item vs empty history

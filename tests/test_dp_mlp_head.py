"""Issue 16 item 2: the release-init MLP with public genre vectors, a learned dot-term weight and only a
few modules trained by DP-SGD (fast: in-process grid, tiny synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client.app import app
from fedrec.client.train import LocalTrainConfig, train_round
from fedrec.privacy.ledger import read_entries
from fedrec.server.loop import load_catalog, model_config, run_federation
from fedrec.server.release_init import genre_embeddings, init_from_release, init_model_config
from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.codec import arrays_of, metrics_of
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.runconfig import RunConfig
from fedrec.shared_model.training import SamplingConfig, make_user_batch
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid
from fedrec.simulations.reports.audit import check_run, load_run

TENANTS = 2


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return prepare_dataset(load("synthetic", synth_users=160, synth_items=60, seed=3))


@pytest.fixture(scope="module")
def fed(data, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("dphead") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=3, k_anonymity=2))
    return out


def _head_model(data, trainable: tuple[str, ...]) -> HistoryMLP:  # type: ignore[no-untyped-def]
    cat = data.catalog
    base = ModelConfig(
        n_items=cat.n_items, n_genres=len(cat.genre_names), user_cardinalities=cat.cardinalities()
    )
    torch.manual_seed(0)
    model = HistoryMLP(init_model_config(base, dot_mix=0.5, trainable=trainable), cat.genres)
    model.set_item_embeddings(genre_embeddings(cat.genres, base.dim))
    model.set_prior(np.log(np.arange(1, cat.n_items + 1, dtype=np.float64) / cat.n_items))
    return model


def test_the_mixed_dot_term_scores_the_same_in_training_and_ranking(data) -> None:  # type: ignore[no-untyped-def]
    model = _head_model(data, ("mix", "mlp", "genre_proj"))
    with torch.no_grad():  # move everything off its start so every term counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = make_user_batch(data.split, np.arange(6), SamplingConfig(), np.random.default_rng(0))
    logits = model(batch.history, batch.candidates, batch.user_features, batch.context)
    full = model.score_all(batch.history, batch.user_features, batch.context)
    cand = batch.candidates.clamp(max=data.catalog.n_items - 1)
    mask = batch.candidates < data.catalog.n_items
    np.testing.assert_allclose(
        logits[mask].detach().numpy(), full.gather(1, cand)[mask].numpy(), rtol=1e-5, atol=1e-5
    )


def test_prior_negatives_are_drawn_from_the_prior_and_the_prior_leaves_the_training_logit(data) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    model = _head_model(data, ("mix",))
    model = HistoryMLP(replace(model.cfg, prior_negatives=True), data.catalog.genres)
    n = data.catalog.n_items
    prior = np.full(n, -30.0)
    prior[[3, 7]] = [np.log(0.25), np.log(0.75)]
    model.set_prior(prior)
    probs = model.negative_probs()
    assert probs is not None
    np.testing.assert_allclose(probs[[3, 7]], [0.25, 0.75], atol=1e-9)
    rng = np.random.default_rng(0)
    batch = make_user_batch(data.split, np.arange(20), SamplingConfig(), rng, probs)
    assert batch.labels is not None
    negs = batch.candidates[(batch.labels == 0) & (batch.candidates < n)]
    assert len(negs) and set(negs.tolist()) <= {3, 7}
    # Training: the per-item prior cancels; a constant logsumexp(prior) − log N stands for it.
    args = (batch.history, batch.candidates, batch.user_features, batch.context)
    model.eval()
    ranked = model(*args)
    model.train()
    trained = model(*args)
    const = float(torch.logsumexp(model.prior[:n], 0)) - np.log(n)
    cand = batch.candidates.clamp(max=n)
    np.testing.assert_allclose(
        trained.detach().numpy(), (ranked - model.prior[cand] + const).detach().numpy(), atol=1e-5
    )
    with pytest.raises(ValueError, match="needs fixed_prior"):
        ModelConfig(n_items=n, prior_negatives=True)


def test_dp_sgd_moves_only_the_listed_modules(data) -> None:  # type: ignore[no-untyped-def]
    model = _head_model(data, ("mix",))
    # The start is prior + 0.5·u·v: side embeddings and the output layer at 0, item table = genres.
    assert all(float(model.user_feats[j].weight.abs().sum()) == 0 for j in range(len(model.user_feats)))
    assert model.genre_proj is not None and float(model.genre_proj.weight.abs().sum()) == 0
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert [k for k, p in model.named_parameters() if p.requires_grad] == ["mix.weight"]
    cfg = LocalTrainConfig(local_epochs=2, batch_users=32, lr=0.1, max_grad_norm=1.0)
    train_round(model, data.split, cfg, noise_multiplier=1.0, seed=1)
    for k, p in model.named_parameters():
        if k == "mix.weight":
            assert not torch.equal(p, before[k]), "DP-SGD must train the mixing weight"
        else:
            assert torch.equal(p, before[k]), f"{k} is frozen but changed"


def test_genre_release_init_trains_the_head_and_the_ledger_charges_both_stages(
    fed: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = RunConfig(
        fed_dir=str(fed),
        run_dir=str(run),
        run_name="head",
        num_tenants=TENANTS,
        approach="mlp",
        epsilon=6.0,
        release_init=0.8,
        release_init_items="genres",
        release_init_pop=1.0,
        dot_mix=0.0,
        dp_train="mix,genre_proj",
        prior_negatives=True,
        num_server_rounds=2,
        batch_users=32,
        lr=0.1,
        accountant="rdp",
    )
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    run_federation(grid, cfg, log=lambda _: None)
    # Round 1: each tenant released its popularity vector only (ρ = 1: no Gram left a tenant).
    releases = [
        m
        for m in grid.received
        if not m.has_error() and m.content.array_records and "popularity" in arrays_of(m.content)
    ]
    assert len(releases) == TENANTS
    assert all(set(arrays_of(m.content)) == {"popularity"} for m in releases)
    total = {"popularity": sum(arrays_of(m.content)["popularity"].astype(np.float64) for m in releases)}
    sigmas = [float(metrics_of(m.content, "metrics")["noise-multiplier"]) for m in releases]
    users = sum(int(metrics_of(m.content, "metrics")["num-examples"]) for m in releases)
    catalog = load_catalog(cfg)
    n = catalog.n_items
    emb, prior, facts = init_from_release(
        total,
        n_items=n,
        users=users,
        sigma_sum=float(np.sqrt(np.sum(np.square(sigmas)))),
        dim=cfg.dim,
        pop_share=1.0,
        source="genres",
        genres=catalog.genres,
    )
    assert facts["source"] == "genres" and "components" not in facts
    model = load_model(run).model
    assert isinstance(model, HistoryMLP)
    # Frozen: the public genre table and the DP prior are exactly what post-processing made of round 1.
    np.testing.assert_array_equal(model.item_emb.weight[:n].detach().numpy(), emb)
    np.testing.assert_allclose(model.prior[:n].numpy(), prior, rtol=0, atol=1e-6)
    # Frozen at their start: everything DP-SGD does not list (re-built from the run's seed).
    mcfg = init_model_config(
        model_config(catalog, cfg), dot_mix=0.0, trainable=("mix", "genre_proj"), prior_negatives=True
    )
    torch.manual_seed(cfg.seed)
    start = HistoryMLP(mcfg, catalog.genres)
    trained = dict(model.named_parameters())
    for k, p in start.named_parameters():
        if k.split(".")[0] in ("mix", "genre_proj"):
            assert not torch.equal(trained[k], p), f"{k} is listed in dp-train but did not move"
        elif k != "item_emb.weight":
            assert torch.equal(trained[k], p), f"{k} is frozen but changed"
    # The ledger charged the release (its share) and then the DP-SGD rounds; the total is within the cap.
    privacy = json.loads((run / "privacy.json").read_text())
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        # round 0: the noisy user count; 1: the release; 2–3: DP-SGD; 4: the DP test evaluation
        assert not problems and [e["round"] for e in entries] == [0, 1, 2, 3, 4]
        count, rel, sgd1, sgd2, final = entries
        assert rel["purpose"] == "mlp-init" and rel["release_share"] == 0.8 and rel["pop_share"] == 1.0
        assert count["epsilon"] < rel["epsilon"] and rel["sample_rate"] == 1.0 and rel["steps"] == 1
        assert 4.7 <= rel["epsilon"] <= 4.8 + 1e-9, "the count and the release spend the release's share"
        assert rel["epsilon"] < sgd1["epsilon"] < sgd2["epsilon"] < final["epsilon"] <= 6.0 + 1e-9
        assert privacy["tenants"][f"tenant-{t}"]["epsilon"] == pytest.approx(final["epsilon"])
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert rows[0]["release_init"]["pop_share"] == 1.0 and rows[0]["release_init"]["source"] == "genres"
    # `fedrec audit` checks round 1 as the release (q = 1, one step) and rounds 2–3 against the DP-SGD plan.
    report = check_run(load_run(run))
    assert not report.failed(), [(c.name, c.tenant, c.findings) for c in report.failed()]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"release_init": 0.5, "dp_train": "mix"}, "needs dot-mix >= 0"),
        ({"release_init": 0.5, "dp_train": "item_emb"}, "unknown module"),
        ({"release_init": 0.5, "release_init_items": "words"}, "release-init-items must be"),
        ({"release_init": 0.5, "release_init_pop": 1.0}, "needs a Gram part"),
        ({"release_init": 0.5, "release_init_pop": -0.5}, r"release-init-pop must be in \(0, 1\]"),
        ({"release_init": 0.0, "dot_mix": 1.0}, "need release-init > 0"),
        ({"release_init": 0.0, "prior_negatives": True}, "need release-init > 0"),
    ],
)
def test_head_settings_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(FedrecError, match=match):
        RunConfig(approach="mlp", **kwargs)  # type: ignore[arg-type]


def test_cli_refuses_a_head_setting_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec", "simulate", "--data", "synthetic", "--synth-users", "60",
         "--approach", "mlp", "--release-init", "0.5", "--dp-train", "mix", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "needs dot-mix >= 0" in lines[-1], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []

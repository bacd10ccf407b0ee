"""Issue 16: the release-init head with DP-EASE's item–item model as its frozen tables
(``--release-init-items ease``): the tables are DP-EASE exactly (post-processing of the same release),
the model's candidate-side table scores the same in training, ranking and serving, and a run through the
real loop trains on top of them, charges both stages and passes the audit (fast: in-process grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client.app import app
from fedrec.privacy import gram
from fedrec.privacy.ledger import read_entries
from fedrec.server.loop import load_catalog, run_federation
from fedrec.server.release_init import ease_tables, init_model_config, init_tables_from_release, row_selection
from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.codec import arrays_of, metrics_of
from fedrec.shared_model.dp_item import DPEASE, DPEASERule
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP, ModelConfig, fold_item_rows
from fedrec.shared_model.recommend import Recommender
from fedrec.shared_model.runconfig import RunConfig
from fedrec.shared_model.training import pad_rows
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid
from fedrec.simulations.reports.audit import check_run, load_run

TENANTS = 2
RULE = DPEASERule(min_items=5)


def _gram(rng: np.random.Generator, users: int, n: int, noise: float) -> np.ndarray:
    """A Gram of unit-norm user rows plus symmetric Gaussian noise of std ``noise``."""
    x = (rng.random((users, n)) < 0.15).astype(np.float64)
    x[x.sum(1) == 0, 0] = 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    e = np.triu(rng.normal(0.0, noise, (n, n)), 1)
    return x.T @ x + e + e.T + np.diag(rng.normal(0.0, noise, n))


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_the_ease_tables_are_dp_ease_of_the_same_release(noise: float) -> None:
    rng = np.random.default_rng(0)
    users, n = 400, 25
    g = _gram(rng, users, n, noise)
    support, h, scale, facts = ease_tables(
        g, users=users, offdiag_std=noise, diag_std=noise, dim=32, rule=RULE
    )
    dp = DPEASE(RULE).fit_gram(g, offdiag_std=noise, diag_std=noise, users=users)
    assert dp.items is not None and dp.weights is not None
    assert np.array_equal(support, dp.items) and facts["used"] == facts["components"] <= 32
    # B_ij = h_i·h_j · a_j off the diagonal, up to the one scale α² the tables carry
    b = (h @ h.T) * scale[None, :]
    np.fill_diagonal(b, 0.0)
    want = dp.weights.astype(np.float64)
    alpha2 = b[want != 0].dot(want[want != 0]) / want[want != 0].dot(want[want != 0])
    assert alpha2 > 0
    np.testing.assert_allclose(b / alpha2, want, rtol=1e-4, atol=1e-6)
    # the scale: the mean self-affinity a_j·‖h_j‖² over the support is 1
    assert float((scale * (h * h).sum(1)).mean()) == pytest.approx(1.0)


def test_fewer_columns_than_components_keep_the_strongest_and_say_so() -> None:
    rng = np.random.default_rng(1)
    g = _gram(rng, 500, 30, 0.0)
    _, h, _, facts = ease_tables(g, users=500, offdiag_std=0.0, diag_std=0.0, dim=4, rule=RULE)
    assert h.shape[1] == 4 and facts["used"] == 4 < facts["components"]


def _ease_model(n: int, dim: int, mix: float) -> HistoryMLP:
    cfg = init_model_config(
        ModelConfig(n_items=n, dim=dim, use_context=False),
        dot_mix=mix,
        trainable=("mix", "mlp"),
        prior_negatives=True,
        candidate_table=True,
    )
    torch.manual_seed(0)
    return HistoryMLP(cfg).eval()


def test_the_model_ranks_unseen_items_by_the_dp_ease_score() -> None:
    """prior 0, MLP output at 0: the logit is mix · u·(a_j h_j), u the history's mean h — DP-EASE's score
    of the history over n (times α²), for every unseen item, in the catalogue pass, the training forward
    and the serving kernel alike."""
    rng = np.random.default_rng(2)
    users, n = 400, 25
    packed = gram.pack_gram(_gram(rng, users, n, 0.3))
    g = gram.unpack_gram(packed, n)  # what the server unpacks (float32 on the wire)
    tabs = init_tables_from_release(
        {"popularity": np.diag(g).copy(), "gram": packed},
        n_items=n, users=users, sigma_sum=0.0, dim=32, pop_share=0.5, source="ease",
    )  # fmt: skip
    assert tabs.candidate is not None
    model = _ease_model(n, 32, mix=1.0)
    model.set_item_embeddings(tabs.emb)
    model.set_prior(np.zeros(n))
    model.set_candidate_delta(tabs.candidate)
    dp = DPEASE().fit_gram(g, offdiag_std=0.0, diag_std=0.0, users=users)
    assert dp.items is not None and len(dp.items) == n
    hists = [rng.choice(n, k, replace=False) for k in (1, 3, 6, 10)]
    hist = torch.from_numpy(pad_rows(hists, n))
    feats = torch.zeros((len(hists), 0), dtype=torch.int64)
    ctx = torch.full((len(hists), 2), -1, dtype=torch.int64)
    with torch.no_grad():
        got = model.score_all(hist, feats, ctx).numpy().astype(np.float64)
    x = np.zeros((len(hists), n))
    for r, h in enumerate(hists):
        x[r, h] = 1.0
    want = x @ dp.weights.astype(np.float64) / x.sum(1, keepdims=True)
    unseen = x == 0
    ratio = got[unseen] / want[unseen]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
    # training forward = catalogue pass on the same candidates (the candidate table enters both)
    cand = torch.from_numpy(np.tile(np.arange(n), (len(hists), 1)))
    with torch.no_grad():
        fwd = model(hist, cand, feats, ctx).numpy()
    np.testing.assert_allclose(fwd, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"release_init": 0.5, "release_init_items": "ease", "release_init_pop": 1.0}, "needs a Gram part"),
        ({"release_init": 0.5, "release_init_items": "eases"}, "genres\\+text or ease"),
    ],
)
def test_ease_settings_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(FedrecError, match=match):
        RunConfig(approach="mlp", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare_dataset(load("synthetic", synth_users=200, synth_items=60, seed=4))
    out = tmp_path_factory.mktemp("easehead") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=4, k_anonymity=2))
    return out


def test_an_ease_head_run_trains_on_the_release_tables_charges_both_stages_and_audits(
    fed: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = RunConfig(
        fed_dir=str(fed),
        run_dir=str(run),
        run_name="ease-head",
        num_tenants=TENANTS,
        approach="mlp",
        epsilon=6.0,
        release_init=0.9,
        release_init_items="ease",
        release_init_pop=0.05,
        dot_mix=30.0,
        dp_train="mix,mlp",
        prior_negatives=True,
        dp_mode="cohort",
        cohort_rate=0.5,
        max_grad_norm=0.05,
        server_lr=0.3,
        num_server_rounds=2,
        accountant="rdp",
        dp_rows=0,  # the tables stay exactly the release's (the rows' own test is below)
    )
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    run_federation(grid, cfg, log=lambda _: None)
    releases = [
        m
        for m in grid.received
        if not m.has_error() and m.content.array_records and "gram" in arrays_of(m.content)
    ]
    assert len(releases) == TENANTS
    total = {
        k: sum(arrays_of(m.content)[k].astype(np.float64) for m in releases) for k in ("popularity", "gram")
    }
    sigmas = [float(metrics_of(m.content, "metrics")["noise-multiplier"]) for m in releases]
    users = sum(int(metrics_of(m.content, "metrics")["num-examples"]) for m in releases)
    catalog = load_catalog(cfg)
    n = catalog.n_items
    tabs = init_tables_from_release(
        total, n_items=n, users=users, sigma_sum=float(np.sqrt(np.sum(np.square(sigmas)))), dim=cfg.dim,
        pop_share=0.05, source="ease",
    )  # fmt: skip
    assert tabs.candidate is not None
    loaded = load_model(run)
    model = loaded.model
    assert isinstance(model, HistoryMLP) and model.cfg.cand_table
    assert model.cand_delta is not None
    # frozen: both tables are exactly what post-processing made of round 1's summed release
    np.testing.assert_allclose(model.item_emb.weight[:n].detach().numpy(), tabs.emb, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.cand_delta[:n].numpy(), tabs.candidate, rtol=0, atol=1e-6)
    assert model.mix is not None and float(model.mix.weight.detach()[0, 0]) != 30.0, "DP-SGD did not move mix"
    out_layer = model.mlp[-1]
    assert isinstance(out_layer, torch.nn.Linear) and out_layer.weight.detach().abs().sum() > 0, (
        "mlp not trained"
    )
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    facts = rows[0]["release_init"]
    assert facts["source"] == "ease" and facts["support"] >= 1 and facts["used"] <= cfg.dim
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        assert not problems
        rel = next(e for e in entries if e.get("purpose") == "mlp-init")
        assert rel["release_share"] == 0.9 and rel["pop_share"] == 0.05
        assert max(e["epsilon"] for e in entries) <= 6.0 + 1e-9
    report = check_run(load_run(run))
    assert not report.failed(), [(c.name, c.tenant, c.findings) for c in report.failed()]
    # the saved model serves: a top-10 of unseen items through the recommender
    top = Recommender(loaded).recommend([np.array([0, 1, 2])], k=10)[0].items
    assert len(top) == 10 and not {0, 1, 2} & {int(i) for i in top}


def test_the_ease_table_brings_its_dp_sgd_defaults_and_explicit_values_win() -> None:
    cohort = RunConfig(
        approach="mlp", dp_mode="cohort", release_init=0.95, release_init_items="ease", release_init_pop=0.05
    )
    assert (cohort.dot_mix, cohort.dp_train, cohort.prior_negatives, cohort.max_grad_norm) == (
        300.0,
        "mix,mlp",
        True,
        0.05,
    )
    assert cohort.dp_rows == 100 and cohort.train_modules() == ("mix", "mlp", "item_rows")
    off = RunConfig(
        approach="mlp", dp_mode="cohort", release_init=0.95, release_init_items="ease", release_init_pop=0.05,
        dp_rows=0,
    )  # fmt: skip
    assert off.dp_rows == 0 and "item_rows" not in off.train_modules(), "an explicit 0 wins"
    # under the local-steps head too: the EASE keys come first, the head's only fill what is left
    head = RunConfig(approach="mlp", release_init_items="ease")
    assert head.release_init == 0.9 and head.dot_mix == 300.0 and head.dp_train == "mix,mlp"
    assert head.dp_rows == 0, "rows only in cohort rounds (local Adam steps push noisy rows past the bound)"
    mine = RunConfig(approach="mlp", release_init=0.9, release_init_items="ease", dot_mix=3.0, dp_train="mix")
    assert (mine.dot_mix, mine.dp_train) == (3.0, "mix")
    # the other tables keep their own defaults
    eigen = RunConfig(approach="mlp", dp_mode="cohort", release_init=0.9, release_init_items="eigen")
    assert eigen.dot_mix == -1.0 and eigen.dp_train == ""


def test_simulate_takes_the_table_width_and_refuses_a_bad_one_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    help_text = subprocess.run(
        [sys.executable, "-m", "fedrec", "simulate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout
    assert "--dim" in help_text and "ease" in help_text
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec", "simulate", "--data", "synthetic", "--synth-users", "60",
         "--dim", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--dim" in proc.stderr and not out.exists()


# ---------------------------------------------------------------- DP-FEST-style sparse item rows (dp-rows)
def test_sparse_item_rows_change_only_the_selected_items_and_fold_into_the_same_model() -> None:
    cfg = ModelConfig(n_items=30, dim=8, item_rows=5, trainable=("item_rows",), freeze_item_emb=True)
    model = HistoryMLP(cfg)
    picked = np.array([1, 3, 5, 7, 9])
    model.set_row_selection(picked)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["item_rows.weight"]
    hist, cand = torch.tensor([[1, 2, 30], [3, 4, 5]]), torch.tensor([[7, 8], [9, 0]])
    feats, ctx = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)
    model(hist, cand, feats, ctx).sum().backward()
    grad = model.item_rows.weight.grad  # type: ignore[union-attr]
    assert grad is not None and grad[5].abs().sum() == 0, "row M (the items not selected) gets no gradient"
    assert grad[:5].abs().sum() > 0
    with torch.no_grad():
        model.item_rows.weight.normal_()  # type: ignore[union-attr]  # trained rows, and noise on row M
    before, before_all = model(hist, cand, feats, ctx).detach(), model.score_all(hist, feats, ctx)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    table = weights["item_emb.weight"].copy()
    fold_item_rows(weights)
    moved = np.flatnonzero(np.abs(weights["item_emb.weight"] - table).sum(1) > 0)
    assert set(moved) == set(picked.tolist()) and not weights["item_rows.weight"].any()
    folded = HistoryMLP(cfg)
    folded.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    torch.testing.assert_close(folded(hist, cand, feats, ctx).detach(), before)
    torch.testing.assert_close(folded.score_all(hist, feats, ctx), before_all)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"approach": "mlp", "release_init": 0.0, "dp_rows": 10}, "dp-rows .* needs release-init > 0"),
        ({"approach": "mlp", "dp_rows": -2}, "dp-rows must be an integer ≥ 0"),
    ],
)
def test_bad_dp_rows_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(FedrecError, match=match):
        RunConfig(**kwargs)  # type: ignore[arg-type]


def test_a_dp_rows_run_trains_only_the_rows_of_the_dp_selected_items_and_audits(
    fed: Path, tmp_path: Path
) -> None:
    run = tmp_path / "rows"
    cfg = RunConfig(
        fed_dir=str(fed), run_dir=str(run), run_name="ease-rows", num_tenants=TENANTS, approach="mlp",
        epsilon=6.0, release_init=0.9, release_init_items="ease", release_init_pop=0.05, dp_rows=8,
        dp_mode="cohort", cohort_rate=0.5, server_lr=0.3, num_server_rounds=2, accountant="rdp", dim=16,
    )  # fmt: skip
    assert cfg.train_modules() == ("mix", "mlp", "item_rows")
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    run_federation(grid, cfg, log=lambda _: None)
    releases = [
        m
        for m in grid.received
        if not m.has_error() and m.content.array_records and "gram" in arrays_of(m.content)
    ]
    total = {
        k: sum(arrays_of(m.content)[k].astype(np.float64) for m in releases) for k in ("popularity", "gram")
    }
    sigmas = [float(metrics_of(m.content, "metrics")["noise-multiplier"]) for m in releases]
    users = sum(int(metrics_of(m.content, "metrics")["num-examples"]) for m in releases)
    n = load_catalog(cfg).n_items
    tabs = init_tables_from_release(
        total, n_items=n, users=users, sigma_sum=float(np.sqrt(np.sum(np.square(sigmas)))), dim=cfg.dim,
        pop_share=0.05, source="ease",
    )  # fmt: skip
    picked = row_selection(tabs.prior, 8)
    loaded = load_model(run)
    model = loaded.model
    assert isinstance(model, HistoryMLP) and model.cfg.item_rows == 8 and model.item_rows is not None
    assert not model.item_rows.weight.detach().any(), "the saved model holds the rows folded into the table"
    emb = model.item_emb.weight[:n].detach().numpy()
    others = np.setdiff1d(np.arange(n), picked)
    np.testing.assert_allclose(emb[others], tabs.emb[others], rtol=0, atol=1e-6)  # untouched: no noise
    assert np.abs(emb[picked] - tabs.emb[picked]).sum() > 0, "DP-SGD did not move the selected rows"
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert rows[0]["release_init"]["trained_rows"] == 8
    top = Recommender(loaded).recommend([np.array([0, 1, 2])], k=10)[0].items  # the serving path reads it
    assert len(top) == 10 and not {0, 1, 2} & {int(i) for i in top}
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        assert not problems and max(e["epsilon"] for e in entries) <= 6.0 + 1e-9
    report = check_run(load_run(run))
    assert not report.failed(), [(c.name, c.tenant, c.findings) for c in report.failed()]

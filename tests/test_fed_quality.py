"""Issue 16: the federated MLP's server optimizer, auto recipe and best-validation round (fast:
in-process grid, tiny synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrec.client.app import app
from fedrec.client.task import resolve_tenant, tenant_evaluate
from fedrec.server.aggregation import ServerOptimizer
from fedrec.server.loop import load_catalog, model_config, run_federation
from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.codec import state_weights
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.evaluate import EvalResult
from fedrec.shared_model.runconfig import AUTO_DP, AUTO_NO_DP, RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid

TENANTS = 2


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare_dataset(load("synthetic", synth_users=160, synth_items=60, seed=3))
    out = tmp_path_factory.mktemp("quality") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=3, k_anonymity=2))
    return out


# ---------------------------------------------------------------- server optimizer math
def test_fedavgm_step_matches_the_hand_computed_momentum_update() -> None:
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    d1 = {"w": np.array([1.0, 2.0], np.float32)}
    d2 = {"w": np.array([3.0, -1.0], np.float32)}
    # Flower's FedAvgM: g = −Δ; v = g in the first step; step = −η·v.
    np.testing.assert_allclose(opt.step(d1)["w"], [1.0, 2.0])
    # v = 0.5·(−1, −2) + (−3, 1) = (−3.5, 0) → step (3.5, 0)
    np.testing.assert_allclose(opt.step(d2)["w"], [3.5, 0.0])
    half = ServerOptimizer("fedavgm", lr=0.5, momentum=0.0)
    np.testing.assert_allclose(half.step(d2)["w"], [1.5, -0.5])
    np.testing.assert_allclose(ServerOptimizer("fedavg").step(d2)["w"], d2["w"])


def test_fedadam_step_matches_the_hand_computed_update_and_restores() -> None:
    opt = ServerOptimizer("fedadam", lr=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    step = opt.step({"w": np.array([2.0])})["w"]
    # m = 0.2, v = 0.04, η_t = 0.01·√(1−0.99)/(1−0.9) = 0.01 → 0.01·0.2/(0.2 + 0.001)
    np.testing.assert_allclose(step, [0.01 * 0.2 / 0.201], rtol=1e-6)
    again = ServerOptimizer("fedadam", lr=0.01)
    again.restore(opt.state())
    d = {"w": np.array([-1.0])}
    np.testing.assert_allclose(again.step(d)["w"], opt.step(d)["w"])
    with pytest.raises(ValueError, match="not 'fedavgm'"):
        ServerOptimizer("fedavgm").restore(opt.state())


# ---------------------------------------------------------------- auto recipe
def test_auto_settings_resolve_by_dp_mode_and_explicit_values_win() -> None:
    # release-init 0: plain DP-SGD (approach mlp under DP otherwise trains the DP head, whose lr is 0.3)
    plain, private = RunConfig(dp=False), RunConfig(release_init=0.0)
    for name, value in AUTO_NO_DP.items():
        assert getattr(plain, name) == value, name
    for name, value in AUTO_DP.items():
        assert getattr(private, name) == value, name
    assert RunConfig().lr == 0.3 and RunConfig().num_server_rounds == AUTO_DP["num_server_rounds"]
    assert plain.server_lr == 1.0 and RunConfig(dp=False, server_opt="fedadam").server_lr == 0.01
    mine = RunConfig(dp=False, num_server_rounds=2, local_epochs=1.5, lr=1e-3, server_opt="fedavg")
    assert (mine.num_server_rounds, mine.local_epochs, mine.lr, mine.server_opt) == (2, 1.5, 1e-3, "fedavg")
    # The mapping (settings as given) round-trips (a resumed run and the tenants read the same recipe).
    assert RunConfig.from_mapping(plain.to_mapping()) == plain
    for bad, match in (
        ({"server_opt": "sgd"}, "server-opt must be auto or one of"),
        ({"final_model": "first"}, "final-model must be auto or one of"),
        ({"server_momentum": 1.0}, "server-momentum must be in"),
        ({"lr": -1.0}, "lr must be > 0"),
    ):
        with pytest.raises(FedrecError, match=match):
            RunConfig(dp=False, **bad)  # type: ignore[arg-type]


def test_cli_refuses_an_unknown_server_optimizer_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec", "simulate", "--no-dp", "--server-opt", "sgd", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "server-opt must be auto or one of" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ---------------------------------------------------------------- best validation round
def _federated_val_ndcg(cfg: RunConfig, weights: dict[str, np.ndarray]) -> float:
    mcfg = model_config(load_catalog(cfg), cfg)
    total = None
    for i in range(TENANTS):
        part = EvalResult.from_record(
            tenant_evaluate(weights, mcfg, cfg, resolve_tenant({"partition-id": i}, cfg), "val")
        )
        total = part if total is None else total + part
    assert total is not None
    return float(total.to_metrics()["full"]["ndcg@10"])


def test_best_validation_round_is_the_model_kept_and_tested(fed: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Server steps far too large (η = 3, μ = 0.9): validation peaks in round 1, then the model overshoots.
    cfg = RunConfig(
        fed_dir=str(fed),
        run_dir=str(run),
        run_name="best",
        num_tenants=TENANTS,
        dp=False,
        num_server_rounds=3,
        local_epochs=3.0,
        lr=0.05,
        server_lr=3.0,
        server_momentum=0.9,
        batch_users=16,
    )
    assert cfg.final_model == "best-val" and cfg.server_opt == "fedavgm"
    metrics = run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lambda _: None)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    scores = [r["val"]["ndcg@10"] for r in rows]
    best = int(np.argmax(scores)) + 1
    assert best < len(rows), f"the setting must make a round other than the last the best: {scores}"
    assert metrics["final_model"] == {"rule": "best-val", "round": best, "val_ndcg@10": round(max(scores), 6)}
    assert [bool(r.get("best_so_far")) for r in rows][best - 1]
    kept = state_weights(load_model(run).model)
    assert _federated_val_ndcg(cfg, kept) == pytest.approx(max(scores), abs=1e-12)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["final_model"]["round"] == best


# ---------------------------------------------------------------- release-init (DP)
def test_release_init_is_post_processing_of_the_charged_release(fed: Path, tmp_path: Path) -> None:
    from fedrec.privacy.ledger import read_entries
    from fedrec.server.release_init import init_from_release
    from fedrec.shared_model.codec import arrays_of, metrics_of

    run = tmp_path / "run"
    cfg = RunConfig(
        fed_dir=str(fed),
        run_dir=str(run),
        run_name="init",
        num_tenants=TENANTS,
        approach="mlp",
        epsilon=6.0,
        release_init=0.5,
        num_server_rounds=1,
        batch_users=32,
        accountant="rdp",
    )
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    run_federation(grid, cfg, log=lambda _: None)
    # What the server received in round 1: each tenant's noisy release (nothing else left a tenant).
    releases = [
        m
        for m in grid.received
        if not m.has_error() and m.content.array_records and "gram" in arrays_of(m.content)
    ]
    assert len(releases) == TENANTS
    total: dict[str, np.ndarray] = {}
    for m in releases:
        for k, v in arrays_of(m.content).items():
            total[k] = total.get(k, 0) + v.astype(np.float64)
    sigmas = [float(metrics_of(m.content, "metrics")["noise-multiplier"]) for m in releases]
    users = sum(int(metrics_of(m.content, "metrics")["num-examples"]) for m in releases)
    n = load_catalog(cfg).n_items
    emb, prior, _ = init_from_release(
        total, n_items=n, users=users, sigma_sum=float(np.sqrt(np.sum(np.square(sigmas)))), dim=cfg.dim
    )
    model = load_model(run).model
    # Frozen by DP-SGD: the final model's item table and prior are exactly the post-processed release.
    np.testing.assert_allclose(model.item_emb.weight[:n].detach().numpy(), emb, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.prior[:n].numpy(), prior, rtol=0, atol=1e-6)
    assert np.abs(emb).sum() > 0, "the release must carry item structure into the table"
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["release_init"]["share_of_epsilon"] == 0.5
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["release_init"]["share"] == 0.5
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        # round 0: the noisy user count; 1: the release; 2: DP-SGD; 3: the DP test evaluation
        assert not problems and [e["round"] for e in entries] == [0, 1, 2, 3]
        count, rel, sgd, final = entries
        assert count["epsilon"] < rel["epsilon"]
        assert rel["purpose"] == "mlp-init" and rel["release_share"] == 0.5 and rel["steps"] == 1
        assert rel["sample_rate"] == 1.0 and rel["unit"] == "user"
        assert 2.9 <= rel["epsilon"] <= 3.0 + 1e-9, "the release alone spends its share of the cap"
        assert rel["epsilon"] < sgd["epsilon"] <= 6.0 + 1e-9, "release + DP-SGD compose within the cap"
        assert sgd["epsilon"] < final["epsilon"] <= 6.0 + 1e-9, "the DP evaluation is reserved in the cap"
        assert privacy["tenants"][f"tenant-{t}"]["epsilon"] == pytest.approx(final["epsilon"])


def test_release_init_is_refused_where_it_does_not_apply() -> None:
    with pytest.raises(FedrecError, match="needs approach mlp"):
        RunConfig(approach="dp_ease", release_init=0.5)
    with pytest.raises(FedrecError, match=r"release-init must be in \[0, 1\)"):
        RunConfig(approach="mlp", release_init=1.0)
    cfg = RunConfig(approach="mlp", release_init=0.25, num_server_rounds=4)
    assert cfg.planned_rounds() == 5, "the tenant's σ is planned over the release + 4 DP-SGD rounds"


def test_resume_continues_the_server_momentum_and_the_best_round(fed: Path, tmp_path: Path) -> None:
    """No DP (public seeds): a run killed in round 3 and resumed ends with exactly the weights of an
    uninterrupted run — only true if the FedAvgM momentum and the best round were checkpointed."""
    from flwr.app import Message, MessageType

    class Killed(BaseException):
        pass

    def kill_in_round_3(_nid: int, msg: Message) -> str | None:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.group_id == "3":
            raise Killed
        return None

    def cfg_for(name: str) -> RunConfig:
        return RunConfig(
            fed_dir=str(fed), run_dir=str(tmp_path / name), run_name=name, num_tenants=TENANTS, dp=False,
            num_server_rounds=3, local_epochs=1.0, batch_users=16, server_momentum=0.9,
        )  # fmt: skip

    whole = cfg_for("whole")
    run_federation(LoopbackGrid(app, whole.to_mapping(), TENANTS), whole, log=lambda _: None)
    cut = cfg_for("cut")
    with pytest.raises(Killed):
        run_federation(
            LoopbackGrid(app, cut.to_mapping(), TENANTS, drop=kill_in_round_3), cut, log=lambda _: None
        )
    resumed = RunConfig.from_mapping({**cut.to_mapping(), "resume": True})
    got = run_federation(LoopbackGrid(app, resumed.to_mapping(), TENANTS), resumed, log=lambda _: None)
    want = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert got["final_model"] == want["final_model"]
    a, b = (
        state_weights(load_model(tmp_path / "whole").model),
        state_weights(load_model(tmp_path / "cut").model),
    )
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)

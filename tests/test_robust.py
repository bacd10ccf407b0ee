"""Update validation, robust aggregation and simulated faults (fast: in-process grid, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client.app import app
from fedrec.client.faults import SimulatedDropout, corrupt, maybe_drop, simulated
from fedrec.server.aggregation import aggregate
from fedrec.server.loop import run_federation, validate_update
from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid

#: adversary kind → what the server's rejection reason must say
MALFORMED = {
    "nan": "non-finite",
    "inf": "non-finite",
    "shape": "shape (1,",
    "dtype": "dtype float64",
    "keys": "keys differ",
    "scale=1e6": "L2 norm",
    "users=0": "user count 0",
    "users=-3": "user count -3",
    "users=100000": "user count 100000",
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = len(MALFORMED) + 1
    data = prepare_dataset(load("synthetic", synth_users=30 * n, synth_items=60, seed=4))
    out = tmp_path_factory.mktemp("robust") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=n, partition="iid", seed=4, k_anonymity=2))
    return out


def test_every_malformed_update_kind_is_rejected_and_the_model_stays_finite(
    fed: Path, tmp_path: Path
) -> None:
    kinds = list(MALFORMED)
    n = len(kinds) + 1
    cfg = RunConfig(
        fed_dir=str(fed),
        run_dir=str(tmp_path / "run"),
        run_name="malformed",
        num_server_rounds=1,
        num_tenants=n,
        dp=False,
        batch_users=16,
        fault_adversary=",".join(f"tenant-{i}:{k}" for i, k in enumerate(kinds)),
    )
    run_federation(LoopbackGrid(app, cfg.to_mapping(), n), cfg, log=lambda _: None)
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[0])
    for i, kind in enumerate(kinds):
        info = row["tenants"][f"tenant-{i}"]
        assert info["status"] == "rejected" and MALFORMED[kind] in info["reason"], (kind, info)
    assert row["tenants"][f"tenant-{n - 1}"]["aggregated"] is True
    assert row["aggregated"] == 1 and row["faults"]["adversary"]["tenant-0"] == "nan"
    state = load_model(tmp_path / "run").model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_validate_update_bounds_the_norm_of_the_change() -> None:
    ref = {"a": np.ones((2, 3), np.float32)}
    assert validate_update({"a": ref["a"] + 1}, ref, 5, max_norm=3.0) is None  # ‖Δ‖ = √6
    problem = validate_update({"a": ref["a"] + 2}, ref, 5, max_norm=3.0)  # ‖Δ‖ = √24
    assert problem is not None and "L2 norm 4.899" in problem


def honest_and_adversary(kind: str) -> tuple[list[tuple[dict[str, np.ndarray], int]], np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 8)).astype(np.float32)
    step = rng.normal(scale=0.01, size=(50, 8)).astype(np.float32)  # the honest direction
    honest = [base + step + rng.normal(scale=0.002, size=step.shape).astype(np.float32) for _ in range(4)]
    adversary, _ = corrupt(kind, {"w": honest[0]}, {"w": base}, 10)
    updates = [({"w": w}, 10) for w in honest] + [(adversary, 10)]
    return updates, np.mean(honest, axis=0)


@pytest.mark.parametrize("kind", ["signflip", "scale=8", "scale=-20"])
def test_median_and_trimmed_keep_an_adversary_from_moving_the_model_far(kind: str) -> None:
    updates, honest_mean = honest_and_adversary(kind)

    def dist(method: str, cut: float = 0.0) -> float:
        return float(np.linalg.norm(aggregate(updates, method, cut)["w"] - honest_mean))

    spread = float(np.linalg.norm(updates[0][0]["w"] - honest_mean))  # one honest tenant's own noise
    assert dist("fedavg") > 2 * spread, "the adversary does move plain FedAvg"
    assert dist("median") < spread
    assert dist("trimmed", 0.2) < spread


def test_aggregation_names_are_checked_and_robust_rules_refuse_secagg() -> None:
    assert RunConfig(aggregation="trimmed:0.2").aggregation_method() == ("trimmed", 0.2)
    assert RunConfig(aggregation="median").aggregation_method() == ("median", 0.0)
    for bad in ("mean", "trimmed:0.5", "trimmed:x", "trimmed"):
        with pytest.raises(FedrecError, match="fedavg, median or trimmed"):
            RunConfig(aggregation=bad)
    with pytest.raises(FedrecError, match="SecAgg"):
        RunConfig(secagg=True, aggregation="trimmed:0.1")


def test_cli_refuses_secagg_with_a_robust_rule_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedrec.simulations.cli.main import app as cli

    result = CliRunner().invoke(
        cli, ["simulate", "--secagg", "--aggregation", "median", "--out", str(tmp_path / "x")]
    )
    assert isinstance(result.exception, FedrecError) and "with --secagg" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_fault_specs_are_parsed_and_checked() -> None:
    cfg = RunConfig(
        fault_crash="tenant-1@3,tenant-1@5", fault_adversary="tenant-0:scale=1e6,tenant-2:signflip"
    )
    assert cfg.crash_rounds() == {"tenant-1": {3, 5}}
    assert cfg.adversaries() == {"tenant-0": "scale=1e6", "tenant-2": "signflip"}
    for bad in ({"fault_crash": "tenant-1"}, {"fault_crash": "tenant-1@0"}, {"fault_adversary": "t:boom"}):
        with pytest.raises(FedrecError):
            RunConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(FedrecError, match="fault-dropout"):
        RunConfig(fault_dropout=1.0)


def test_dropout_draws_are_seeded_per_tenant_and_round_at_the_asked_rate() -> None:
    cfg = RunConfig(fault_dropout=0.3, seed=5)
    draws = [cfg.drops_out(f"tenant-{t}", r) for t in range(20) for r in range(1, 101)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [cfg.drops_out(f"tenant-{t}", r) for t in range(20) for r in range(1, 101)]
    assert not RunConfig().drops_out("tenant-0", 1)


def test_faults_act_only_on_simulated_nodes() -> None:
    cfg = RunConfig(fault_dropout=0.999999)
    with pytest.raises(SimulatedDropout):
        maybe_drop(cfg, {"partition-id": 0}, "tenant-0", 1)
    real = {"tenant-dir": "/x", "key-file": "/k", "state-dir": "/s"}
    assert not simulated(real)
    maybe_drop(cfg, real, "tenant-0", 1)  # a real SuperNode ignores simulated faults


def test_corrupt_kinds() -> None:
    base = {"a": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    upd = {"a": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    assert np.isnan(corrupt("nan", upd, base, 5)[0]["a"]).any()
    inf = corrupt("inf", upd, base, 5)[0]["a"]
    assert np.isposinf(inf).any() and np.isneginf(inf).any()
    np.testing.assert_allclose(corrupt("scale=3", upd, base, 5)[0]["b"], 3.0)
    np.testing.assert_allclose(corrupt("signflip", upd, base, 5)[0]["b"], -1.0)
    assert corrupt("shape", upd, base, 5)[0]["a"].shape == (1, 2)
    assert corrupt("dtype", upd, base, 5)[0]["a"].dtype == np.float64
    assert "extra.weight" in corrupt("keys", upd, base, 5)[0]
    assert corrupt("users=-1", upd, base, 5)[1] == -1
    assert np.array_equal(upd["a"], np.ones((3, 2))), "the honest update is not modified in place"


def test_preflight_refuses_faults_naming_unknown_tenants(fed: Path) -> None:
    from fedrec.simulations.driver.simulate import open_federation, preflight
    from fedrec.simulations.errors import DataError

    federation = open_federation(fed)
    preflight(federation, RunConfig(dp=False, fault_adversary="tenant-0:nan"))
    with pytest.raises(DataError, match="unknown tenant"):
        preflight(federation, RunConfig(dp=False, fault_crash="tenant-99@1"))


def test_simulated_dropouts_are_recorded_and_the_round_goes_on(fed: Path, tmp_path: Path) -> None:
    n = len(MALFORMED) + 1
    cfg = RunConfig(
        fed_dir=str(fed),
        run_dir=str(tmp_path / "run"),
        run_name="dropout",
        num_server_rounds=1,
        num_tenants=n,
        dp=False,
        batch_users=16,
        fault_dropout=0.4,
        seed=3,
    )
    dropped = cfg.planned_faults([f"tenant-{i}" for i in range(n)], 1).get("dropout", [])
    assert 0 < len(dropped) < n, "the seeded draw drops some tenants, not all"
    run_federation(LoopbackGrid(app, cfg.to_mapping(), n), cfg, log=lambda _: None)
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[0])
    assert row["faults"]["dropout"] == dropped
    reasons = [f["reason"] for f in row["failures"]]
    assert len(reasons) == len(dropped)
    assert all(any(f"{t} dropped out of round 1" in r for r in reasons) for t in dropped)
    assert row["aggregated"] == n - len(dropped)

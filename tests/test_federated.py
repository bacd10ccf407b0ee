"""Federated training with user-level DP: the ClientApp's replies, budgets, the server's aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import fedrec.client.app as client_app
from fedrec.client.task import LEDGER_FILE, resolve_tenant, tenant_evaluate, tenant_train
from fedrec.privacy.errors import BudgetError, VaultError
from fedrec.privacy.ledger import max_recompute_error, read_entries, verify_chain
from fedrec.server.loop import fedavg, model_config, validate_update
from fedrec.shared_model.codec import parameter_weights, state_weights, to_record
from fedrec.shared_model.data import Catalog
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare_dataset(load("synthetic", synth_users=300, synth_items=150, seed=1))
    out = tmp_path_factory.mktemp("fed") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=2, partition="iid", seed=1))
    return out


def catalog_of(fed: Path) -> Catalog:
    return Catalog.from_json(json.loads((fed / "catalog.json").read_text()))


def run_cfg(fed: Path, **kw: object) -> RunConfig:
    # release-init 0: plain DP-SGD of the whole MLP (approach mlp under DP otherwise trains the DP head)
    base = dict(
        fed_dir=str(fed), run_name="t", batch_users=32, num_server_rounds=2, epsilon=4.0, release_init=0.0
    )
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def global_model(fed: Path, cfg: RunConfig) -> tuple[HistoryMLP, dict[str, np.ndarray]]:
    cat = catalog_of(fed)
    model = HistoryMLP(model_config(cat, cfg), cat.genres)
    return model, state_weights(model)


def make_message(content: RecordDict, kind: str) -> Message:
    """A server→node message as the Grid would build it (Flower needs a task identity for that)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    return Message(content=content, dst_node_id=7, message_type=kind)


def test_train_reply_carries_only_shared_parameters_and_whitelisted_metrics(fed: Path) -> None:
    cfg = run_cfg(fed, run_name="whitelist")
    model, weights = global_model(fed, cfg)
    content = RecordDict(
        {
            "arrays": to_record(weights),
            "config": ConfigRecord({"round": 1, "model-config": json.dumps(model.cfg.to_json())}),
        }
    )
    msg = make_message(content, MessageType.TRAIN)
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_mapping(),
    )
    reply = client_app.train(msg, ctx)
    rd = reply.content
    assert set(rd.keys()) == {"arrays", "metrics", "status"}
    assert set(rd.array_records["arrays"].keys()) == set(parameter_weights(model)), "shared parameters only"
    assert "genres" not in rd.array_records["arrays"]
    assert set(rd.metric_records["metrics"].keys()) == set(client_app.TRAIN_METRIC_KEYS)
    status = rd.config_records["status"]
    assert set(status.keys()) == {"tenant", "status", "message", "ledger-entries"}
    assert status["tenant"] == "tenant-0" and status["status"] == "ok"
    # no head sent: the whole ledger — the noisy count (round 0), then round 1
    count, entry = json.loads(str(status["ledger-entries"]))
    assert count["round"] == 0 and count["mechanism"] == "gaussian-count"
    assert entry["unit"] == "user" and entry["poisson"] is True and entry["secure_mode"] is False
    assert count["relation"] == entry["relation"] == "add-remove-one-user"
    assert entry["users"] == count["users"] == rd.metric_records["metrics"]["users"], "one draw of the count"
    # nothing in the reply names a user: compare against the tenant's pseudonyms
    from fedrec.client.vault import load_tenant

    paths = resolve_tenant(ctx.node_config, cfg)
    pseudonyms = load_tenant(paths.tenant_dir, paths.key_file).split.pseudonyms
    text = json.dumps({k: dict(v) for k, v in rd.config_records.items()}) + json.dumps(
        dict(rd.metric_records["metrics"])
    )
    assert pseudonyms and not any(p in text for p in pseudonyms)


def test_cap_refusal_over_extra_rounds_never_exceeds_the_cap(fed: Path) -> None:
    cfg = run_cfg(fed, run_name="cap", num_server_rounds=2, epsilon=2.0)
    model, weights = global_model(fed, cfg)
    paths = resolve_tenant({"partition-id": 1}, cfg)
    outcomes = [tenant_train(weights, model.cfg, cfg, paths, r) for r in range(1, 5)]
    assert [o.status for o in outcomes] == ["ok", "ok", "capped", "capped"]
    assert outcomes[2].weights is None and outcomes[3].weights is None, "a capped tenant sends no update"
    assert "cap" in outcomes[2].message
    entries, problems = read_entries(paths.state_dir / LEDGER_FILE)
    assert not problems and [e["round"] for e in entries] == [0, 1, 2], "the noisy count, then two rounds"
    assert not verify_chain(entries)
    assert max(e["epsilon"] for e in entries) <= 2.0 + 1e-9
    # calibration spends the plan, not less: training leaves exactly the reserved DP evaluation
    from fedrec.privacy.accounting import epsilon

    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries] + [(10.0, 1.0, 1)]
    assert epsilon(history=history, delta=cfg.delta, accountant="prv") == pytest.approx(2.0, rel=0.02)
    assert max_recompute_error(entries) <= 1e-6


def test_a_round_is_never_charged_twice(fed: Path) -> None:
    cfg = run_cfg(fed, run_name="twice", num_server_rounds=3)
    model, weights = global_model(fed, cfg)
    paths = resolve_tenant({"partition-id": 0}, cfg)
    first = tenant_train(weights, model.cfg, cfg, paths, 1)
    again = tenant_train(weights, model.cfg, cfg, paths, 1)
    assert first.status == "ok" and again.status == "already-charged" and "already charged" in again.message
    assert again.weights is None and again.epsilon == first.epsilon
    entries, _ = read_entries(paths.state_dir / LEDGER_FILE)
    assert [e["round"] for e in entries] == [0, 1]  # the noisy count, then round 1 once


def test_no_dp_trains_without_budget_or_ledger(fed: Path) -> None:
    cfg = run_cfg(fed, run_name="nodp", dp=False)
    model, weights = global_model(fed, cfg)
    paths = resolve_tenant({"partition-id": 0}, cfg)
    out = tenant_train(weights, model.cfg, cfg, paths, 1)
    assert out.status == "ok" and out.epsilon is None and out.ledger_entry is None
    assert not (paths.state_dir / LEDGER_FILE).exists()
    assert any(not np.array_equal(out.weights[k], weights[k]) for k in out.weights)  # type: ignore[index]


def test_delta_must_be_below_one_over_users(fed: Path) -> None:
    cfg = run_cfg(fed, run_name="delta", delta=0.5)
    model, weights = global_model(fed, cfg)
    with pytest.raises(BudgetError, match="δ|delta"):
        tenant_train(weights, model.cfg, cfg, resolve_tenant({"partition-id": 0}, cfg), 1)


def test_missing_tenant_folder_is_a_clear_error(fed: Path) -> None:
    cfg = run_cfg(fed, run_name="missing")
    model, weights = global_model(fed, cfg)
    with pytest.raises(VaultError, match="tenant-5"):
        tenant_train(weights, model.cfg, cfg, resolve_tenant({"partition-id": 5}, cfg), 1)


def test_evaluation_sums_from_two_tenants_add_up(fed: Path) -> None:
    from fedrec.shared_model.evaluate import EvalResult

    cfg = run_cfg(fed, run_name="eval")
    model, weights = global_model(fed, cfg)
    parts = [
        EvalResult.from_record(
            tenant_evaluate(weights, model.cfg, cfg, resolve_tenant({"partition-id": p}, cfg), "test")
        )
        for p in (0, 1)
    ]
    total = (parts[0] + parts[1]).to_metrics()
    users = [p.to_metrics()["full"]["users"] for p in parts]
    assert total["full"]["users"] == sum(users) > 0
    hr = [p.to_metrics()["full"]["hr@10"] for p in parts]
    # the merged HR is the user-weighted mean of the parts (sums divided once), not their plain mean
    assert total["full"]["hr@10"] == pytest.approx((hr[0] * users[0] + hr[1] * users[1]) / sum(users))


def test_validate_update_rejects_malformed_updates() -> None:
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    ok = {k: v + 1 for k, v in ref.items()}
    assert validate_update(ok, ref, 5) is None
    bad = {
        "nan": {**ok, "a": np.full((2, 3), np.nan, np.float32)},
        "inf": {**ok, "b": np.array([0, np.inf, 0, 0], np.float32)},
        "shape": {**ok, "a": np.zeros((1, 3), np.float32)},  # broadcastable, still refused
        "dtype": {**ok, "b": np.zeros(4, np.float64)},
        "extra key": {**ok, "c": np.zeros(1, np.float32)},
        "missing key": {"a": ok["a"]},
    }
    for name, upd in bad.items():
        assert validate_update(upd, ref, 5) is not None, name
    assert validate_update(ok, ref, 0) is not None
    assert validate_update(ok, ref, 11, max_users=10) is not None


def test_fedavg_weights_by_users() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 6.0], np.float32)}
    out = fedavg([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 5.0])
    assert out["w"].dtype == np.float32


def test_run_config_rejects_unknown_keys_and_bad_caps() -> None:
    from fedrec.shared_model.errors import FedrecError

    with pytest.raises(FedrecError, match="unknown run-config key 'epsilonn'"):
        RunConfig.from_mapping({"epsilonn": 3.0})
    with pytest.raises(FedrecError, match="caps must look like"):
        RunConfig(caps="tenant-0=-1")
    with pytest.raises(FedrecError, match="ε cap must be > 0"):
        RunConfig(epsilon=0)
    assert RunConfig(caps="tenant-1=2").cap_for("tenant-1") == 2.0


def test_pyproject_run_config_defaults_match_the_dataclass() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    from dataclasses import fields

    # The dataclass' declared defaults (auto settings unresolved), exactly as `flwr run .` reads them.
    declared = {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}
    assert pyproject["tool"]["flwr"]["app"]["config"] == declared

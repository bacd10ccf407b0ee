"""dp-mode cohort (DP-FedAvg-style rounds) and its distributed noise under SecAgg+ (issue 16).

One small synthetic federation and one SecAgg+ cohort run over the in-process grid (the real ServerApp
loop and ClientApp, secaggplus_mod included) are shared by the tests; the greedy-server test sends one
plain TRAIN message, and the variance test calls the tenant's own training function.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedrec.client.app import app
from fedrec.client.task import LEDGER_FILE, load_data, local_config, resolve_tenant, tenant_train
from fedrec.client.train import plan_cohort, share_noise_multiplier, train_round
from fedrec.privacy.audit import RunPlan, check_ledger, replay_ledger
from fedrec.privacy.ledger import read_entries
from fedrec.server.loop import load_catalog, model_config, run_federation
from fedrec.shared_model.codec import load_weights, parameter_weights, to_record
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.runconfig import AUTO_COHORT, AUTO_COHORT_RATE, RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid
from fedrec.simulations.reports.audit import check_run, load_run
from fedrec.simulations.reports.dpsgd_audit import GradientAuditConfig, dpsgd_claim, gradient_audit

TENANTS = 3
EPSILON = 3.0


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare_dataset(load("synthetic", synth_users=300, synth_items=60, seed=5))
    out = tmp_path_factory.mktemp("cohort") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=5, k_anonymity=2))
    return out


def cohort_cfg(fed: Path, name: str, **kw: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "num_tenants": TENANTS,
        "epsilon": EPSILON,
        "dp_mode": "cohort",
        "num_server_rounds": 2,
        "eval_privacy": "exact",
        "eval_every": 2,
        **kw,
    }
    return RunConfig(fed_dir=str(fed), run_dir=str(fed.parent / name), run_name=name, **settings)


@pytest.fixture(scope="module")
def secagg_run(fed: Path) -> RunConfig:
    cfg = cohort_cfg(fed, "secagg-cohort", secagg=True)
    run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lambda _: None)
    return cfg


def _cohort_entries(path: Path) -> list[dict[str, Any]]:
    entries, problems = read_entries(path)
    assert not problems
    return [e for e in entries if e.get("dp_mode") == "cohort"]


def test_secagg_cohort_splits_the_noise_over_the_threshold_and_audits(secagg_run: RunConfig) -> None:
    out = Path(secagg_run.run_dir)
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rows] == [TENANTS, TENANTS]
    assert rows[0]["secagg"]["threshold"] == 2
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["dp_mode"] == "cohort" and privacy["noise"].startswith("distributed")
    for t in range(TENANTS):
        entries = _cohort_entries(out / "ledger" / f"tenant-{t}.jsonl")
        assert [e["round"] for e in entries] == [1, 2]
        for e in entries:
            # one step per round at the cohort rate; the sum's σ is charged, each tenant added σ/√2
            assert (e["sample_rate"], e["steps"]) == (AUTO_COHORT_RATE, 1)
            assert e["noise_mode"] == "distributed" and e["shares"] == 2
            assert e["local_noise_multiplier"] == pytest.approx(e["noise_multiplier"] / np.sqrt(2))
            assert e["epsilon"] < e["epsilon_if_alone"] and e["epsilon"] <= e["cap"] == EPSILON
        # the planned rounds spend the cap, never more
        assert EPSILON - 0.01 < entries[-1]["epsilon"] <= EPSILON
    report = check_run(load_run(out))
    failed = [(t, c.name) for t, a in report.tenants.items() for c in a.checks if c.findings]
    assert not failed and not [c.name for c in report.run_checks if c.findings]


def test_the_audit_recomputes_the_noise_split_and_epsilon_if_alone(secagg_run: RunConfig) -> None:
    entries, _ = read_entries(Path(secagg_run.run_dir) / "ledger" / "tenant-0.jsonl")

    def findings(mutated: list[dict[str, Any]]) -> list[str]:
        checks = check_ledger("tenant-0", mutated, replay=replay_ledger(mutated, cross_check=False))
        return [f.message for c in checks if c.name == "epsilon_replay" for f in c.findings]

    assert findings(entries) == []
    lied = [dict(e) for e in entries]
    lied[-1]["epsilon_if_alone"] = lied[-1]["epsilon"]  # claims the share alone is as safe as the sum
    assert any("epsilon_if_alone" in m for m in findings(lied))
    greedy = [dict(e) for e in entries]
    greedy[-1]["local_noise_multiplier"] = greedy[-1]["noise_multiplier"] / 10  # a smaller share
    assert any("σ/√shares" in m for m in findings(greedy))
    plan = RunPlan(cohort_rate=0.25)  # not the run's rate: the cohort plan check fails
    checks = check_ledger("tenant-0", entries, plan=plan)
    assert [c for c in checks if c.name == "steps_match_plan" and c.findings]


def test_a_greedy_server_message_cannot_reduce_the_noise(fed: Path) -> None:
    """In the clear the server sees each tenant's noisy sum alone: the tenant adds its full σ whatever
    the message claims about shares, thresholds or noise modes."""
    cfg = cohort_cfg(fed, "greedy")
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    nid = sorted(grid.get_node_ids())[0]
    model = HistoryMLP(model_config(load_catalog(cfg), cfg))
    config = ConfigRecord(
        {
            "round": 1,
            "model-config": json.dumps(model.cfg.to_json()),
            "ledger-head": "",
            "shares": 50,
            "threshold": 50,
            "noise-mode": "distributed",
        }
    )
    content = RecordDict({"arrays": to_record(parameter_weights(model)), "config": config})
    msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid, group_id="1")
    (reply,) = grid.send_and_receive([msg], timeout=120)
    count, entry = json.loads(str(reply.content.config_records["status"]["ledger-entries"]))
    assert count["mechanism"] == "gaussian-count"
    assert entry["dp_mode"] == "cohort" and entry["noise_mode"] == "local" and entry["shares"] == 1
    assert entry["local_noise_multiplier"] == entry["noise_multiplier"]
    assert entry["epsilon_if_alone"] == entry["epsilon"]
    # the update's weight is the expected cohort ⌊q·ñ⌋, not the user count
    assert int(reply.content.metric_records["metrics"]["num-examples"]) == int(entry["users"] * 0.5)
    # and a cohort tenant never splits its noise outside SecAgg+, even if asked in code
    with pytest.raises(FedrecError, match="only dp-mode cohort"):
        tenant_train(
            parameter_weights(model),
            model.cfg,
            RunConfig(fed_dir=str(fed), run_name="x"),
            resolve_tenant({"partition-id": 0}, cfg),
            1,
            shares=2,
        )


def test_the_shares_of_the_noise_add_up_to_the_full_variance(fed: Path) -> None:
    """Through the tenant's own training round (Opacus' noise, fixed seeds): each of k shares carries
    σ·C/√k on every coordinate of the sum, and k of them add up to variance (σ·C)²."""
    cfg = cohort_cfg(fed, "variance")
    split = load_data(resolve_tenant({"partition-id": 0}, cfg)).split
    local = local_config(cfg)
    plan = plan_cohort(split.n_users, cfg.cohort_rate)
    mcfg = model_config(load_catalog(cfg), cfg)
    start = parameter_weights(HistoryMLP(mcfg))

    def noisy_sum(noise_multiplier: float, seed: int) -> np.ndarray:
        model = HistoryMLP(mcfg)
        load_weights(model, start)
        train_round(model, split, local, noise_multiplier=noise_multiplier, seed=seed, plan=plan)
        after = parameter_weights(model)
        # one SGD step of size 1: start − after = (clipped sum + noise) / expected cohort
        return np.concatenate([(start[k] - after[k]).ravel() for k in sorted(start)]) * plan.expected_batch

    sigma, shares = 1.7, 3
    noise = [
        noisy_sum(share_noise_multiplier(sigma, shares), seed) - noisy_sum(0.0, seed) for seed in (11, 12, 13)
    ]
    d = noise[0].size
    assert d > 5_000
    tol = 4 * np.sqrt(2 / d)  # relative s.e. of a std estimated from d normal draws, 4 s.e.
    for one in noise:
        assert abs(one.std() / (sigma * cfg.max_grad_norm / np.sqrt(shares)) - 1) < tol
    assert abs(np.sum(noise, axis=0).std() / (sigma * cfg.max_grad_norm) - 1) < tol
    assert share_noise_multiplier(sigma, 1) == sigma


def test_a_tenant_at_its_cap_trains_no_more(secagg_run: RunConfig) -> None:
    paths = resolve_tenant({"partition-id": 1}, secagg_run)
    before = (paths.state_dir / LEDGER_FILE).read_text()
    model = HistoryMLP(model_config(load_catalog(secagg_run), secagg_run))
    out = tenant_train(parameter_weights(model), model.cfg, secagg_run, paths, 3, shares=2)
    assert out.status == "capped" and out.weights is None and out.epsilon is not None
    assert out.epsilon <= EPSILON and (paths.state_dir / LEDGER_FILE).read_text() == before


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"dp_mode": "fedsgd"}, "dp-mode must be one of local-steps, cohort"),
        ({"dp_mode": "cohort", "dp": False}, "needs DP"),
        ({"dp_mode": "cohort", "cohort_rate": 1.5}, "cohort-rate must be in"),
        ({"cohort_rate": 0.3}, "needs dp-mode cohort"),
        ({"dp_mode": "cohort", "lr": 0.1}, "server-lr instead"),
    ],
)
def test_bad_cohort_settings_are_refused(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(FedrecError, match=match):
        RunConfig(**bad)


def test_cli_refuses_a_bad_dp_mode_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec", "simulate", "--dp-mode", "fedsgd", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dp-mode must be one of local-steps, cohort" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_auto_cohort_recipe_and_its_defaults_reach_flwr_run() -> None:
    cfg = RunConfig(dp_mode="cohort")
    for name, value in AUTO_COHORT.items():
        assert getattr(cfg, name) == value, name
    assert cfg.cohort_rate == AUTO_COHORT_RATE and RunConfig.from_mapping(cfg.to_mapping()) == cfg
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    conf = pyproject["tool"]["flwr"]["app"]["config"]
    assert conf["dp-mode"] == "local-steps" and conf["cohort-rate"] == 0.0


def test_a_secagg_sum_with_fewer_noise_shares_than_the_split_is_not_used(fed: Path) -> None:
    """Two of three tenants refuse their own (corrupted) update before masking: the sum then holds one
    σ/√2 share, less than the σ every tenant was charged for, and the server leaves the model alone."""
    cfg = cohort_cfg(
        fed,
        "too-few-shares",
        secagg=True,
        num_server_rounds=1,
        fault_adversary="tenant-0:scale=1e9,tenant-1:scale=1e9",
    )
    run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lambda _: None)
    (row,) = [json.loads(x) for x in (Path(cfg.run_dir) / "rounds.jsonl").read_text().splitlines()]
    assert row["aggregated"] == 0 and "fewer than the 2 the tenants split σ into" in row["unchanged"]
    assert [t for t, i in row["tenants"].items() if i["status"] == "rejected"] == ["tenant-0", "tenant-1"]


def test_the_gradient_canary_audit_replays_a_cohort_run_and_catches_halved_noise(
    secagg_run: RunConfig,
) -> None:
    # `fedrec audit --empirical`'s DP-SGD part on a cohort run: it replays the ledger's plan (one step
    # per round at the cohort rate, the σ of the SecAgg+ sum that the accountant charged) with canaries
    run = load_run(Path(secagg_run.run_dir))
    claim = dpsgd_claim(run, "tenant-0")
    assert (claim.sample_rate, claim.steps, len(claim.sigmas)) == (AUTO_COHORT_RATE, 1, 2)
    ok = gradient_audit(run, GradientAuditConfig(canaries=1000, real_users=40))
    assert ok.passed and ok.epsilon_lb <= ok.claim.epsilon
    assert 0.85 < ok.noise_ratio < 1.15  # the replica's noise is σ·C of the sum
    bad = gradient_audit(
        run, GradientAuditConfig(canaries=1000, real_users=40, trainer="tests.dpsgd_mutants:halved_noise")
    )
    assert not bad.passed and bad.noise_ratio < 0.6


def test_the_release_init_head_runs_under_secagg_with_the_noise_split_in_both_stages(fed: Path) -> None:
    # The head of issue 16 (round 1: the initialising item release; then cohort DP-SGD rounds) under
    # SecAgg+: each tenant adds its share of the noise to its release and to its cohort steps, the
    # server unmasks only the sums, each of which carries one full σ (3 tenants: threshold 2)
    cfg = cohort_cfg(
        fed, "secagg-head", secagg=True, release_init=0.8, release_init_items="genres",
        release_init_pop=1.0, dot_mix=0.0, dp_train="mix", prior_negatives=True, max_grad_norm=0.05,
    )  # fmt: skip
    run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lambda _: None)
    out = Path(cfg.run_dir)
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["aggregated"] for r in rows] == [TENANTS] * 3
    init = rows[0]["release_init"]
    assert init["noise_shares"] == 2 and rows[0]["secagg"]["max_weight"] == 1.0
    releases = []
    for t in range(TENANTS):
        entries, problems = read_entries(out / "ledger" / f"tenant-{t}.jsonl")
        assert not problems
        rel = next(e for e in entries if e.get("purpose") == "mlp-init")
        releases.append(rel)
        # the release: σ charged for the sum, σ/√2 added by the tenant, so ε alone > ε
        assert rel["noise_mode"] == "distributed" and rel["shares"] == 2
        assert rel["local_noise_multiplier"] == pytest.approx(rel["noise_multiplier"] / np.sqrt(2))
        assert rel["epsilon"] < rel["epsilon_if_alone"]
        steps = [e for e in entries if e.get("dp_mode") == "cohort"]
        assert [e["round"] for e in steps] == [2, 3] and all(e["shares"] == 2 for e in steps)
        assert EPSILON - 0.01 < steps[-1]["epsilon"] <= EPSILON  # release + cohort steps compose to the cap
    # the unmasked sum carries √(Σ σ_t² / 2) — one σ, not the √3·σ three local releases would add up to
    sigmas = [e["noise_multiplier"] for e in releases]
    assert init["sum_noise_multiplier"] == pytest.approx(
        float(np.sqrt(np.sum(np.square(sigmas)) / 2)), rel=1e-4
    )
    report = check_run(load_run(out))
    failed = [(t, c.name) for t, a in report.tenants.items() for c in a.checks if c.findings]
    assert not failed and not [c.name for c in report.run_checks if c.findings]

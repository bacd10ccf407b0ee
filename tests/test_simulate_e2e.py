"""End to end: `fedrec simulate` through Flower's Simulation Engine (Ray), 2 tenants × 2 rounds.

One simulation is shared by the tests of this module (Ray's first round costs tens of seconds).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.client.vault import load_tenant
from fedrec.privacy.crypto import read_key_file
from fedrec.privacy.ledger import max_recompute_error, read_entries, verify_chain
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from tests.flower_env import flower_env

pytestmark = pytest.mark.slow

FEDREC = [sys.executable, "-m", "fedrec"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    fed = root / "fed"
    data = prepare_dataset(load("synthetic", synth_users=240, synth_items=120, seed=2))
    prepare_federation(data, fed, PrepareConfig(tenants=2, partition="iid", seed=2))
    run = root / "run"
    proc = subprocess.run(
        [
            *FEDREC,
            "simulate",
            "--approach",
            "mlp",  # DP-SGD rounds (the item release has its own e2e test in test_release.py)
            "--release-init",
            "0",  # plain DP-SGD of the whole MLP (the DP head is tests/test_auto_head.py's)
            "--federation",
            str(fed),
            "--rounds",
            "2",
            "--epsilon",
            "6",
            "--batch-users",
            "32",
            "--out",
            str(run),
        ],
        env=flower_env(root),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "stdout.txt").write_text(proc.stdout)
    return {"fed": fed, "run": run, "root": root}


def test_run_dir_has_every_contract_file(sim: dict[str, Path]) -> None:
    run = sim["run"]
    for name in (
        "metrics.json",
        "model.pt",
        "model.json",
        "config.json",
        "rounds.jsonl",
        "privacy.json",
        "ledger/tenant-0.jsonl",
        "ledger/tenant-1.jsonl",
        "metrics.png",
        "epsilon.png",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["full"]) >= {"hr@10", "ndcg@10", "mrr", "coverage@10"}
    assert metrics["sampled"]["negatives"] == 99
    assert {"popularity", "dp_popularity"} <= set(metrics["baselines"])
    assert metrics["dataset"]["users"] == 240 and metrics["dataset"]["tenants"] == 2
    rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all("hr@10" in r["val"] for r in rounds)
    out = (sim["root"] / "stdout.txt").read_text()
    assert "privacy spend per tenant" in out and "δ=1e-05" in out and "accountant: prv" in out


def test_privacy_json_matches_the_ledgers_and_recomputation(sim: dict[str, Path]) -> None:
    run = sim["run"]
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["unit"] == "user" and privacy["accountant"] == "prv" and privacy["delta"] == 1e-5
    assert privacy["rounds"] == 2 and privacy["secure_mode"] is False
    rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    for tenant, info in privacy["tenants"].items():
        entries, problems = read_entries(run / "ledger" / f"{tenant}.jsonl")
        # the noisy user count (round 0, docs/TRANSCRIPT.md), then the two rounds (exact evaluation:
        # the simulate default, labelled NOT covered by ε, charges nothing)
        assert not problems and [e["round"] for e in entries] == [0, 1, 2]
        assert entries[0]["mechanism"] == "gaussian-count" and privacy["adjacency"] == "add-remove-one-user"
        assert not verify_chain(entries, expected_head=info["ledger_head"])
        assert rounds[-1]["tenants"][tenant]["ledger_head"] == info["ledger_head"]
        assert info["epsilon"] == entries[-1]["epsilon"] <= info["cap"] == 6.0
        assert info["rounds_trained"] == 2 and info["status"] == "ok"
        assert max_recompute_error(entries) <= 1e-6
        # the server's copy is the tenant's own ledger, byte for byte in content
        own, _ = read_entries(
            sim["fed"]
            / tenant
            / "state"
            / json.loads((run / "config.json").read_text())["run_config"]["run-name"]
            / "ledger.jsonl"
        )
        assert [e["hash"] for e in own] == [e["hash"] for e in entries]


def test_model_serves_a_top10(sim: dict[str, Path]) -> None:
    ids = json.loads((sim["run"] / "model.json").read_text())["catalog"]["item_ids"][:3]
    proc = subprocess.run(
        [*FEDREC, "recommend", "--model", str(sim["run"]), "--history", ",".join(ids), "-k", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=flower_env(sim["root"]),
    )
    assert proc.returncode == 0, proc.stderr
    items = json.loads(proc.stdout)["items"]
    assert len(items) == 10 and not {i["item"] for i in items} & set(ids)


def test_no_identifier_or_key_reaches_the_run_dir(sim: dict[str, Path]) -> None:
    fed, run = sim["fed"], sim["run"]
    blobs = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    for tenant in ("tenant-0", "tenant-1"):
        key = read_key_file(fed / "keys" / f"{tenant}.key")
        assert key.key not in blobs and base64.b64encode(key.key) not in blobs
        split = load_tenant(fed / tenant, fed / "keys" / f"{tenant}.key").split
        assert split.pseudonyms and not any(p.encode() in blobs for p in split.pseudonyms)


def test_bad_privacy_config_fails_fast_with_one_line(sim: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bad"
    proc = subprocess.run(
        [
            *FEDREC,
            "simulate",
            "--federation",
            str(sim["fed"]),
            "--rounds",
            "1",
            "--delta",
            "0.5",
            "--out",
            str(out),
        ],
        env=flower_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        "Traceback" not in proc.stderr and "1/" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not out.exists(), "a failed run leaves no RUN_DIR"
    missing = subprocess.run(
        [*FEDREC, "simulate", "--federation", str(tmp_path / "nope"), "--rounds", "1", "--out", str(out)],
        env=flower_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "federation.json is missing" in missing.stderr and not out.exists()

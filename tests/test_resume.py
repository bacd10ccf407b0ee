"""Crash-resume: a run killed at several points continues from its last checkpoint.

Fast tests "kill" the ServerApp in-process (an exception out of the grid at the N-th message, so
some tenants may have charged a round whose reply the server never saw) and resume on a fresh grid
(new node ids, as after a restart). The slow test kills a real ``fedrec simulate`` (SIGKILL to its
process group, Ray included) and runs ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType

from fedrec.client.app import app
from fedrec.client.task import LEDGER_FILE
from fedrec.privacy.ledger import read_entries, verify_chain
from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid
from tests.flower_env import flower_env

TENANTS, ROUNDS = 2, 3


class Killed(BaseException):
    """Stands for SIGKILL of the server: nothing after it runs."""


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare_dataset(load("synthetic", synth_users=120, synth_items=60, seed=6))
    out = tmp_path_factory.mktemp("resume") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=6, k_anonymity=2))
    return out


def kill_at(n: int):  # type: ignore[no-untyped-def]
    """A drop rule that kills the server when it is about to deliver its n-th train message."""
    count = {"train": 0}

    def rule(_nid: int, msg: Message) -> str | None:
        if msg.metadata.message_type == MessageType.TRAIN:
            count["train"] += 1
            if count["train"] == n:
                raise Killed
        return None

    return rule


def check_run(run: Path, fed: Path, run_name: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), "every round exactly once"
    privacy = json.loads((run / "privacy.json").read_text())
    for t in range(TENANTS):
        tenant = f"tenant-{t}"
        copy, problems = read_entries(run / "ledger" / f"{tenant}.jsonl")
        own, _ = read_entries(fed / tenant / "state" / run_name / LEDGER_FILE)
        assert not problems and not verify_chain(
            copy, expected_head=privacy["tenants"][tenant]["ledger_head"]
        )
        assert [e["hash"] for e in copy] == [e["hash"] for e in own], (
            "the server's copy is the tenant's ledger"
        )
        rounds = [e["round"] for e in own]
        assert len(rounds) == len(set(rounds)), "no round charged twice"
        # the noisy count (round 0) and the DP test evaluation (round ROUNDS + 1) besides the rounds
        trained = [e["round"] for e in own if e.get("mechanism") is None]
        assert set(trained) <= set(range(1, ROUNDS + 1))
        assert own[0].get("mechanism") == "gaussian-count" and own[0]["round"] == 0
    return rows


@pytest.mark.slow  # ~25 s each on 2 cores (DP training + accounting); CI runs them
@pytest.mark.parametrize(
    "kill",
    [
        2,  # round 1, after tenant-0 trained and charged, before tenant-1 got the message
        4,  # round 2, likewise: tenant-0 has charged round 2, the checkpoint is round 1
    ],
)
def test_resume_after_a_kill_gives_valid_ledgers_and_the_same_rounds(
    fed: Path, tmp_path: Path, kill: int
) -> None:
    run = tmp_path / "run"
    cfg = RunConfig(
        release_init=0.0,  # plain DP-SGD rounds (the DP head adds a release round 1)
        fed_dir=str(fed),
        run_dir=str(run),
        run_name=f"kill{kill}",
        num_server_rounds=ROUNDS,
        num_tenants=TENANTS,
        epsilon=6.0,
        batch_users=32,
        accountant="rdp",  # PRV accounting is several seconds a round on 2 cores; the logic is the same
        eval_every=ROUNDS,
    )
    with pytest.raises(Killed):
        run_federation(
            LoopbackGrid(app, cfg.to_mapping(), TENANTS, drop=kill_at(kill)), cfg, log=lambda _: None
        )
    resumed = RunConfig.from_mapping({**cfg.to_mapping(), "resume": True})
    run_federation(LoopbackGrid(app, resumed.to_mapping(), TENANTS), resumed, log=lambda _: None)
    rows = check_run(run, fed, cfg.run_name)
    killed_round = (kill - 1) // TENANTS + 1
    first = rows[killed_round - 1]
    assert first.get("resumed_from") == killed_round - 1
    if kill % TENANTS == 0:  # tenant-0 charged the killed round before the kill: it must not train it again
        assert first["tenants"]["tenant-0"]["status"] == "already-charged"
        assert first["aggregated"] == 1
    else:
        assert first["aggregated"] == TENANTS


# ---------------------------------------------------------------- the real thing (slow)
@pytest.mark.slow
def test_kill_9_of_fedrec_simulate_then_resume(fed: Path, tmp_path: Path) -> None:
    """SecAgg+ run, SIGKILLed after round 1's checkpoint, then --resume; in round 2 one of the two
    tenants crashes after charging — beyond SecAgg+'s threshold (2 of 2), so that round must fail
    cleanly within its timeout and the run go on."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedrec", "simulate", "--federation", str(fed)]
    args = ["--approach", "mlp", "--release-init", "0", "--rounds", str(ROUNDS), "--epsilon", "6"]
    args += ["--batch-users", "32", "--secagg"]
    args += ["--crash", "tenant-1@2", "--round-timeout", "120", "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, *args],
        env=flower_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = out.parent / ".run.partial" / "checkpoint" / "resume.pt"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.is_file():
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray and its workers: a machine crash
        proc.wait()
    assert not out.exists() and (out.parent / ".run.partial" / "resume.json").is_file()
    resumed = subprocess.run(
        [*cmd[:4], "--resume", str(out)],
        env=flower_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed 1×" in resumed.stdout
    # without --verbose the Ray workers' Flower DEBUG lines (SecAgg+ stages per node) stay out of the output
    assert "starting stage" not in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())["run_config"]
    rows_ = check_run(out, fed, config["run-name"])
    crash_row = rows_[1]
    assert crash_row["resumed_from"] == 1
    assert crash_row["aggregated"] == 0 and "SecAgg+ halted" in crash_row["unchanged"]
    assert crash_row["seconds"] < 120, "failed within the timeout"
    assert any("crashed mid-round 2" in f["reason"] for f in crash_row["failures"])
    assert rows_[2]["aggregated"] == TENANTS
    own, _ = read_entries(fed / "tenant-1" / "state" / config["run-name"] / LEDGER_FILE)
    trained = [e["round"] for e in own if e.get("mechanism") is None]  # besides the noisy count (round 0)
    assert trained == [1, 2, 3], "the crashed round stays charged, once"
    assert not (out.parent / ".run.partial").exists() and not (out / "resume.json").exists()


def test_a_last_round_charged_whose_reply_was_lost_reaches_the_servers_copy_at_evaluation(
    fed: Path, tmp_path: Path
) -> None:
    """tenant-1 trains and charges the last round, but its reply is lost (its SuperNode killed after
    charging, tests/test_deploy_faults.py): no training round follows, so the final test evaluation
    must bring the entry — the server's copy equals the tenant's own, and privacy.json says the ε spent."""
    run = tmp_path / "run"
    cfg = RunConfig(
        release_init=0.0,  # plain DP-SGD rounds (the DP head adds a release round 1)
        fed_dir=str(fed),
        run_dir=str(run),
        run_name="lost-last",
        num_server_rounds=1,
        num_tenants=TENANTS,
        min_tenants=1,
        epsilon=6.0,
        batch_users=32,
        accountant="rdp",
        eval_every=5,
        eval_privacy="exact",  # an uncharged evaluation must bring the entry too (dp's charges anyway)
    )
    grid: list[LoopbackGrid] = []

    def lossy(msg: Message, context: object) -> Message:
        reply = app(msg, context)  # the real ClientApp: trains, charges, logs
        lost = context.node_config["partition-id"] == 1  # type: ignore[attr-defined]
        if lost and msg.metadata.message_type == MessageType.TRAIN:
            return Message(Error(code=0, reason="Node Unavailable: killed after charging"), reply_to=msg)
        return reply

    grid.append(LoopbackGrid(lossy, cfg.to_mapping(), TENANTS))  # type: ignore[arg-type]
    run_federation(grid[0], cfg, log=lambda _: None)
    own, _ = read_entries(fed / "tenant-1" / "state" / "lost-last" / LEDGER_FILE)
    copy, problems = read_entries(run / "ledger" / "tenant-1.jsonl")
    assert [e["round"] for e in own] == [0, 1], "tenant-1 was charged for its count and round 1"
    assert not problems and [e["hash"] for e in copy] == [e["hash"] for e in own]
    row = json.loads((run / "rounds.jsonl").read_text().splitlines()[0])
    assert "tenant-1" not in row["tenants"] and row["aggregated"] == 1, "its update never arrived"
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["tenants"]["tenant-1"]["epsilon"] == pytest.approx(own[-1]["epsilon"])
    assert privacy["tenants"]["tenant-1"]["ledger_head"] == own[-1]["hash"]


@contextlib.contextmanager
def unwritable(folder: Path):  # type: ignore[no-untyped-def]
    """``folder`` made read-only for real: mode 0500 (enough unless root), else ``chattr +i`` (root on
    ext4); skips when neither stops a write here."""
    probe = folder / ".probe"
    folder.chmod(0o500)
    undo = ["chmod"]
    try:
        probe.write_bytes(b"x")
        probe.unlink()
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode:
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        undo.append("chattr")
    except OSError:
        pass
    try:
        yield
    finally:
        if "chattr" in undo:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)


def test_a_partner_whose_state_dir_is_read_only_refuses_to_train_and_says_so(
    fed: Path, tmp_path: Path
) -> None:
    from fedrec.client.task import resolve_tenant, tenant_train
    from fedrec.server.loop import model_config
    from fedrec.shared_model.codec import state_weights
    from fedrec.shared_model.data import Catalog
    from fedrec.shared_model.model import HistoryMLP

    cfg = RunConfig(
        release_init=0.0,  # plain DP-SGD rounds (the DP head adds a release round 1)
        fed_dir=str(fed), run_dir=str(tmp_path / "run"), run_name="readonly", num_server_rounds=3,
        num_tenants=TENANTS, epsilon=6.0, batch_users=32, accountant="rdp",
    )  # fmt: skip
    cat = Catalog.from_json(json.loads((fed / "catalog.json").read_text()))
    model = HistoryMLP(model_config(cat, cfg), cat.genres)
    weights = state_weights(model)
    paths = resolve_tenant({"partition-id": 0}, cfg)
    first = tenant_train(weights, model.cfg, cfg, paths, 1)
    assert first.status == "ok"
    ledger = paths.state_dir / LEDGER_FILE
    before = ledger.read_bytes()
    with unwritable(paths.state_dir):
        second = tenant_train(weights, model.cfg, cfg, paths, 2)
    assert second.status == "refused" and second.weights is None
    assert "cannot charge round 2" in second.message and "not writable" in second.message
    assert second.epsilon == pytest.approx(first.epsilon), "nothing charged"
    assert ledger.read_bytes() == before, "the ledger is untouched"
    third = tenant_train(weights, model.cfg, cfg, paths, 3)  # writable again: it trains
    assert third.status == "ok" and [e["round"] for e in read_entries(ledger)[0]] == [0, 1, 3]  # 0: ñ


@pytest.mark.parametrize("next_round", [1, 2])  # the refused round re-sent; the next round (a deployment)
def test_a_state_dir_read_only_before_the_first_round_is_refused_not_an_error(
    fed: Path, tmp_path: Path, next_round: int
) -> None:
    """Read-only before anything was written (no noise plan yet): the round is refused with the reason,
    not a ClientApp crash while persisting the plan; once writable again the partner trains — the
    refused round if it is sent again, or the next round, as in ``tests/test_deploy_faults.py``
    (seed 282067: read-only in round 1 from its start, writable again, round 2 trains and its noisy
    count, round 0, is charged with it; nothing of the refusal is remembered)."""
    from fedrec.client.task import resolve_tenant, tenant_train
    from fedrec.server.loop import model_config
    from fedrec.shared_model.codec import state_weights
    from fedrec.shared_model.data import Catalog
    from fedrec.shared_model.model import HistoryMLP

    cfg = RunConfig(
        release_init=0.0,  # plain DP-SGD rounds (the DP head adds a release round 1)
        fed_dir=str(fed), run_dir=str(tmp_path / "run"), run_name=f"readonly-first-{next_round}",
        num_server_rounds=2, num_tenants=TENANTS, epsilon=6.0, batch_users=32, accountant="rdp",
    )  # fmt: skip
    cat = Catalog.from_json(json.loads((fed / "catalog.json").read_text()))
    model = HistoryMLP(model_config(cat, cfg), cat.genres)
    paths = resolve_tenant({"partition-id": 1}, cfg)
    paths.state_dir.mkdir(parents=True)
    with unwritable(paths.state_dir):
        first = tenant_train(state_weights(model), model.cfg, cfg, paths, 1)
    assert first.status == "refused" and first.weights is None and "not writable" in first.message
    assert sorted(p.name for p in paths.state_dir.iterdir()) == [], "nothing written, nothing charged"
    again = tenant_train(state_weights(model), model.cfg, cfg, paths, next_round)
    rounds = [e["round"] for e in read_entries(paths.state_dir / LEDGER_FILE)[0]]
    assert again.status == "ok" and again.users > 0 and again.epsilon and again.epsilon > 0
    assert rounds == [0, next_round]  # 0: the noisy count, charged with the first round trained

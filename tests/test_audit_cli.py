"""`fedrec audit` end to end: real simulated runs (slow, shared per module), tampering, the canary attack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.simulations.cli import audit as cli_audit
from fedrec.simulations.cli.main import app
from tests.flower_env import flower_env as shared_flower_env

REPO = Path(__file__).resolve().parents[1]
FEDREC = [
    sys.executable,
    "-c",
    "import sys; from fedrec.simulations.cli.main import main; sys.argv[0] = 'fedrec'; main()",
]
# Until simulations/cli.py registers the command itself, the subprocess registers it here.
FEDREC_AUDIT = [
    sys.executable,
    "-c",
    "import sys; from fedrec.simulations.cli.main import app, main; from fedrec.simulations.cli import audit as cli_audit\n"
    "if not any(c.name == 'audit' for c in app.registered_commands): cli_audit.register(app)\n"
    "sys.argv[0] = 'fedrec'; main()",
]

if not any(c.name == "audit" for c in app.registered_commands):
    cli_audit.register(app)


def flower_env() -> dict[str, str]:
    return shared_flower_env(Path(tempfile.mkdtemp(prefix="flwr-")))


def simulate(out: Path, *extra: str) -> Path:
    cmd = [
        *FEDREC,
        "simulate",
        "--approach",
        "mlp",  # the canary experiment replays DP-SGD
        "--release-init",
        "0",  # of the whole MLP, not the DP head (one trained weight)
        "--tenants",
        "2",
        "--rounds",
        "2",
        "--synth-users",
        "400",
        "--synth-items",
        "300",
    ]
    proc = subprocess.run(
        [*cmd, *extra, "--out", str(out)],
        cwd=REPO,
        env=flower_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield simulate(tmp_path_factory.mktemp("dp") / "run", "--epsilon", "3")


@pytest.fixture(scope="module")
def nodp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One local epoch (not the no-DP auto recipe's 5): the canary replica replays it, and time is the cost.
    yield simulate(tmp_path_factory.mktemp("nodp") / "run", "--no-dp", "--local-epochs", "1")


def run_audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDREC_AUDIT, "audit", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


# ---------------------------------------------------------------- fast: input errors, --ledger


def test_missing_run_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_audit(str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_audit(str(tmp_path))
    assert proc.returncode == 2 and "privacy.json is missing" in proc.stderr


def test_ledger_mode(tmp_path: Path) -> None:
    from tests.test_audit import entries_of, make_run

    make_run(tmp_path)
    own = tmp_path / "state" / "tenant-0" / "ledger.jsonl"
    head = entries_of(own)[-1]["hash"]
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "--ledger", str(own), "--head", head])
    assert ok.exit_code == 0, ok.output
    assert "audit passed" in ok.output
    bad = runner.invoke(app, ["audit", "--ledger", str(own), "--head", "0" * 64])
    assert bad.exit_code == 1
    assert "recorded_heads" in bad.output


# ---------------------------------------------------------------- slow: real runs


@pytest.mark.slow
def test_clean_run_passes_and_writes_the_report(dp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_audit(str(dp_run), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    doc = json.loads((out / "audit.json").read_text())
    assert doc["passed"] and doc["unit"] == "user" and doc["accountant"] == "prv"
    for t, info in doc["tenants"].items():
        assert info["max_replay_error"] <= 1e-6, t
        assert info["epsilon_recorded"] <= info["cap"]
        acc = info["accountants"]
        assert abs(acc["opacus_prv"] - acc["dp_accounting_pld"]) <= 0.02 * acc["opacus_prv"]
        assert acc["opacus_rdp"] >= acc["opacus_prv"]
    page = (out / "audit.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    assert "secure_mode" in page and "two tenants" in page
    assert (out / "audit.md").read_text().startswith("# Privacy budget audit")


@pytest.mark.slow
def test_tampered_real_run_fails_naming_the_check(dp_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    ledger = run / "ledger" / "tenant-1.jsonl"
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")  # truncate the tail: a valid chain
    proc = run_audit(str(run), "--out", str(tmp_path / "report"))
    assert proc.returncode == 1
    assert "recorded_heads (tenant-1)" in proc.stderr
    doc = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert not doc["passed"] and "recorded_heads:tenant-1" in doc["failed_checks"]


@pytest.mark.slow
def test_empirical_bound_stays_below_the_dp_claim(dp_run: Path, tmp_path: Path) -> None:
    proc = run_audit(str(dp_run), "--empirical", "--canaries", "200", "--runs", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "audit.json").read_text())
    emp = doc["empirical"]
    assert emp["canaries"] == 400 and emp["dp"]
    assert emp["epsilon_lower_bound"] <= emp["claimed_epsilon"] <= 3.0
    # The white-box gradient canaries run beside the data canaries, on the ledger's σ, q, steps, rounds
    grad = doc["empirical_dpsgd"]
    assert grad["passed"] and grad["canaries"] == 2000 and grad["rounds"] == 2
    assert grad["epsilon_lower_bound"] <= grad["claimed_epsilon"] <= 3.0
    # The audited claim is the DP-SGD rounds' ε alone: the recorded ε also has the round-0 noisy count
    assert 0.5 * doc["tenants"]["tenant-0"]["epsilon_recorded"] < grad["claimed_epsilon"]
    assert grad["claimed_epsilon"] <= doc["tenants"]["tenant-0"]["epsilon_recorded"]
    assert grad["unit"] == "user" and grad["delta"] == 1e-5 and grad["accountant"] == "prv"
    assert "PASS: DP-SGD of tenant-0" in proc.stdout
    html = (tmp_path / "audit.html").read_text()
    assert "white-box DP-SGD audit" in html and grad["verdict"].split(" —")[0] in html
    assert (tmp_path / "dpsgd_canary_scores.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_planted_broken_dpsgd_fails_the_audit_with_exit_1(dp_run: Path, tmp_path: Path) -> None:
    proc = run_audit(
        str(dp_run), "--empirical", "--canaries", "0", "--dpsgd-canaries", "600", "--dpsgd-real-users", "20",
        "--dpsgd-trainer", "tests.dpsgd_mutants:halved_noise", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "dpsgd_noise (tenant-0)" in proc.stderr and "Traceback" not in proc.stderr
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert "empirical" not in doc and not doc["empirical_dpsgd"]["passed"]
    assert doc["empirical_dpsgd"]["trainer"] == "tests.dpsgd_mutants:halved_noise"


def test_unknown_dpsgd_trainer_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_audit(
        str(tmp_path), "--empirical", "--dpsgd-trainer", "no_such_module:f", "--out", str(tmp_path / "x")
    )
    assert proc.returncode == 2
    assert "cannot import no_such_module" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_empirical_bound_is_clearly_positive_without_dp(nodp_run: Path, tmp_path: Path) -> None:
    proc = run_audit(str(nodp_run), "--empirical", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert not doc["dp"] and doc["empirical"]["claimed_epsilon"] is None
    assert doc["empirical"]["epsilon_lower_bound"] > 1.0

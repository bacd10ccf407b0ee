"""`fedrec audit --empirical` on the item release: the statistics, the product's release passing, the
four planted broken releases (tests/release_mutants.py, injected through ``--release-mechanism``)
failing, and the CLI on a real release run (report with the trade-off curve and the verdict)."""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fedrec.privacy import gram
from fedrec.privacy.accounting import epsilon as account
from fedrec.privacy.empirical import fisher_direction, gaussian_fit, gdp_epsilon, gdp_tpr
from fedrec.simulations.reports.release_audit import ReleaseAuditConfig, claim_for, run_release_audit
from tests.flower_env import flower_env

REPO = Path(__file__).resolve().parents[1]
FEDREC = [sys.executable, "-m", "fedrec"]
MUTANTS = ("halved_noise", "unbounded_norm", "reused_noise", "config_seeded_noise")
# Small replicas keep each audit to seconds; the popularity release is the cheapest real path.
SMALL = {"users": 200, "items": 200, "canary_items": 100}


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_gdp_epsilon_of_one_over_sigma_is_the_accountants_epsilon(eps: float) -> None:
    sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=1e-5)
    claimed = account(history=[(sigma, 1.0, 1)], delta=1e-5, accountant="prv")
    exact = gdp_epsilon(1.0 / sigma, 1e-5)
    assert exact <= claimed and exact == pytest.approx(claimed, rel=0.02)
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and math.isinf(gdp_epsilon(math.inf, 1e-5))
    assert gdp_tpr(np.array([0.05]), 0.0)[0] == pytest.approx(0.05)


def test_gaussian_fit_bounds_mu_below_and_sees_a_noiseless_gap() -> None:
    rng = np.random.default_rng(3)
    below = 0
    for _ in range(40):
        fit = gaussian_fit(rng.normal(0.8, 1, 300), rng.normal(0, 1, 300), confidence=0.95)
        below += fit.mu_lb <= 0.8
        assert fit.mu_lb < fit.mu
    assert below >= 35  # ~95% coverage
    assert math.isinf(gaussian_fit(np.ones(4), np.zeros(4)).mu_lb)
    w = fisher_direction(np.c_[rng.normal(1, 1, 500), rng.normal(size=500)], rng.normal(size=(500, 2)))
    assert abs(w[0]) > 0.95


def test_bad_release_audit_settings_are_refused() -> None:
    from fedrec.simulations.reports.audit import AuditError

    with pytest.raises(AuditError, match="--trials must be at least 20"):
        ReleaseAuditConfig(trials=5)
    with pytest.raises(AuditError, match="MODULE:FUNCTION"):
        run_release_audit(
            claim_for(epsilon=2, n_items=50), ReleaseAuditConfig(trials=20, mechanism="nocolon")
        )
    with pytest.raises(AuditError, match="do not fit"):
        run_release_audit(claim_for(epsilon=2, n_items=50), ReleaseAuditConfig(trials=20, canary_items=80))


# ---------------------------------------------------------------- the product's release passes


@pytest.mark.parametrize(("approach", "shares"), [("dp_popularity", 1), ("dp_ease", 3)])
def test_the_products_release_stays_below_its_claim(approach: str, shares: int) -> None:
    claim = claim_for(epsilon=2.0, approach=approach, shares=shares, users=200, n_items=200)
    trials = 400 if approach == "dp_popularity" else 100
    r = run_release_audit(claim, ReleaseAuditConfig(trials=trials, **SMALL))  # type: ignore[arg-type]
    assert r.passed, r.verdict()
    assert r.mechanism == "fedrec.client.task:release_message"
    assert 0 < r.fit.mu < 3 * claim.mu and r.epsilon_lb <= claim.epsilon
    assert r.repeated_releases == 0 and r.verdict().startswith("PASS")


# ---------------------------------------------------------------- planted mutations fail


@pytest.mark.parametrize("mutant", MUTANTS)
def test_each_planted_broken_release_fails_the_audit(mutant: str) -> None:
    claim = claim_for(epsilon=2.0, approach="dp_popularity", users=200, n_items=200)
    cfg = ReleaseAuditConfig(trials=400, mechanism=f"tests.release_mutants:{mutant}", **SMALL)  # type: ignore[arg-type]
    r = run_release_audit(claim, cfg)
    failed = {c.name for c in r.checks() if not c.passed}
    assert "release_lower_bound" in failed, r.verdict()
    assert r.epsilon_lb > claim.epsilon
    if mutant in ("reused_noise", "config_seeded_noise"):
        assert "release_fresh_noise" in failed
    assert r.verdict().startswith("FAIL")


# ---------------------------------------------------------------- the CLI on a real release run


@pytest.fixture(scope="module")
def release_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("release-audit") / "run"
    cmd = [*FEDREC, "simulate", "--approach", "dp_ease", "--tenants", "2", "--synth-users", "400"]
    proc = subprocess.run(
        [*cmd, "--synth-items", "120", "--epsilon", "2", "--out", str(out)],
        cwd=REPO,
        env=flower_env(Path(tempfile.mkdtemp(prefix="flwr-"))),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def audit(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDREC, "audit", str(run), "--empirical", "--out", str(out), "--release-users", "150", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_release_audit_passes_and_the_report_shows_the_curve(release_run: Path, tmp_path: Path) -> None:
    import json

    proc = audit(release_run, tmp_path / "ok", "--trials", "100")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "PASS: the dp_ease release of tenant-0" in proc.stdout
    doc = json.loads((tmp_path / "ok" / "audit.json").read_text())
    rel = doc["empirical_release"]
    assert rel["trials"] == 100 and rel["passed"] and rel["claimed_epsilon"] <= 2.0
    assert rel["unit"] == "user" and rel["delta"] == 1e-5 and rel["accountant"] == "prv"
    html = (tmp_path / "ok" / "audit.html").read_text()
    assert "release_tradeoff.png" in html and rel["verdict"].split(" —")[0] in html
    assert (tmp_path / "ok" / "release_tradeoff.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cli_fails_a_planted_mutation_with_exit_1(release_run: Path, tmp_path: Path) -> None:
    proc = audit(
        release_run, tmp_path / "bad", "--trials", "60", "--release-mechanism",
        "tests.release_mutants:config_seeded_noise",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "release_fresh_noise (tenant-0)" in proc.stderr and "release_lower_bound (tenant-0)" in proc.stderr


def test_cli_unknown_release_mechanism_is_one_line_exit_2(release_run: Path, tmp_path: Path) -> None:
    proc = audit(release_run, tmp_path / "x", "--trials", "20", "--release-mechanism", "no_such_module:f")
    assert proc.returncode == 2
    assert "cannot import no_such_module" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "audit.json").exists()

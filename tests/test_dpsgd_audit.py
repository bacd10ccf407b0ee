"""The white-box DP-SGD audit (gradient canaries through the real train_round / FastClipper / Opacus
path): the product's DP-SGD passes with an informative bound at ε = 8, and the planted broken trainers
(tests/dpsgd_mutants.py, injected through ``make_trainer``) fail it."""

from __future__ import annotations

import pytest

from fedrec.simulations.reports.dpsgd_audit import (
    DPSGDClaim,
    GradientAuditConfig,
    claim_for,
    load_trainer,
    run_gradient_audit,
)
from fedrec.simulations.reports.errors import AuditError


@pytest.mark.slow
def test_the_products_dpsgd_at_eps8_passes_with_a_bound_above_1() -> None:
    claim = claim_for(epsilon=8.0)  # q = 0.2, 5 rounds × 5 steps, σ calibrated by the product's accountant
    r = run_gradient_audit(claim, GradientAuditConfig(canaries=2000, real_users=40))
    assert r.passed, r.verdict()
    assert r.trainer == "fedrec.client.train:make_private_trainer"
    assert 1.0 <= r.epsilon_lb <= claim.epsilon  # the data canaries gave 0 here
    assert abs(r.noise_ratio - 1) < 0.03 and r.noise_ratio_ub >= 1  # Opacus' noise is σ·C
    assert 0.8 < r.contribution < 1.2  # a canary of raw norm 10·C moves its coordinate by C: clipped
    assert r.noise_samples == 25 * (2000 - r.included)
    assert r.verdict().startswith("PASS") and r.to_json()["unit"] == "user"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mutant", "failing"),
    [("halved_noise", {"dpsgd_noise"}), ("unclipped", {"dpsgd_clipping", "dpsgd_lower_bound"})],
)
def test_each_planted_broken_dpsgd_fails_the_audit(mutant: str, failing: set[str]) -> None:
    claim = claim_for(epsilon=2.0, rounds=2, accountant="rdp")  # RDP: a cheaper calibration
    cfg = GradientAuditConfig(canaries=1000, real_users=20, trainer=f"tests.dpsgd_mutants:{mutant}")
    r = run_gradient_audit(claim, cfg)
    failed = {c.name for c in r.checks() if not c.passed}
    assert failing <= failed, r.verdict()
    assert r.verdict().startswith("FAIL")
    if mutant == "halved_noise":
        assert r.noise_ratio == pytest.approx(0.5, abs=0.03) and r.epsilon_noise > claim.epsilon
    else:
        assert r.contribution > 5 and r.epsilon_lb > claim.epsilon


def test_bad_dpsgd_audit_settings_are_refused() -> None:
    with pytest.raises(AuditError, match="--dpsgd-canaries must be at least 16"):
        GradientAuditConfig(canaries=5)
    with pytest.raises(AuditError, match="--dpsgd-canary-norm must be > 1"):
        GradientAuditConfig(canary_norm=1.0)
    with pytest.raises(AuditError, match="MODULE:FUNCTION"):
        load_trainer("nocolon")
    with pytest.raises(AuditError, match="has no 'nope'"):
        load_trainer("tests.dpsgd_mutants:nope")
    with pytest.raises(AuditError, match="cannot reproduce sample rate 0.3"):
        run_gradient_audit(
            DPSGDClaim("t", (1.0,), 0.3, 5, 1.0, 1e-5, "rdp", 1.0), GradientAuditConfig(canaries=16)
        )

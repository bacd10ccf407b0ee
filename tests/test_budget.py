"""TenantBudget: persistence across restarts, the cap gate, one charge per round, refusing mixed state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

import pytest

from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.privacy.budget import STATE_FILE, TenantBudget
from fedrec.privacy.errors import BudgetError

DELTA = 1e-5


class RoundSettings(TypedDict):
    noise_multiplier: float
    sample_rate: float
    steps: int


ROUND: RoundSettings = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 20}


def make(tmp_path: Path, **overrides: object) -> TenantBudget:
    kwargs: dict[str, object] = {"tenant_id": "tenant-0", "cap": 8.0, "delta": DELTA, "accountant": "rdp"}
    kwargs.update(overrides)
    return TenantBudget(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_fresh_budget_has_spent_nothing(tmp_path: Path) -> None:
    budget = make(tmp_path, accountant="prv")
    assert budget.spent() == 0.0
    assert budget.remaining() == 8.0
    assert budget.history == [] and budget.rounds == []
    assert (budget.tenant_id, budget.accountant, budget.delta, budget.cap) == ("tenant-0", "prv", DELTA, 8.0)


def test_charge_persists_and_survives_a_restart(tmp_path: Path) -> None:
    budget = make(tmp_path, accountant="prv")
    eps1 = budget.charge(round=1, **ROUND)
    eps2 = budget.charge(round=2, **ROUND)
    assert 0 < eps1 < eps2 == budget.spent()
    assert eps2 == pytest.approx(epsilon(history=[(1.0, 0.05, 40)], delta=DELTA), abs=1e-12)

    stored = json.loads((tmp_path / STATE_FILE).read_text())
    assert stored == {
        "version": 1,
        "tenant": "tenant-0",
        "accountant": "prv",
        "delta": DELTA,
        "cap": 8.0,
        "history": [[1.0, 0.05, 20], [1.0, 0.05, 20]],
        "rounds": [1, 2],
    }
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind

    restarted = make(tmp_path, accountant="prv")
    assert restarted.spent() == eps2
    assert restarted.rounds == [1, 2]
    assert restarted.history == [(1.0, 0.05, 20), (1.0, 0.05, 20)]
    assert restarted.state() == stored


def test_preview_is_pure_and_can_train_follows_the_cap(tmp_path: Path) -> None:
    budget = make(tmp_path, cap=3.0)
    budget.charge(round=1, **ROUND)
    before = (tmp_path / STATE_FILE).read_bytes()
    one_more = budget.preview(**ROUND)
    assert one_more == pytest.approx(epsilon(history=[(1.0, 0.05, 40)], delta=DELTA, accountant="rdp"))
    assert budget.spent() < one_more
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert budget.can_train(**ROUND) == (one_more <= 3.0)
    assert not budget.can_train(noise_multiplier=0.5, sample_rate=0.5, steps=100)


def test_charge_over_cap_is_refused_and_records_nothing(tmp_path: Path) -> None:
    budget = make(tmp_path, cap=1.0)
    budget.charge(round=1, noise_multiplier=2.0, sample_rate=0.01, steps=10)
    before_file = (tmp_path / STATE_FILE).read_bytes()
    before_eps = budget.spent()
    with pytest.raises(BudgetError, match=r"round 2 would take tenant 'tenant-0' to ε = .*above its cap 1"):
        budget.charge(round=2, noise_multiplier=0.5, sample_rate=0.5, steps=100)
    assert budget.spent() == before_eps
    assert budget.rounds == [1]
    assert (tmp_path / STATE_FILE).read_bytes() == before_file
    # A smaller round still fits afterwards: a refusal does not poison the state.
    budget.charge(round=3, noise_multiplier=2.0, sample_rate=0.01, steps=10)
    assert budget.rounds == [1, 3]


def test_calibrated_run_never_crosses_the_cap(tmp_path: Path) -> None:
    rounds, steps, q, cap = 25, 40, 0.05, 3.0
    sigma = calibrate_noise(
        target_epsilon=cap, delta=DELTA, sample_rate=q, steps=rounds * steps, accountant="rdp"
    )
    budget = make(tmp_path, cap=cap)
    spent = [0.0]
    for r in range(1, rounds + 1):
        assert budget.can_train(noise_multiplier=sigma, sample_rate=q, steps=steps)
        spent.append(budget.charge(round=r, noise_multiplier=sigma, sample_rate=q, steps=steps))
        assert spent[-1] <= cap
    assert spent == sorted(spent)
    assert 0.99 * cap <= budget.spent() <= cap
    # The next round would cross the cap: refused, and a restart does not reset that.
    assert not make(tmp_path, cap=cap).can_train(noise_multiplier=sigma, sample_rate=q, steps=steps)
    with pytest.raises(BudgetError, match="above its cap 3"):
        make(tmp_path, cap=cap).charge(round=rounds + 1, noise_multiplier=sigma, sample_rate=q, steps=steps)


def test_per_round_recalibration_never_crosses_the_cap(tmp_path: Path) -> None:
    """A tenant that picks each round's σ from what is left (different σ every round) stays within."""
    cap, q, steps, rounds = 2.0, 0.1, 10, 4
    budget = make(tmp_path, cap=cap)
    for r in range(1, rounds + 1):
        share = cap * r / rounds  # spend evenly: after round r at most r/R of the cap
        sigma = calibrate_noise(
            target_epsilon=share,
            delta=DELTA,
            sample_rate=q,
            steps=steps,
            accountant="rdp",
            history_before=budget.history,
        )
        assert budget.charge(round=r, noise_multiplier=sigma, sample_rate=q, steps=steps) <= share
    assert len({s for s, _, _ in budget.history}) == rounds
    assert budget.spent() == pytest.approx(cap, rel=0.01)


def test_a_round_is_charged_once(tmp_path: Path) -> None:
    budget = make(tmp_path)
    budget.charge(round=5, **ROUND)
    with pytest.raises(BudgetError, match=r"round 5 is already charged to tenant 'tenant-0'"):
        budget.charge(round=5, **ROUND)
    with pytest.raises(BudgetError, match=r"round 5 is already charged"):
        make(tmp_path).charge(round=5, **ROUND)  # after a restart too
    with pytest.raises(BudgetError, match=r"round 4 comes before the last charged round 5"):
        budget.charge(round=4, **ROUND)
    assert budget.rounds == [5]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tenant_id": "tenant-1"}, r"was written with tenant 'tenant-0', not 'tenant-1'; refusing to mix"),
        ({"accountant": "prv"}, r"was written with accountant 'rdp', not 'prv'"),
        ({"delta": 1e-6}, r"was written with delta 1e-05, not 1e-06"),
    ],
)
def test_mismatched_state_is_refused(tmp_path: Path, override: dict[str, object], message: str) -> None:
    make(tmp_path).charge(round=1, **ROUND)
    with pytest.raises(BudgetError, match=message):
        make(tmp_path, **override)


def test_cap_can_only_go_down(tmp_path: Path) -> None:
    make(tmp_path, cap=8.0).charge(round=1, **ROUND)
    assert make(tmp_path, cap=20.0).cap == 8.0  # a higher cap is ignored
    assert make(tmp_path, cap=3.0).cap == 3.0  # a lower one wins and is persisted
    assert make(tmp_path, cap=8.0).cap == 3.0
    assert json.loads((tmp_path / STATE_FILE).read_text())["cap"] == 3.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"cannot be read"),
        ("[1, 2]", r"is not a JSON object"),
        ('{"tenant": "tenant-0"}', r"has fields \['tenant'\], expected"),
    ],
)
def test_damaged_state_is_refused(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(BudgetError, match=message):
        make(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", 2, r"has version 2, expected 1"),
        ("cap", -1, r"has an invalid cap -1"),
        ("history", [[1.0, 0.05, 20]], r"one history segment per charged round"),
        ("history", [[1.0, 0.05, 20], [0.0, 0.05, 20]], r"is damaged: noise_multiplier must be"),
        ("rounds", [2, 1], r"not strictly increasing integers"),
        ("rounds", [1, 1], r"not strictly increasing integers"),
    ],
)
def test_tampered_state_fields_are_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    budget = make(tmp_path)
    budget.charge(round=1, **ROUND)
    budget.charge(round=2, **ROUND)
    state = budget.state()
    state[field] = value
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(BudgetError, match=message):
        make(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"cap": 0.0}, r"cap must be a finite ε > 0, got 0\.0"),
        ({"cap": -1}, r"cap must be a finite ε > 0, got -1"),
        ({"cap": float("inf")}, r"cap must be a finite ε > 0, got inf"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0\.0"),
        ({"delta": 1}, r"delta must be in \(0, 1\), got 1"),
        ({"accountant": "gdp"}, r"accountant must be one of 'prv' or 'rdp'"),
        ({"tenant_id": ""}, r"tenant_id must be a non-empty string, got ''"),
    ],
)
def test_bad_construction_is_refused(tmp_path: Path, override: dict[str, object], message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        make(tmp_path, **override)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"round": -1}, r"round must be an integer ≥ 0, got -1"),
        ({"round": 1.0}, r"round must be an integer ≥ 0, got 1\.0"),
        ({"noise_multiplier": 0.0}, r"noise_multiplier must be a finite number > 0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]"),
        ({"steps": -3}, r"steps must be an integer ≥ 0"),
    ],
)
def test_bad_charge_is_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    budget = make(tmp_path)
    args: dict[str, object] = {"round": 1, **ROUND}
    args.update(kwargs)
    with pytest.raises(BudgetError, match=message):
        budget.charge(**args)  # type: ignore[arg-type]
    assert not (tmp_path / STATE_FILE).exists()

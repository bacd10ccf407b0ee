"""The budget ledger: a valid chain, each tamper detected (or shown to need a head hash), ε recomputed."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from fedrec.privacy.budget import TenantBudget
from fedrec.privacy.errors import LedgerError
from fedrec.privacy.ledger import (
    GENESIS,
    Ledger,
    LedgerProblem,
    canonical_json,
    entry_hash,
    max_recompute_error,
    read_entries,
    recompute_epsilons,
    verify_chain,
    verify_file,
)

DELTA = 1e-5
SIGMAS = [1.2, 1.2, 1.0, 1.5, 1.2]  # a tenant that changes σ between rounds


def base_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "round": 1,
        "tenant": "tenant-0",
        "unit": "user",
        "users": 943,
        "sample_rate": 0.05,
        "noise_multiplier": 1.2,
        "max_grad_norm": 1.0,
        "steps": 20,
        "delta": DELTA,
        "accountant": "rdp",
        "epsilon": 1.0,
        "cap": 8.0,
        "poisson": True,
        "secure_mode": False,
    }
    fields.update(overrides)
    return fields


def train(tmp_path: Path, *, accountant: str = "rdp", sigmas: list[float] = SIGMAS) -> Ledger:
    """Write a ledger the way a ClientApp does: charge the budget, then record the round."""
    budget = TenantBudget(
        tmp_path / "state", tenant_id="tenant-0", cap=8.0, delta=DELTA, accountant=accountant
    )
    ledger = Ledger(tmp_path / "ledger" / "tenant-0.jsonl")
    for r, sigma in enumerate(sigmas, start=1):
        eps = budget.charge(round=r, noise_multiplier=sigma, sample_rate=0.05, steps=20)
        ledger.append(base_fields(round=r, noise_multiplier=sigma, epsilon=eps, accountant=accountant))
    return ledger


def rechain(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a forger with write access does: recompute every prev_hash and hash."""
    prev = GENESIS
    out = []
    for entry in entries:
        forged = {**entry, "prev_hash": prev}
        forged["hash"] = entry_hash(forged)
        prev = forged["hash"]
        out.append(forged)
    return out


def write_lines(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(canonical_json(e) + "\n" for e in entries))


def kinds(problems: list[LedgerProblem]) -> set[str]:
    return {p.kind for p in problems}


# ---------------------------------------------------------------- a valid ledger


def test_hash_is_sha256_of_canonical_json_golden() -> None:
    entry = {**base_fields(accountant="prv", epsilon=1.25, noise_multiplier=1.1)}
    entry["timestamp"] = "2025-01-01T00:00:00.000000+00:00"
    entry["prev_hash"] = GENESIS
    expected = "d6d8f61f1f9a73800fffaf292f8bc0ffa2978d7cb0ec03b769150696b99d6c65"
    assert entry_hash(entry) == expected
    assert entry_hash({**entry, "hash": "anything"}) == expected  # the hash field itself is excluded
    assert canonical_json(entry).startswith('{"accountant":"prv","cap":8.0,"delta":1e-05,')
    assert hashlib.sha256(canonical_json(entry).encode()).hexdigest() == expected


def test_empty_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "missing.jsonl")
    assert ledger.entries() == []
    assert ledger.head() == GENESIS
    assert verify_chain([], expected_head=GENESIS) == []
    assert verify_file(ledger.path, expected_head=GENESIS) == []
    assert recompute_epsilons([]) == []
    assert max_recompute_error([]) == 0.0


def test_appends_form_a_valid_chain(tmp_path: Path) -> None:
    ledger = train(tmp_path)
    entries = ledger.entries()
    assert [e["round"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert all(e["timestamp"].endswith("+00:00") for e in entries)
    assert ledger.head() == entries[-1]["hash"]
    assert verify_chain(entries, expected_head=ledger.head()) == []
    assert verify_file(ledger.path, expected_head=ledger.head()) == []
    raw = ledger.path.read_text()
    assert raw.endswith("\n") and raw.count("\n") == 5
    assert raw.splitlines()[0] == canonical_json(entries[0])


def test_append_returns_the_stored_entry(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "deep" / "dir" / "t.jsonl")  # parent folders are created
    entry = ledger.append(base_fields())
    assert ledger.entries() == [entry]
    assert set(entry) == {*base_fields(), "timestamp", "prev_hash", "hash"}


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_recompute_matches_recorded_epsilons(tmp_path: Path, accountant: str) -> None:
    entries = train(tmp_path, accountant=accountant, sigmas=SIGMAS[:3]).entries()
    recomputed = recompute_epsilons(entries)
    assert recomputed == pytest.approx([e["epsilon"] for e in entries], abs=1e-6)
    assert recomputed == sorted(recomputed)
    assert max_recompute_error(entries) <= 1e-6


def test_recompute_with_another_accountant(tmp_path: Path) -> None:
    entries = train(tmp_path, sigmas=SIGMAS[:2]).entries()  # recorded with RDP
    prv = recompute_epsilons(entries, accountant="prv")
    assert all(p < e["epsilon"] for p, e in zip(prv, entries, strict=True))  # PRV is tighter
    assert max_recompute_error(entries, accountant="prv") > 0.1


# ---------------------------------------------------------------- tampering


def test_edited_number_breaks_the_hash(tmp_path: Path) -> None:
    ledger = train(tmp_path)
    entries = ledger.entries()
    entries[2]["epsilon"] = 0.5  # under-report round 3
    problems = verify_chain(entries)
    assert ("hash_mismatch", 3) in {(p.kind, p.line) for p in problems}
    assert "epsilon_decreasing" in kinds(problems)
    assert all(p.line == 3 or p.kind == "epsilon_decreasing" for p in problems)


def test_edited_number_in_the_file_breaks_the_hash(tmp_path: Path) -> None:
    ledger = train(tmp_path)
    lines = ledger.path.read_text().splitlines()
    lines[1] = lines[1].replace('"noise_multiplier":1.2', '"noise_multiplier":9.9')
    ledger.path.write_text("\n".join(lines) + "\n")
    problems = verify_file(ledger.path)
    assert [(p.line, p.round, p.kind) for p in problems] == [(2, 2, "hash_mismatch")]
    with pytest.raises(LedgerError, match=r"fails verification at line 2 .*refusing to append"):
        ledger.append(base_fields(round=6, epsilon=7.9))


def test_deleted_middle_line_breaks_the_links(tmp_path: Path) -> None:
    ledger = train(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:2] + lines[3:]))
    problems = verify_file(ledger.path)
    assert [(p.line, p.round, p.kind) for p in problems] == [(3, 4, "prev_hash_mismatch")]


def test_reordered_lines_break_the_links_and_round_order(tmp_path: Path) -> None:
    entries = train(tmp_path).entries()
    entries[1], entries[2] = entries[2], entries[1]
    problems = verify_chain(entries)
    assert {"prev_hash_mismatch", "round_order", "epsilon_decreasing"} <= kinds(problems)
    assert "hash_mismatch" not in kinds(problems)  # every entry is intact, only the order changed


def test_truncated_tail_is_caught_only_with_an_expected_head(tmp_path: Path) -> None:
    ledger = train(tmp_path)
    head = ledger.head()  # recorded elsewhere, e.g. in the coordinator's rounds.jsonl
    truncated = ledger.entries()[:3]
    assert verify_chain(truncated) == []  # a chain alone cannot see it
    problems = verify_chain(truncated, expected_head=head)
    assert [(p.line, p.kind) for p in problems] == [(3, "head_mismatch")]
    assert "removed from the end, or the ledger was rewritten" in problems[0].message
    assert kinds(verify_chain([], expected_head=head)) == {"head_mismatch"}


def test_wholesale_rewrite_is_caught_by_head_and_by_recompute(tmp_path: Path) -> None:
    ledger = train(tmp_path)
    head = ledger.head()
    forged = rechain([{**e, "epsilon": e["epsilon"] / 2} for e in ledger.entries()])
    assert verify_chain(forged) == []  # internally consistent
    assert kinds(verify_chain(forged, expected_head=head)) == {"head_mismatch"}
    assert max_recompute_error(forged) > 0.5  # the mechanism gives the lie away too


def test_forged_ledger_crossing_the_cap(tmp_path: Path) -> None:
    entries = train(tmp_path).entries()
    # Blatant: more rounds recorded honestly past the cap.
    over = rechain([*entries, {**entries[-1], "round": 6, "epsilon": 8.5}])
    problems = verify_chain(over)
    assert [(p.line, p.round, p.kind) for p in problems] == [(6, 6, "epsilon_over_cap")]
    # Subtle: ε recorded under the cap, but σ says otherwise — only recomputation sees it.
    hidden = rechain(
        [*entries, {**entries[-1], "round": 6, "noise_multiplier": 0.3, "steps": 500, "epsilon": 7.9}]
    )
    assert verify_chain(hidden) == []
    recomputed = recompute_epsilons(hidden)
    assert recomputed[-1] > hidden[-1]["cap"]
    assert max_recompute_error(hidden) > 1.0


def test_bad_json_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    ledger = train(tmp_path, sigmas=SIGMAS[:3])
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text(lines[0] + "{garbage\n" + "[1]\n" + "".join(lines[1:]))
    entries, problems = read_entries(ledger.path)
    assert len(entries) == 3
    assert [(p.line, p.kind) for p in problems] == [(2, "bad_json"), (3, "not_object")]
    assert verify_file(ledger.path) == problems  # the chain around them is intact
    with pytest.raises(LedgerError, match=r"line 2: line is not valid JSON"):
        ledger.entries()


# ---------------------------------------------------------------- semantic checks (valid hashes)


@pytest.mark.parametrize(
    ("second", "kind"),
    [
        ({"round": 1}, "round_order"),
        ({"epsilon": 0.5}, "epsilon_decreasing"),
        ({"epsilon": 9.0}, "epsilon_over_cap"),
        ({"cap": 9.0}, "cap_raised"),
        ({"tenant": "tenant-1"}, "inconsistent"),
        ({"accountant": "prv"}, "inconsistent"),
        ({"delta": 1e-6}, "inconsistent"),
        ({"users": 50_000}, None),  # δ = 1e-5 < 1/50 000: fine
        ({"users": 100_000}, "delta_too_large"),
        ({"poisson": False}, "not_poisson"),
        ({"unit": "record"}, "wrong_unit"),
        ({"steps": 0}, None),  # a round with no step spends nothing: allowed
        ({"status": "capped"}, None),
        ({"status": "paused"}, "bad_value"),
        ({"secure_mode": "no"}, "bad_type"),
        ({"round": True}, "bad_type"),
        ({"users": 0}, "bad_value"),
        ({"sample_rate": 1.5}, "bad_value"),
        ({"noise_multiplier": 0}, "bad_value"),
        ({"max_grad_norm": -1.0}, "bad_value"),
        ({"extra": 1}, "unknown_field"),
    ],
)
def test_semantic_problems_are_found_and_refused_at_append(
    tmp_path: Path, second: dict[str, Any], kind: str | None
) -> None:
    first = {**base_fields(), "timestamp": "t", "prev_hash": GENESIS}
    first["hash"] = entry_hash(first)
    entries = rechain([first, {**first, "round": 2, "epsilon": 1.5, **second}])
    problems = verify_chain(entries)
    assert kinds(problems) == ({kind} if kind else set())
    assert all(p.line == 2 for p in problems)

    ledger = Ledger(tmp_path / "t.jsonl")
    ledger.append(base_fields())
    if kind is None:
        ledger.append(base_fields(**{"round": 2, "epsilon": 1.5, **second}))
    else:
        with pytest.raises(LedgerError, match=r"ledger entry for round .* refused: "):
            ledger.append(base_fields(**{"round": 2, "epsilon": 1.5, **second}))
        assert len(ledger.entries()) == 1


def test_nothing_may_follow_a_capped_entry() -> None:
    first = {**base_fields(status="capped"), "timestamp": "t", "prev_hash": GENESIS}
    entries = rechain([first, {**first, "round": 2, "epsilon": 1.5, "status": "ok"}])
    problems = verify_chain(entries)
    assert [(p.line, p.round, p.kind) for p in problems] == [(2, 2, "after_capped")]


def test_missing_fields_are_listed() -> None:
    entry = {k: v for k, v in base_fields().items() if k not in ("epsilon", "unit")}
    entry = rechain([{**entry, "timestamp": "t"}])[0]
    problems = verify_chain([entry])
    assert [(p.kind, p.message) for p in problems] == [
        ("missing_field", "field 'unit' is missing"),
        ("missing_field", "field 'epsilon' is missing"),
    ]
    assert verify_chain(["not a dict"])[0].kind == "not_object"  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (base_fields(epsilon=float("nan")), r"field 'epsilon' must be int/float, got nan"),
        (base_fields(users="943"), r"field 'users' must be int, got '943'"),
        ({k: v for k, v in base_fields().items() if k != "cap"}, r"field 'cap' is missing"),
        (base_fields(hash="0" * 64), r"fields \['hash'\] are filled by the ledger, not the caller"),
        (base_fields(timestamp="2020"), r"fields \['timestamp'\] are filled by the ledger"),
    ],
)
def test_bad_appends_are_refused_with_a_clear_message(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    ledger = Ledger(tmp_path / "t.jsonl")
    with pytest.raises(LedgerError, match=message):
        ledger.append(fields)
    assert not ledger.path.exists()


def test_recompute_refuses_unaccountable_entries() -> None:
    with pytest.raises(
        LedgerError, match=r"ledger entry 1 cannot be accounted: missing or bad field 'steps'"
    ):
        recompute_epsilons([{k: v for k, v in base_fields().items() if k != "steps"}])
    with pytest.raises(LedgerError, match=r"ledger entry 1 cannot be accounted: noise_multiplier must be"):
        recompute_epsilons([base_fields(noise_multiplier=-1.0)])
    with pytest.raises(LedgerError, match=r"ledger entry 1 cannot be accounted: accountant must be one of"):
        recompute_epsilons([base_fields(accountant="gdp")])


def test_ledger_lines_are_plain_json(tmp_path: Path) -> None:
    ledger = train(tmp_path, sigmas=SIGMAS[:2])
    for line in ledger.path.read_text().splitlines():
        assert json.loads(line)["unit"] == "user"
        assert line.isascii()

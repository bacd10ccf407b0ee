"""fedrec.privacy.audit and fedrec.simulations.reports.audit on RUN_DIRs written the way the server and clients write them.

The ledgers are produced by the real ``TenantBudget`` + ``Ledger`` (what ``client/task.py`` does), and
``privacy.json``/``rounds.jsonl`` carry the heads the server records; each tamper case edits the files
the way an attacker with write access would, and must be caught with the entry named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedrec.privacy.audit import (
    CHECKS,
    Check,
    RunPlan,
    ServerRecord,
    audit_ledger_file,
    check_ledger,
    expected_plan,
    read_ledger,
    replay_ledger,
)
from fedrec.privacy.budget import TenantBudget
from fedrec.privacy.errors import PrivacyError
from fedrec.privacy.ledger import GENESIS, Ledger, canonical_json, entry_hash
from fedrec.simulations.reports.audit import AuditError, check_run, load_run, server_record

DELTA = 1e-5
USERS = 200
SIGMA = 1.1
CAP = 8.0


def plan_args() -> dict[str, Any]:
    return {"local-epochs": 1.0, "batch-users": 64, "max-grad-norm": 1.0}


def make_run(
    tmp: Path, *, rounds: int = 3, tenants: tuple[str, ...] = ("tenant-0",), accountant: str = "rdp"
) -> Path:
    """A RUN_DIR as the server writes it, with ledgers charged the way a ClientApp charges them."""
    run = tmp / "run"
    (run / "ledger").mkdir(parents=True)
    q, steps = expected_plan(USERS, local_epochs=1.0, batch_users=64)
    rows: list[dict[str, Any]] = [
        {"round": r, "tenants": {}, "failures": [], "aggregated": 1} for r in range(1, rounds + 1)
    ]
    summary = {}
    for t in tenants:
        budget = TenantBudget(tmp / "state" / t, tenant_id=t, cap=CAP, delta=DELTA, accountant=accountant)
        ledger = Ledger(tmp / "state" / t / "ledger.jsonl")
        eps, head = 0.0, GENESIS
        for r in range(1, rounds + 1):
            eps = budget.charge(round=r, noise_multiplier=SIGMA, sample_rate=q, steps=steps)
            entry = ledger.append(
                {
                    "round": r,
                    "tenant": t,
                    "unit": "user",
                    "users": USERS,
                    "sample_rate": q,
                    "noise_multiplier": SIGMA,
                    "max_grad_norm": 1.0,
                    "steps": steps,
                    "delta": DELTA,
                    "accountant": accountant,
                    "epsilon": eps,
                    "cap": CAP,
                    "poisson": True,
                    "secure_mode": False,
                    "status": "ok",
                }
            )
            with open(run / "ledger" / f"{t}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            head = entry["hash"]
            rows[r - 1]["tenants"][t] = {"status": "ok", "users": USERS, "epsilon": eps, "ledger_head": head}
        summary[t] = {
            "epsilon": eps,
            "cap": CAP,
            "rounds_trained": rounds,
            "users": USERS,
            "status": "ok",
            "ledger_head": head,
        }
    privacy = {
        "unit": "user",
        "accountant": accountant,
        "delta": DELTA,
        "dp": True,
        "rounds": rounds,
        "noise": "local",
        "poisson": True,
        "secure_mode": False,
        "tenants": summary,
    }
    (run / "privacy.json").write_text(json.dumps(privacy))
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "command": "simulate",
        "run_config": {
            "num-server-rounds": rounds,
            "epsilon": CAP,
            "delta": DELTA,
            "caps": "",
            "accountant": accountant,
            "dp": True,
            **plan_args(),
        },
    }
    (run / "config.json").write_text(json.dumps(config))
    return run


def entries_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(canonical_json(e) + "\n" for e in entries))


def rechain(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A forger with write access: recompute every prev_hash and hash."""
    prev, out = GENESIS, []
    for e in entries:
        forged = {**e, "prev_hash": prev}
        forged["hash"] = entry_hash(forged)
        prev = forged["hash"]
        out.append(forged)
    return out


def audit_tenant(run: Path, tenant: str = "tenant-0", *, with_replay: bool = False) -> list[Check]:
    files = load_run(run)
    led = read_ledger(files.ledgers[tenant])
    from fedrec.simulations.reports.audit import run_plan

    return check_ledger(
        tenant,
        led.entries,
        lines=led.lines,
        read_problems=led.problems,
        plan=run_plan(files, tenant),
        record=server_record(files, tenant),
        replay=replay_ledger(led.entries) if with_replay else None,
    )


def failures(checks: list[Check]) -> dict[str, list[tuple[int | None, int | None]]]:
    """check name → [(line, round)] of its findings."""
    out: dict[str, list[tuple[int | None, int | None]]] = {}
    for c in checks:
        for f in c.findings:
            out.setdefault(c.name, []).append((f.line, f.round))
    return out


# ---------------------------------------------------------------- clean run


def test_clean_run_passes_every_check(tmp_path: Path) -> None:
    run = make_run(tmp_path, tenants=("tenant-0", "tenant-1"), rounds=2)
    report = check_run(load_run(run))
    assert not report.failed(), [f.message for c in report.failed() for f in c.findings]
    names = [c.name for c in report.tenants["tenant-0"].checks]
    assert names == list(CHECKS)
    rep = report.tenants["tenant-0"].replay
    assert rep is not None and rep.max_error <= 1e-6
    assert set(rep.final) == {"opacus_prv", "opacus_rdp", "dp_accounting_pld", "dp_accounting_rdp"}


def test_expected_plan_is_client_plan_round() -> None:
    from fedrec.client.train import LocalTrainConfig, plan_round

    for n in (1, 5, 63, 64, 65, 200, 943, 5000):
        for batch in (1, 16, 64, 256):
            for epochs in (0.5, 1.0, 2.0):
                plan = plan_round(n, LocalTrainConfig(local_epochs=epochs, batch_users=batch))
                assert expected_plan(n, local_epochs=epochs, batch_users=batch) == (
                    plan.sample_rate,
                    plan.steps,
                )


# ---------------------------------------------------------------- the tamper cases


def tamper_edit_number(path: Path) -> None:
    e = entries_of(path)
    e[1]["noise_multiplier"] = 3.0  # claim more noise than was added
    write_entries(path, e)


def tamper_delete_middle(path: Path) -> None:
    e = entries_of(path)
    write_entries(path, [e[0], e[2]])


def tamper_reorder(path: Path) -> None:
    e = entries_of(path)
    write_entries(path, [e[0], e[2], e[1]])


def tamper_truncate_tail(path: Path) -> None:
    write_entries(path, entries_of(path)[:-1])


def tamper_rewrite(path: Path) -> None:
    e = entries_of(path)
    write_entries(path, rechain([{**x, "epsilon": x["epsilon"] / 2} for x in e]))


def tamper_cross_cap(path: Path) -> None:
    e = entries_of(path)
    extra = {**e[-1], "round": 4, "epsilon": CAP + 1.0}
    write_entries(path, rechain([*e, extra]))


TAMPERS = {
    # case: (tamper, check that must fail, (line, round) it must name)
    "edit a number": (tamper_edit_number, "hash_chain", (2, 2)),
    "delete a middle line": (tamper_delete_middle, "hash_chain", (2, 3)),
    "reorder": (tamper_reorder, "hash_chain", (2, 3)),
    "truncate the tail": (tamper_truncate_tail, "recorded_heads", (2, 3)),
    "rewrite with valid hashes": (tamper_rewrite, "recorded_heads", (1, 1)),
    "forged entry crossing the cap": (tamper_cross_cap, "epsilon_within_cap", (4, 4)),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_each_tamper_is_detected_with_the_entry_named(tmp_path: Path, case: str) -> None:
    run = make_run(tmp_path)
    assert not failures(audit_tenant(run))
    tamper, check, where = TAMPERS[case]
    tamper(run / "ledger" / "tenant-0.jsonl")
    found = failures(audit_tenant(run))
    assert check in found, f"{case}: {found}"
    assert where in found[check], f"{case}: {check} named {found[check]}"


def test_tamper_specifics(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    path = run / "ledger" / "tenant-0.jsonl"
    original = path.read_text()
    # Deleting round 2 also shows as a round rounds.jsonl says was trained but the ledger lacks.
    tamper_delete_middle(path)
    assert (None, 2) in failures(audit_tenant(run))["rounds_match"]
    # Reordering breaks the round order too.
    path.write_text(original)
    tamper_reorder(path)
    assert "ordered_consistent" in failures(audit_tenant(run))
    # The truncated tail is invisible to the chain itself: only the recorded heads catch it.
    path.write_text(original)
    tamper_truncate_tail(path)
    found = failures(audit_tenant(run))
    assert "hash_chain" not in found and "recorded_heads" in found
    # The rewrite is caught at every round and in privacy.json's final head, and by the replay.
    path.write_text(original)
    tamper_rewrite(path)
    found = failures(audit_tenant(run, with_replay=True))
    assert "hash_chain" not in found
    assert {r for _, r in found["recorded_heads"]} >= {1, 2, 3}
    assert [ln for ln, _ in found["epsilon_replay"]] == [1, 2, 3]


def test_forged_low_noise_within_recorded_cap_is_caught_by_the_replay(tmp_path: Path) -> None:
    # A forger who trained with far less noise and records an ε under the cap, hashes recomputed and the
    # server's heads rewritten too: only recomputing ε from the recorded mechanism shows the cap crossed.
    run = make_run(tmp_path)
    path = run / "ledger" / "tenant-0.jsonl"
    forged = rechain([{**e, "noise_multiplier": 0.3} for e in entries_of(path)])
    write_entries(path, forged)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    for row, e in zip(rows, forged, strict=True):
        row["tenants"]["tenant-0"]["ledger_head"] = e["hash"]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    privacy = json.loads((run / "privacy.json").read_text())
    privacy["tenants"]["tenant-0"]["ledger_head"] = forged[-1]["hash"]
    (run / "privacy.json").write_text(json.dumps(privacy))
    found = failures(audit_tenant(run, with_replay=True))
    assert set(found) == {"epsilon_replay", "epsilon_within_cap"}
    assert (3, 3) in found["epsilon_within_cap"]


def test_tamper_score(tmp_path: Path) -> None:
    """The closing-note figure: tamper cases detected / attempted."""
    detected = 0
    for i, (tamper, _check, _where) in enumerate(TAMPERS.values()):
        run = make_run(tmp_path / str(i))
        tamper(run / "ledger" / "tenant-0.jsonl")
        detected += bool(failures(audit_tenant(run)))
    assert detected == len(TAMPERS)


def test_entry_after_capped_round_and_raised_cap(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    rows[1]["tenants"]["tenant-0"]["status"] = "capped"  # the server saw round 2 refused …
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = failures(audit_tenant(run))
    assert (3, 3) in found["no_entry_after_cap"]  # … yet round 3 was charged
    assert (2, 2) in found["rounds_match"]


def test_plan_mismatches_are_named(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    led = read_ledger(run / "ledger" / "tenant-0.jsonl")
    plan = RunPlan(
        delta=DELTA, accountant="rdp", cap=4.0, local_epochs=2.0, batch_users=64, max_grad_norm=1.0
    )
    found = failures(check_ledger("tenant-0", led.entries, lines=led.lines, plan=plan))
    assert (1, 1) in found["steps_match_plan"]  # 2 epochs at q = 0.25 is 8 steps, not 4
    assert (1, 1) in found["epsilon_within_cap"]  # the configured cap is 4, the ledger says 8
    small = [{**e, "users": 200_000} for e in led.entries]  # δ = 1e-5 is not < 1/200 000 (hashes break too)
    assert "delta_below_1_over_users" in failures(check_ledger("tenant-0", small))


def test_server_record_mismatch_in_privacy_json(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    privacy = json.loads((run / "privacy.json").read_text())
    privacy["tenants"]["tenant-0"]["epsilon"] = 1.0
    (run / "privacy.json").write_text(json.dumps(privacy))
    assert "privacy_json_matches" in failures(audit_tenant(run))


def test_unparseable_line_is_named(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    path = run / "ledger" / "tenant-0.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    found = failures(audit_tenant(run))
    assert (2, None) in found["ledger_readable"]
    assert (3, 3) in found["hash_chain"]  # line 3 (round 3): its prev_hash points at the lost entry


# ---------------------------------------------------------------- one tenant's own ledger


def test_tenant_verifies_its_own_ledger(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    own = tmp_path / "state" / "tenant-0" / "ledger.jsonl"
    head = entries_of(own)[-1]["hash"]
    checks, replay = audit_ledger_file(own, expected_head=head)
    assert all(c.passed for c in checks)
    assert replay is not None and replay.max_error <= 1e-6
    checks, _ = audit_ledger_file(own, expected_head="f" * 64)
    assert [c.name for c in checks if not c.passed] == ["recorded_heads"]
    # The server's copy is byte-for-byte the same chain.
    assert [e["hash"] for e in entries_of(own)] == [
        e["hash"] for e in entries_of(run / "ledger" / "tenant-0.jsonl")
    ]
    with pytest.raises(PrivacyError, match="does not exist"):
        audit_ledger_file(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- golden ε and bad input


def test_golden_epsilons_of_a_run_setting() -> None:
    """σ = 0.802734375, q = 0.25, 2 rounds × 4 steps, δ = 1e-5 (the 2-tenant ε = 8 smoke run)."""
    entries = [
        {
            "round": r,
            "tenant": "t",
            "users": 200,
            "steps": 4,
            "sample_rate": 0.25,
            "noise_multiplier": 0.802734375,
            "max_grad_norm": 1.0,
            "delta": DELTA,
            "epsilon": 0.0,
            "cap": 8.0,
            "accountant": "prv",
        }
        for r in (1, 2)
    ]
    rep = replay_ledger(entries)
    assert rep.replayed[0] == pytest.approx(6.16033, abs=1e-4)
    assert rep.final["opacus_prv"] == pytest.approx(7.99854, abs=1e-4)
    assert rep.final["dp_accounting_pld"] == pytest.approx(7.98795, abs=1e-3)
    assert rep.final["opacus_rdp"] == pytest.approx(9.13396, abs=1e-3)
    assert rep.final["dp_accounting_rdp"] == pytest.approx(9.14051, abs=1e-3)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "not a directory"),
        (lambda p: p.mkdir(), "privacy.json is missing"),
        (lambda p: (p.mkdir(), (p / "privacy.json").write_text("{oops")), "not valid JSON"),
        (lambda p: (p.mkdir(), (p / "privacy.json").write_text("[]")), "no 'tenants'"),
    ],
)
def test_bad_run_dirs_are_one_line_errors(tmp_path: Path, setup: Any, message: str) -> None:
    target = tmp_path / "r"
    setup(target)
    with pytest.raises(AuditError, match=message):
        load_run(target)


def test_corrupt_rounds_jsonl(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "rounds.jsonl").write_text('{"round": 1}\nnot json\n')
    with pytest.raises(AuditError, match="rounds.jsonl line 2"):
        load_run(run)


def test_server_record_reads_rounds(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    rec = server_record(load_run(run), "tenant-0")
    assert isinstance(rec, ServerRecord) and sorted(rec.round_heads) == [1, 2, 3]
    assert set(rec.round_status.values()) == {"ok"}

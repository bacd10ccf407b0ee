"""Budget audit checks: verify one tenant's ledger against what the coordinator recorded, replay ε.

Pure functions over parsed data (the RUN_DIR and ledger files are read by the caller): every check
has a stable name, passes or fails, and each failure is a :class:`Finding` naming the tenant, the
ledger line and the round. What each check covers:

============================  ===================================================================
``ledger_readable``           every line is a JSON object
``hash_chain``                each hash matches its entry, each ``prev_hash`` the entry before
``entry_schema``              required fields, types and ranges (``fedrec.privacy.ledger.FIELDS``)
``recorded_heads``            the chain's head after each round equals the head the server wrote
                              in ``rounds.jsonl`` and, at the end, ``privacy.json`` — the only way
                              to see a truncated tail or a rewrite with freshly computed hashes
``rounds_match``              ledger rounds = the rounds ``rounds.jsonl`` says the tenant was
                              charged for (ok or rejected), within the planned rounds
``no_entry_after_cap``        nothing after an entry marked capped or a round the tenant was capped
``epsilon_within_cap``        recorded and replayed ε ≤ cap; the cap is the configured one, never raised
``delta_below_1_over_users``  δ < 1/users, δ the run's δ
``poisson_sampling``          Poisson sampling recorded
``unit_user``                 privacy unit ``user``
``ordered_consistent``        rounds increase; tenant, accountant, δ constant; ε never decreases
``steps_match_plan``          q = 1/ceil(n/min(B, n)) and steps = round(epochs/q) (client/train.py);
                              dp-mode cohort: q = cohort-rate and one step per round
``privacy_json_matches``      ``privacy.json``'s ε, users, rounds trained = the ledger's
``epsilon_replay``            |ε replayed − ε recorded| ≤ 1e-6 with the recorded accountant; where an
                              entry is a cohort round (dp-mode cohort), σ_local = σ/√shares and
                              ``epsilon_if_alone`` replays from every entry at its own σ_local
``accountant_agreement``      PRV vs dp_accounting PLD within 2 %; RDP (Opacus and dp_accounting)
                              not below PRV (RDP is an upper bound)
============================  ===================================================================
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.privacy.accounting import epsilon, epsilon_dp_accounting
from fedrec.privacy.errors import PrivacyError
from fedrec.privacy.ledger import CAP_SLACK, GENESIS, LedgerProblem, read_entries, verify_chain
from fedrec.privacy.mechanisms import COUNT_MECHANISM, EVAL_MECHANISM, RELATION

#: Ledger entries that charge a mechanism other than a training round or release (checked for chain,
#: replay and cap, not against the training plan or rounds.jsonl).
SIDE_MECHANISMS = (COUNT_MECHANISM, EVAL_MECHANISM)
#: |ε replayed − ε recorded| allowed with the accountant the run used (same code, same inputs).
REPLAY_TOLERANCE = 1e-6
#: Relative disagreement allowed between Opacus PRV and dp_accounting PLD (both ≈ exact; ~0.2 % seen).
PLD_RTOL = 0.02
#: RDP may not come out below PRV by more than this (relative): it is an upper bound on the same curve.
RDP_RTOL = 0.01

CHECKS: tuple[str, ...] = (
    "ledger_readable",
    "hash_chain",
    "entry_schema",
    "recorded_heads",
    "rounds_match",
    "no_entry_after_cap",
    "epsilon_within_cap",
    "delta_below_1_over_users",
    "poisson_sampling",
    "unit_user",
    "ordered_consistent",
    "steps_match_plan",
    "privacy_json_matches",
    "epsilon_replay",
    "accountant_agreement",
)

#: Which check a ``fedrec.privacy.ledger.LedgerProblem`` kind belongs to.
_KIND_TO_CHECK: dict[str, str] = {
    "bad_json": "ledger_readable",
    "not_object": "ledger_readable",
    "hash_mismatch": "hash_chain",
    "prev_hash_mismatch": "hash_chain",
    "missing_field": "entry_schema",
    "unknown_field": "entry_schema",
    "bad_type": "entry_schema",
    "bad_value": "entry_schema",
    "head_mismatch": "recorded_heads",
    "round_order": "ordered_consistent",
    "inconsistent": "ordered_consistent",
    "epsilon_decreasing": "ordered_consistent",
    "epsilon_over_cap": "epsilon_within_cap",
    "cap_raised": "epsilon_within_cap",
    "after_capped": "no_entry_after_cap",
    "delta_too_large": "delta_below_1_over_users",
    "not_poisson": "poisson_sampling",
    "wrong_unit": "unit_user",
}


@dataclass(frozen=True)
class Finding:
    """One failed condition: where (tenant, 1-based ledger line, round) and what."""

    check: str
    tenant: str | None
    line: int | None
    round: int | None
    message: str

    def where(self) -> str:
        parts = [p for p in (self.tenant, _opt("line", self.line), _opt("round", self.round)) if p]
        return " ".join(parts) if parts else "run"


@dataclass(frozen=True)
class Check:
    """The outcome of one named check for one tenant (``tenant=None``: a run-wide check)."""

    name: str
    tenant: str | None
    findings: tuple[Finding, ...] = ()
    note: str = ""  # what was compared, for the report

    @property
    def passed(self) -> bool:
        return not self.findings


@dataclass(frozen=True)
class RunPlan:
    """Run-wide settings a tenant's ledger must agree with (``None``: not known, not checked)."""

    delta: float | None = None
    accountant: str | None = None
    cap: float | None = None  # this tenant's configured cap
    local_epochs: float | None = None
    batch_users: int | None = None
    max_grad_norm: float | None = None
    planned_rounds: int | None = None
    # Rounds that are the item release initialising the MLP (release-init): q = 1, one step, purpose
    # "mlp-init"; the DP-SGD plan below applies to the other rounds.
    init_rounds: tuple[int, ...] = ()
    # dp-mode cohort: every DP-SGD round is one step at this Poisson rate (not the local-epochs plan)
    cohort_rate: float | None = None
    # The tenant's own calibrated plan (dp_plan.json), when the auditor has it:
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None


@dataclass(frozen=True)
class ServerRecord:
    """What the coordinator recorded about one tenant during the run (``None``: not recorded)."""

    final_head: str | None = None  # privacy.json ledger_head
    epsilon: float | None = None  # privacy.json ε
    users: int | None = None
    rounds_trained: int | None = None
    round_heads: Mapping[int, str] = field(default_factory=dict)  # rounds.jsonl: head after round r
    round_status: Mapping[int, str] = field(default_factory=dict)  # rounds.jsonl: ok | capped | rejected


@dataclass(frozen=True)
class Replay:
    """ε of one tenant replayed from its ledger entries alone."""

    rounds: tuple[int, ...]
    recorded: tuple[float, ...]  # cumulative ε as recorded
    replayed: tuple[float, ...]  # cumulative ε with each entry's recorded accountant
    accountant: str
    final: dict[str, float]  # opacus_prv, opacus_rdp, dp_accounting_pld, dp_accounting_rdp
    # ε if the server saw each share alone (every entry at its local_noise_multiplier), after each entry
    # that records epsilon_if_alone; None elsewhere
    alone: tuple[float | None, ...] = ()

    @property
    def max_error(self) -> float:
        return max((abs(a - b) for a, b in zip(self.recorded, self.replayed, strict=True)), default=0.0)


def expected_plan(n_users: int, *, local_epochs: float, batch_users: int) -> tuple[float, int]:
    """(q, steps) a tenant of ``n_users`` must use: the formula of ``fedrec.client.train.plan_round``."""
    if n_users < 1 or batch_users < 1 or not local_epochs > 0:
        raise PrivacyError(
            f"need users ≥ 1, batch_users ≥ 1, local_epochs > 0, got {n_users}, {batch_users}, {local_epochs}"
        )
    q = 1.0 / math.ceil(n_users / min(batch_users, n_users))
    return q, max(1, round(local_epochs / q))


# ---------------------------------------------------------------- the checks


def check_ledger(
    tenant: str,
    entries: Sequence[dict[str, Any]],
    *,
    lines: Sequence[int] | None = None,
    read_problems: Sequence[LedgerProblem] = (),
    plan: RunPlan | None = None,
    record: ServerRecord | None = None,
    replay: Replay | None = None,
) -> list[Check]:
    """Every check of the module table for one tenant, in :data:`CHECKS` order.

    ``lines`` are the file line of each entry (default 1..n); ``read_problems`` the unparseable lines
    from ``fedrec.privacy.ledger.read_entries``; ``replay`` from :func:`replay_ledger` (skipped when None, e.g.
    when the entries are too malformed to account).
    """
    plan = plan or RunPlan()
    line_of = list(lines) if lines is not None else list(range(1, len(entries) + 1))
    found: dict[str, list[Finding]] = {name: [] for name in CHECKS}

    def add(check: str, line: int | None, rnd: int | None, message: str) -> None:
        found[check].append(Finding(check, tenant, line, rnd, message))

    for p in [*read_problems, *verify_chain(entries, line_numbers=line_of)]:
        add(_KIND_TO_CHECK.get(p.kind, "entry_schema"), p.line, p.round, p.message)

    good = [(ln, e) for ln, e in zip(line_of, entries, strict=True) if _well_formed(e)]
    for ln, e in good:
        if e.get("relation", RELATION) != RELATION:
            add("ordered_consistent", ln, e["round"], f"relation {e['relation']!r} is not {RELATION!r}")
        if e["tenant"] != tenant:
            add("ordered_consistent", ln, e["round"], f"entry names tenant {e['tenant']!r}, not {tenant!r}")
        if e.get("mechanism") in SIDE_MECHANISMS:  # the noisy count / DP evaluation: not a training round
            continue
        if plan.delta is not None and e["delta"] != plan.delta:
            add(
                "delta_below_1_over_users",
                ln,
                e["round"],
                f"δ {e['delta']!r} is not the run's δ {plan.delta!r}",
            )
        if plan.accountant is not None and e["accountant"] != plan.accountant:
            add(
                "ordered_consistent",
                ln,
                e["round"],
                f"accountant {e['accountant']!r} is not the run's {plan.accountant!r}",
            )
        if plan.cap is not None and e["cap"] != plan.cap:
            add(
                "epsilon_within_cap",
                ln,
                e["round"],
                f"cap {e['cap']!r} is not the configured cap {plan.cap!r}",
            )
        if e["round"] in plan.init_rounds:
            if e["sample_rate"] != 1.0 or e["steps"] != 1 or e.get("purpose") != "mlp-init":
                add(
                    "steps_match_plan",
                    ln,
                    e["round"],
                    f"round {e['round']} is the initialising release (q = 1, one step, purpose mlp-init), "
                    f"got q = {e['sample_rate']!r}, steps = {e['steps']!r}, purpose {e.get('purpose')!r}",
                )
        elif plan.max_grad_norm is not None and e["max_grad_norm"] != plan.max_grad_norm:
            add(
                "steps_match_plan",
                ln,
                e["round"],
                f"max_grad_norm {e['max_grad_norm']!r} is not the run's {plan.max_grad_norm!r}",
            )
        if e["round"] in plan.init_rounds:
            pass
        elif plan.cohort_rate is not None:
            if (
                abs(e["sample_rate"] - plan.cohort_rate) > 1e-12
                or e["steps"] != 1
                or e.get("dp_mode") != "cohort"
            ):
                add(
                    "steps_match_plan",
                    ln,
                    e["round"],
                    f"a cohort round is one step at q = cohort-rate {plan.cohort_rate:g}, got "
                    f"q = {e['sample_rate']!r}, steps = {e['steps']!r}, dp_mode {e.get('dp_mode')!r}",
                )
        elif plan.local_epochs is not None and plan.batch_users is not None:
            q, steps = expected_plan(e["users"], local_epochs=plan.local_epochs, batch_users=plan.batch_users)
            if abs(e["sample_rate"] - q) > 1e-12 or e["steps"] != steps:
                add(
                    "steps_match_plan",
                    ln,
                    e["round"],
                    f"sample_rate {e['sample_rate']!r} and steps {e['steps']} do not match "
                    f"q = {q:.6g}, steps = round({plan.local_epochs:g}/q) = {steps} for {e['users']} users "
                    f"and batch-users {plan.batch_users}",
                )
        for key in ("noise_multiplier", "sample_rate", "steps"):
            want = getattr(plan, key)
            if want is not None and e[key] != want and e["round"] not in plan.init_rounds:
                add("steps_match_plan", ln, e["round"], f"{key} {e[key]!r} is not the planned {want!r}")
        if plan.planned_rounds is not None and not 1 <= e["round"] <= plan.planned_rounds:
            add(
                "rounds_match",
                ln,
                e["round"],
                f"round {e['round']} is outside the run's 1..{plan.planned_rounds}",
            )

    if replay is not None:
        _check_replay(tenant, good, replay, plan, add)
    if record is not None:
        _check_record(tenant, entries, line_of, good, record, add)

    notes = {
        "recorded_heads": "no head recorded by the server" if record is None else "",
        "epsilon_replay": "not replayed" if replay is None else f"max error {replay.max_error:.2e}",
    }
    return [Check(name, tenant, tuple(found[name]), notes.get(name, "")) for name in CHECKS]


def _check_replay(
    tenant: str,
    good: list[tuple[int, dict[str, Any]]],
    replay: Replay,
    plan: RunPlan,
    add: Any,
) -> None:
    for (ln, e), alone in zip(good, replay.alone, strict=False):
        if alone is None:
            continue
        split = float(e["noise_multiplier"]) / math.sqrt(int(e["shares"]))
        if abs(float(e["local_noise_multiplier"]) - split) > 1e-9 * max(1.0, split):
            add(
                "epsilon_replay",
                ln,
                e["round"],
                f"local_noise_multiplier {e['local_noise_multiplier']!r} is not σ/√shares = {split:.9g}",
            )
        if abs(float(e["epsilon_if_alone"]) - alone) > REPLAY_TOLERANCE:
            add(
                "epsilon_replay",
                ln,
                e["round"],
                f"recorded epsilon_if_alone {e['epsilon_if_alone']:.9g} but each share alone replays to "
                f"{alone:.9g} with {e['accountant']}",
            )
    for (ln, e), rec, rep in zip(good, replay.recorded, replay.replayed, strict=False):
        if abs(rec - rep) > REPLAY_TOLERANCE:
            add(
                "epsilon_replay",
                ln,
                e["round"],
                f"recorded ε {rec:.9g} but the entries replay to ε {rep:.9g} with {e['accountant']} "
                f"(|Δ| = {abs(rec - rep):.3g} > {REPLAY_TOLERANCE:g})",
            )
        cap = plan.cap if plan.cap is not None else e["cap"]
        if rep > cap + CAP_SLACK:
            add(
                "epsilon_within_cap",
                ln,
                e["round"],
                f"the recorded mechanism replays to ε {rep:.6g}, above the cap {cap:g}",
            )
    if not good:
        return
    ln, last = good[-1]
    f = replay.final
    prv, pld = f.get("opacus_prv"), f.get("dp_accounting_pld")
    if prv is not None and pld is not None and abs(prv - pld) > PLD_RTOL * max(prv, pld, 1e-12):
        add(
            "accountant_agreement",
            ln,
            last["round"],
            f"Opacus PRV ε {prv:.4g} and dp_accounting PLD ε {pld:.4g} differ by more than {PLD_RTOL:.0%}",
        )
    for name in ("opacus_rdp", "dp_accounting_rdp"):
        rdp = f.get(name)
        if prv is not None and rdp is not None and rdp < prv * (1 - RDP_RTOL):
            add(
                "accountant_agreement",
                ln,
                last["round"],
                f"{name} ε {rdp:.4g} is below PRV ε {prv:.4g}, but RDP is an upper bound",
            )


def _check_record(
    tenant: str,
    entries: Sequence[dict[str, Any]],
    line_of: list[int],
    good: list[tuple[int, dict[str, Any]]],
    record: ServerRecord,
    add: Any,
) -> None:
    # Heads: after round r the chain's head is the hash of the last entry with round ≤ r.
    chained = [(ln, e) for ln, e in zip(line_of, entries, strict=True) if isinstance(e, dict)]
    for rnd in sorted(record.round_heads):
        upto = [(ln, e) for ln, e in chained if _is_int(e.get("round")) and e["round"] <= rnd]
        head = str(upto[-1][1].get("hash")) if upto else GENESIS
        if head != record.round_heads[rnd]:
            where = upto[-1][0] if upto else None
            add(
                "recorded_heads",
                where,
                rnd,
                f"after round {rnd} the server recorded head {record.round_heads[rnd][:12]}…, "
                f"the ledger has {head[:12]}… (entries were edited, removed or rewritten)",
            )
    if record.final_head is not None:
        head = str(chained[-1][1].get("hash")) if chained else GENESIS
        if head != record.final_head:
            add(
                "recorded_heads",
                chained[-1][0] if chained else None,
                None,
                f"privacy.json records the final head {record.final_head[:12]}…, the ledger ends at "
                f"{head[:12]}… (truncated or rewritten)",
            )

    ledger_rounds = {e["round"]: ln for ln, e in good if e.get("mechanism") not in SIDE_MECHANISMS}
    charged = {r for r, s in record.round_status.items() if s in ("ok", "rejected")}
    if record.round_status:
        for r in sorted(charged - set(ledger_rounds)):
            add("rounds_match", None, r, f"rounds.jsonl says round {r} was trained, the ledger has no entry")
        for r in sorted(set(ledger_rounds) - charged):
            said = record.round_status.get(r, "absent")
            add(
                "rounds_match",
                ledger_rounds[r],
                r,
                f"the ledger charges round {r}, rounds.jsonl says the tenant was {said} in that round",
            )
        capped = [r for r, s in record.round_status.items() if s == "capped"]
        if capped:
            first = min(capped)
            for r, ln in sorted(ledger_rounds.items()):
                if r > first:
                    add(
                        "no_entry_after_cap",
                        ln,
                        r,
                        f"an entry for round {r} follows the cap at round {first}",
                    )
    if record.rounds_trained is not None:
        ok = sum(1 for s in record.round_status.values() if s == "ok")
        if record.round_status and ok != record.rounds_trained:
            add(
                "rounds_match",
                None,
                None,
                f"privacy.json says {record.rounds_trained} rounds trained, rounds.jsonl shows {ok}",
            )
    if good:
        ln, last = good[-1]
        if record.epsilon is not None and abs(record.epsilon - last["epsilon"]) > REPLAY_TOLERANCE:
            add(
                "privacy_json_matches",
                ln,
                last["round"],
                f"privacy.json reports ε {record.epsilon:.6g}, the ledger's last entry {last['epsilon']:.6g}",
            )
        if record.users is not None and record.users != last["users"]:
            add(
                "privacy_json_matches",
                ln,
                last["round"],
                f"privacy.json reports {record.users} users, the ledger {last['users']}",
            )
    elif record.epsilon not in (None, 0.0):
        add(
            "privacy_json_matches",
            None,
            None,
            f"privacy.json reports ε {record.epsilon} but the ledger is empty",
        )


# ---------------------------------------------------------------- one ledger file


@dataclass(frozen=True)
class LedgerFile:
    """A ledger as read from disk: the parseable entries, their file lines, the unparseable lines."""

    entries: list[dict[str, Any]]
    lines: list[int]
    problems: list[LedgerProblem]


def read_ledger(path: Path) -> LedgerFile:
    """Read ``path`` with ``fedrec.privacy.ledger.read_entries`` and recover each entry's file line."""
    entries, problems = read_entries(path)
    bad = {p.line for p in problems}
    lines = [n for n in range(1, len(entries) + len(problems) + 1) if n not in bad]
    return LedgerFile(entries, lines, problems)


def plan_from_file(path: Path) -> RunPlan:
    """The tenant's ``dp_plan.json`` (σ, q, steps, planned rounds, cap, δ, accountant) as a RunPlan."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return RunPlan(
            delta=float(raw["delta"]),
            accountant=str(raw["accountant"]),
            cap=float(raw["cap"]),
            planned_rounds=int(raw["planned_rounds"]),
            noise_multiplier=float(raw["noise_multiplier"]),
            sample_rate=float(raw["sample_rate"]),
            steps=int(raw["steps"]),
            init_rounds=tuple(int(r) for r in raw.get("init_rounds", ())),
        )
    except OSError as err:
        raise PrivacyError(f"cannot read the DP plan {path}: {err.strerror or err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise PrivacyError(f"{path} is not a DP plan (dp_plan.json): {err!r}") from err


def audit_ledger_file(
    path: Path, *, tenant: str | None = None, expected_head: str | None = None, plan: RunPlan | None = None
) -> tuple[list[Check], Replay | None]:
    """All checks a tenant can run on its own ledger (no coordinator files): chain, fields, cap, plan,
    replay and cross-accountant agreement; ``expected_head`` if the tenant kept one elsewhere."""
    if not Path(path).is_file():
        raise PrivacyError(f"ledger {path} does not exist")
    led = read_ledger(path)
    if tenant is None:
        named = [e.get("tenant") for e in led.entries if isinstance(e.get("tenant"), str)]
        tenant = str(named[0]) if named else Path(path).stem
    replay = replay_ledger(led.entries)
    record = ServerRecord(final_head=expected_head) if expected_head is not None else None
    checks = check_ledger(
        tenant,
        led.entries,
        lines=led.lines,
        read_problems=led.problems,
        plan=plan,
        record=record,
        replay=replay,
    )
    return checks, replay


# ---------------------------------------------------------------- replay


def replay_ledger(entries: Sequence[dict[str, Any]], *, cross_check: bool = True) -> Replay:
    """Replay the cumulative ε after each well-formed entry, and the final ε with four accountants.

    Raises :class:`PrivacyError` if no entry is well formed enough to account.
    """
    good = [e for e in entries if _well_formed(e)]
    history: list[tuple[float, float, int]] = []
    alone_history: list[tuple[float, float, int]] = []
    replayed: list[float] = []
    alone: list[float | None] = []
    for e in good:
        history.append((float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])))
        replayed.append(epsilon(history=history, delta=float(e["delta"]), accountant=e["accountant"]))
        own = e.get("local_noise_multiplier", e["noise_multiplier"])
        alone_history.append((float(own), float(e["sample_rate"]), int(e["steps"])))
        # checked on cohort rounds (dp-mode cohort); a release records its own ε if alone (privacy/gram.py)
        checkable = (
            e.get("dp_mode") == "cohort"
            and "epsilon_if_alone" in e
            and "local_noise_multiplier" in e
            and _is_int(e.get("shares"))
            and e["shares"] >= 1
        )
        alone.append(
            epsilon(history=alone_history, delta=float(e["delta"]), accountant=e["accountant"])
            if checkable
            else None
        )
    final: dict[str, float] = {}
    if good and cross_check:
        delta = float(good[-1]["delta"])
        final["opacus_prv"] = epsilon(history=history, delta=delta, accountant="prv")
        final["opacus_rdp"] = epsilon(history=history, delta=delta, accountant="rdp")
        final["dp_accounting_pld"] = epsilon_dp_accounting(history=history, delta=delta, method="pld")
        with _quiet_absl():
            final["dp_accounting_rdp"] = epsilon_dp_accounting(history=history, delta=delta, method="rdp")
    return Replay(
        rounds=tuple(int(e["round"]) for e in good),
        recorded=tuple(float(e["epsilon"]) for e in good),
        replayed=tuple(replayed),
        accountant=str(good[-1]["accountant"]) if good else "",
        final=final,
        alone=tuple(alone),
    )


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting's RDP logs (via absl) each Rényi order it drops for not converging; the bound
    over the remaining orders is still valid, so the log lines are noise for an audit report."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- helpers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _well_formed(entry: object) -> bool:
    """Fields present with usable types (the semantic checks and the replay need them)."""
    if not isinstance(entry, dict):
        return False
    try:
        return (
            _is_int(entry["round"])
            and isinstance(entry["tenant"], str)
            and _is_int(entry["users"])
            and entry["users"] >= 1
            and _is_int(entry["steps"])
            and entry["steps"] >= 0
            and all(
                isinstance(entry[k], int | float)
                and not isinstance(entry[k], bool)
                and math.isfinite(entry[k])
                for k in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta", "epsilon", "cap")
            )
            and 0 < entry["sample_rate"] <= 1
            and entry["noise_multiplier"] > 0
            and 0 < entry["delta"] < 1
            and entry["accountant"] in ("prv", "rdp")
        )
    except KeyError:
        return False


def _opt(label: str, value: int | None) -> str:
    return f"{label} {value}" if value is not None else ""

"""The tamper-evident budget ledger: append-only JSONL, one hash-chained entry per trained round.

Each line is one JSON object with the fields of :data:`FIELDS` plus ``timestamp`` (UTC ISO
8601), ``prev_hash`` and ``hash``; an optional ``status`` (``"ok"`` or ``"capped"``) may be
recorded too — ``"capped"`` marks the round that exhausted the tenant's budget, after which no
entry may follow. ``hash`` is the SHA-256 hex digest of :func:`canonical_json` of the entry without
``hash``; ``prev_hash`` is the previous entry's ``hash`` (:data:`GENESIS` for the first).

What the chain proves, and what it does not: editing, deleting or reordering a line breaks
it, but truncating the tail, or rewriting the whole file with freshly computed hashes, yields
another valid chain. Those are caught only against a head hash recorded elsewhere
(``verify_chain(entries, expected_head=...)``), and a forged ε only by recomputing it from the
recorded mechanism (:func:`recompute_epsilons`).

:class:`Ledger` holds the I/O; :func:`verify_chain`, :func:`recompute_epsilons` and
:func:`max_recompute_error` are pure.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedrec.privacy.accounting import check_accountant, epsilon
from fedrec.privacy.errors import BudgetError, LedgerError

GENESIS = "0" * 64
CAP_SLACK = 1e-9  # recorded ε may exceed the cap by float noise, no more

#: Fields the caller supplies for each entry, and their JSON types.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "round": int,
    "tenant": str,
    "unit": str,
    "users": int,
    "sample_rate": (int, float),
    "noise_multiplier": (int, float),
    "max_grad_norm": (int, float),
    "steps": int,
    "delta": (int, float),
    "accountant": str,
    "epsilon": (int, float),
    "cap": (int, float),
    "poisson": bool,
    "secure_mode": bool,
}
#: Optional fields: the status, and what a one-shot item release (``fedrec.privacy.gram``) records besides the
#: segment itself — its mechanism, the share of the sensitivity given to popularity, the noise mode
#: (``local`` | ``distributed`` under SecAgg+), the number of shares the noise was split into, this
#: tenant's own noise multiplier and the ε if the server saw this tenant's share alone.
OPTIONAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "status": str,
    "mechanism": str,
    "pop_share": (int, float),
    "noise_mode": str,
    "shares": int,
    "local_noise_multiplier": (int, float),
    "epsilon_if_alone": (int, float),
    "stage": int,  # dp_two_stage: 1 = the selecting popularity release, 2 = the Gram on the selection
    "selected_items": int,  # dp_two_stage stage 2: how many items the Gram covers
    # the neighbouring relation the ε is for, and σ_c of the noisy count that ``users`` holds
    # (fedrec.privacy.mechanisms; absent in ledgers written before counts were noised)
    "relation": str,
    "count_noise_multiplier": (int, float),
    # release-init (issue 16): the release initialises the MLP and was calibrated alone to this share of
    # the cap; the DP-SGD rounds that follow compose with it under the same cap.
    "purpose": str,
    "release_share": (int, float),
    # dp-mode cohort (issue 16): a round of one noisy clipped gradient sum; with noise_mode distributed
    # the tenant added σ/√shares (local_noise_multiplier) and epsilon_if_alone is its ε if seen alone
    "dp_mode": str,
}
CHAIN_FIELDS = ("timestamp", "prev_hash", "hash")  # filled by Ledger.append
STATUSES = ("ok", "capped")


@dataclass(frozen=True)
class LedgerProblem:
    """One verification finding. ``line`` is 1-based (the file line when read from a file)."""

    line: int
    round: int | None  # the entry's round when it has a usable one
    kind: str  # bad_json, not_object, missing_field, unknown_field, bad_type, bad_value, hash_mismatch,
    # prev_hash_mismatch, head_mismatch, round_order, inconsistent, epsilon_decreasing,
    # epsilon_over_cap, cap_raised, after_capped, delta_too_large, not_poisson, wrong_unit
    message: str


def canonical_json(obj: Any) -> str:
    """The byte-stable form hashed: sorted keys, no spaces, ASCII only, no NaN/inf."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``entry`` without its ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


# ---------------------------------------------------------------- the file


class Ledger:
    """One tenant's ledger file. Appends are single ``os.write`` calls on an O_APPEND fd, fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry; raises :class:`LedgerError` if a line is not a JSON object."""
        entries, problems = read_entries(self.path)
        if problems:
            raise LedgerError(f"ledger {self.path} line {problems[0].line}: {problems[0].message}")
        return entries

    def head(self) -> str:
        """The hash of the last entry (:data:`GENESIS` for an empty or missing ledger)."""
        entries = self.entries()
        return str(entries[-1].get("hash", "")) if entries else GENESIS

    def append(self, entry_fields: dict[str, Any]) -> dict[str, Any]:
        """Validate, chain and durably append one entry; returns it with timestamp and hashes.

        Refuses (:class:`LedgerError`) an entry with missing, unknown or ill-typed fields, one
        that would make the chain fail :func:`verify_chain` (round not after the last, ε going
        down or above the cap, …), and any append to a ledger that already fails verification.
        """
        if not isinstance(entry_fields, dict):
            raise LedgerError(f"a ledger entry must be a dict, got {type(entry_fields).__name__}")
        supplied = sorted(set(entry_fields) & set(CHAIN_FIELDS))
        if supplied:
            raise LedgerError(f"ledger entry fields {supplied} are filled by the ledger, not the caller")
        existing = self.entries()
        old_problems = verify_chain(existing)
        if old_problems:
            first = old_problems[0]
            raise LedgerError(
                f"ledger {self.path} fails verification at line {first.line} ({first.message}); "
                "refusing to append"
            )
        entry = dict(entry_fields)
        entry["timestamp"] = datetime.now(UTC).isoformat(timespec="microseconds")
        entry["prev_hash"] = str(existing[-1]["hash"]) if existing else GENESIS
        shape = _shape_problems({**entry, "hash": GENESIS})
        if shape:
            raise LedgerError(f"ledger entry for round {entry.get('round')!r} refused: {shape[0][1]}")
        try:
            entry["hash"] = entry_hash(entry)
        except (TypeError, ValueError) as err:
            raise LedgerError(f"ledger entry is not JSON-serialisable without NaN/inf: {err}") from err
        new_problems = verify_chain([*existing, entry])
        if new_problems:
            raise LedgerError(
                f"ledger entry for round {entry.get('round')!r} refused: {new_problems[0].message}"
            )
        line = (canonical_json(entry) + "\n").encode("ascii")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise LedgerError(f"short write to ledger {self.path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry


def read_entries(path: Path) -> tuple[list[dict[str, Any]], list[LedgerProblem]]:
    """Parse a ledger file: the entries that are JSON objects, and a problem for each line that is not.

    A missing file is an empty ledger.
    """
    entries, _lines, problems = _read(Path(path))
    return entries, problems


def verify_file(path: Path, *, expected_head: str | None = None) -> list[LedgerProblem]:
    """Every problem of the ledger file at ``path``, with file line numbers."""
    entries, lines, problems = _read(Path(path))
    problems += verify_chain(entries, expected_head=expected_head, line_numbers=lines)
    return sorted(problems, key=lambda p: p.line)


# ---------------------------------------------------------------- pure checks


def verify_chain(
    entries: Sequence[dict[str, Any]],
    *,
    expected_head: str | None = None,
    line_numbers: Sequence[int] | None = None,
) -> list[LedgerProblem]:
    """Every problem found in ``entries`` (empty list = the chain verifies).

    Per entry: required fields and types, unit ``"user"``, Poisson sampling, δ < 1/users,
    ε ≤ cap, the hash. Between entries: ``prev_hash`` links, strictly increasing rounds, the
    same tenant/accountant/δ throughout, ε never decreasing, the cap never raised, nothing
    after an entry with status ``"capped"``. With ``expected_head``, the last hash (or
    :data:`GENESIS` for no entries) must equal it — the only way to detect a truncated tail or a
    wholesale rewrite.
    """
    lines = list(line_numbers) if line_numbers is not None else list(range(1, len(entries) + 1))
    if len(lines) != len(entries):
        raise LedgerError(f"line_numbers has {len(lines)} items for {len(entries)} entries")
    problems: list[LedgerProblem] = []
    prev_hash = GENESIS
    prev: dict[str, Any] | None = None  # the previous well-formed entry
    for line, entry in zip(lines, entries, strict=True):
        if not isinstance(entry, dict):
            problems.append(LedgerProblem(line, None, "not_object", f"entry is not a JSON object: {entry!r}"))
            prev_hash = ""
            continue
        rnd = entry.get("round") if _is_int(entry.get("round")) else None

        def add(kind: str, message: str, line: int = line, rnd: int | None = rnd) -> None:
            problems.append(LedgerProblem(line, rnd, kind, message))

        # The chain links first: they hold whatever the fields say.
        if entry.get("prev_hash") != prev_hash:
            add(
                "prev_hash_mismatch",
                f"prev_hash {entry.get('prev_hash')!r} does not match the previous entry's hash "
                f"{prev_hash!r} (a line was deleted, inserted or reordered)",
            )
        try:
            recomputed = entry_hash(entry)
        except (TypeError, ValueError):
            recomputed = ""
        if entry.get("hash") != recomputed:
            add("hash_mismatch", "hash does not match the entry's content (the entry was edited)")
        link = entry.get("hash")
        prev_hash = link if isinstance(link, str) else ""

        shape = _shape_problems(entry)
        for kind, message in shape:
            add(kind, message)
        if shape:
            continue  # the semantic checks below need well-formed fields

        if entry["unit"] != "user":
            add("wrong_unit", f"unit is {entry['unit']!r}, but the privacy unit must be 'user'")
        if entry["poisson"] is not True:
            add("not_poisson", "poisson is false: the accounting assumes Poisson sampling of users")
        if not entry["delta"] < 1.0 / entry["users"]:
            add(
                "delta_too_large",
                f"delta {entry['delta']!r} is not < 1/users = {1.0 / entry['users']:.6g} "
                f"for {entry['users']} users",
            )
        if entry["epsilon"] > entry["cap"] + CAP_SLACK:
            add("epsilon_over_cap", f"epsilon {entry['epsilon']!r} is above the cap {entry['cap']!r}")
        if prev is not None:
            if entry["round"] <= prev["round"]:
                add("round_order", f"round {entry['round']} does not come after round {prev['round']}")
            for key in ("tenant", "accountant", "delta"):
                if entry[key] != prev[key]:
                    add("inconsistent", f"{key} changed from {prev[key]!r} to {entry[key]!r}")
            if entry["epsilon"] < prev["epsilon"]:
                add(
                    "epsilon_decreasing",
                    f"epsilon went down from {prev['epsilon']!r} to {entry['epsilon']!r}",
                )
            if entry["cap"] > prev["cap"]:
                add("cap_raised", f"cap was raised from {prev['cap']!r} to {entry['cap']!r}")
            if prev.get("status") == "capped":
                add("after_capped", f"an entry follows round {prev['round']}, whose status was 'capped'")
        prev = entry

    if expected_head is not None:
        head = prev_hash if entries else GENESIS
        if head != expected_head:
            last = lines[-1] if lines else 0
            problems.append(
                LedgerProblem(
                    last,
                    None,
                    "head_mismatch",
                    f"the last hash {head!r} is not the expected head {expected_head!r} "
                    "(entries were removed from the end, or the ledger was rewritten)",
                )
            )
    return problems


def recompute_epsilons(entries: Sequence[dict[str, Any]], *, accountant: str | None = None) -> list[float]:
    """Cumulative ε after each entry, from the recorded mechanism alone.

    Entry i contributes the segment ``(noise_multiplier, sample_rate, steps)``; ε after entry i
    composes entries 0..i at that entry's δ, with its recorded accountant unless ``accountant``
    overrides it. Raises :class:`LedgerError` on entries too malformed to account.
    """
    if accountant is not None:
        check_accountant(accountant)
    history: list[tuple[float, float, int]] = []
    out: list[float] = []
    for i, entry in enumerate(entries, start=1):
        try:
            history.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
            kind = check_accountant(accountant if accountant is not None else entry["accountant"])
            out.append(epsilon(history=history, delta=entry["delta"], accountant=kind))
        except (KeyError, TypeError) as err:
            raise LedgerError(f"ledger entry {i} cannot be accounted: missing or bad field {err}") from err
        except BudgetError as err:
            raise LedgerError(f"ledger entry {i} cannot be accounted: {err}") from err
    return out


def max_recompute_error(entries: Sequence[dict[str, Any]], *, accountant: str | None = None) -> float:
    """max |recorded ε − recomputed ε| over the entries (0.0 for none)."""
    recomputed = recompute_epsilons(entries, accountant=accountant)
    errors = [abs(float(e["epsilon"]) - r) for e, r in zip(entries, recomputed, strict=True)]
    return max(errors, default=0.0)


# ---------------------------------------------------------------- internals


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_problems(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """Missing, unknown or ill-typed fields, and values outside their domain."""
    out: list[tuple[str, str]] = []
    for name in [*FIELDS, *CHAIN_FIELDS]:
        if name not in entry:
            out.append(("missing_field", f"field {name!r} is missing"))
    unknown = sorted(set(entry) - set(FIELDS) - set(OPTIONAL_FIELDS) - set(CHAIN_FIELDS))
    if unknown:
        out.append(("unknown_field", f"unknown fields {unknown}"))
    types: dict[str, type | tuple[type, ...]] = {**FIELDS, **OPTIONAL_FIELDS}
    types.update(dict.fromkeys(CHAIN_FIELDS, str))
    for name, expected in types.items():
        if name not in entry:
            continue
        value = entry[name]
        wanted = expected if isinstance(expected, tuple) else (expected,)
        ok = isinstance(value, wanted) and (bool in wanted or not isinstance(value, bool))
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            names = "/".join(t.__name__ for t in wanted)
            out.append(("bad_type", f"field {name!r} must be {names}, got {value!r}"))
    if out:
        return out
    ranges = [
        ("round", entry["round"] >= 0, "≥ 0"),
        ("users", entry["users"] >= 1, "≥ 1"),
        ("sample_rate", 0 < entry["sample_rate"] <= 1, "in (0, 1]"),
        ("noise_multiplier", entry["noise_multiplier"] > 0, "> 0"),
        ("max_grad_norm", entry["max_grad_norm"] > 0, "> 0"),
        ("steps", entry["steps"] >= 0, "≥ 0"),
        ("delta", 0 < entry["delta"] < 1, "in (0, 1)"),
        ("epsilon", entry["epsilon"] >= 0, "≥ 0"),
        ("cap", entry["cap"] > 0, "> 0"),
        ("accountant", entry["accountant"] in ("prv", "rdp"), "'prv' or 'rdp'"),
        ("status", entry.get("status", "ok") in STATUSES, "'ok' or 'capped'"),
    ]
    for name, ok, rule in ranges:
        if not ok:
            out.append(("bad_value", f"field {name!r} must be {rule}, got {entry[name]!r}"))
    return out


def _read(path: Path) -> tuple[list[dict[str, Any]], list[int], list[LedgerProblem]]:
    if not path.exists():
        return [], [], []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"ledger {path} cannot be read: {err}") from err
    entries: list[dict[str, Any]] = []
    lines: list[int] = []
    problems: list[LedgerProblem] = []
    text_lines = raw.split(b"\n")
    if text_lines and text_lines[-1] == b"":
        text_lines.pop()  # the newline that ends the last entry
    for number, line in enumerate(text_lines, start=1):
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(LedgerProblem(number, None, "bad_json", f"line is not valid JSON ({err})"))
            continue
        if not isinstance(value, dict):
            problems.append(
                LedgerProblem(number, None, "not_object", f"line is not a JSON object: {value!r}")
            )
            continue
        entries.append(value)
        lines.append(number)
    return entries, lines, problems

"""A tenant's privacy budget: the composition history it has spent, persisted in its state dir.

The state is one JSON file, ``state_dir/accountant.json``::

    {"version": 1, "tenant": "tenant-0", "accountant": "prv", "delta": 1e-05, "cap": 8.0,
     "history": [[σ, q, steps], ...], "rounds": [1, 2, ...]}

It is rewritten atomically (temp file, fsync, rename, fsync of the folder) before
:meth:`TenantBudget.charge` returns, so a SuperNode that crashes or restarts never forgets a
round it has released an update for. Rules that keep the budget honest:

- a state written for another tenant, accountant or δ is refused, never mixed;
- the cap can only go down: a lower cap passed at construction replaces the stored one, a
  higher one is ignored (the stored, lower cap wins);
- round numbers must strictly increase, so no round is charged twice;
- a charge that would take ε above the cap is refused and nothing is recorded.

ε itself is computed by the pure :mod:`fedrec.privacy.accounting`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedrec.privacy.accounting import Segment, check_accountant, epsilon, validate_history
from fedrec.privacy.errors import BudgetError

STATE_FILE = "accountant.json"
STATE_VERSION = 1
CAP_SLACK = 1e-9  # ε compared with the cap allows this much float noise, no more


class TenantBudget:
    """The persistent ε spent by one tenant, and the gate that keeps it under its cap."""

    def __init__(
        self, state_dir: Path, *, tenant_id: str, cap: float, delta: float, accountant: str = "prv"
    ) -> None:
        if not isinstance(tenant_id, str) or not tenant_id:
            raise BudgetError(f"tenant_id must be a non-empty string, got {tenant_id!r}")
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < cap < math.inf:
            raise BudgetError(f"cap must be a finite ε > 0, got {cap!r}")
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            raise BudgetError(f"delta must be in (0, 1), got {delta!r}")
        self.path = Path(state_dir) / STATE_FILE
        self._state: dict[str, Any] = {
            "version": STATE_VERSION,
            "tenant": tenant_id,
            "accountant": check_accountant(accountant),
            "delta": float(delta),
            "cap": float(cap),
            "history": [],
            "rounds": [],
        }
        if self.path.exists():
            stored = _load(self.path)
            for key in ("tenant", "accountant", "delta"):
                if stored[key] != self._state[key]:
                    raise BudgetError(
                        f"budget state {self.path} was written with {key} {stored[key]!r}, "
                        f"not {self._state[key]!r}; refusing to mix budgets"
                    )
            stored_cap = stored["cap"]
            self._state = stored
            if float(cap) < stored_cap:
                self._state["cap"] = float(cap)
                self._save()
        self._spent = self._epsilon(self.history)

    # ------------------------------------------------------------ read-only views

    @property
    def tenant_id(self) -> str:
        return str(self._state["tenant"])

    @property
    def accountant(self) -> str:
        return str(self._state["accountant"])

    @property
    def delta(self) -> float:
        return float(self._state["delta"])

    @property
    def cap(self) -> float:
        """The cap in force: the lowest one this state has ever been given."""
        return float(self._state["cap"])

    @property
    def history(self) -> list[Segment]:
        """The charged segments ``(σ, q, steps)``, one per charged round, oldest first."""
        return [(float(s), float(q), int(n)) for s, q, n in self._state["history"]]

    @property
    def rounds(self) -> list[int]:
        """The round numbers charged so far, increasing."""
        return [int(r) for r in self._state["rounds"]]

    def state(self) -> dict[str, Any]:
        """A JSON-able copy of the persisted state."""
        copy: dict[str, Any] = json.loads(json.dumps(self._state))
        return copy

    # ------------------------------------------------------------ budget

    def spent(self) -> float:
        """ε spent so far (cumulative over every charged round)."""
        return self._spent

    def remaining(self) -> float:
        """cap − spent, never negative."""
        return max(0.0, self.cap - self._spent)

    def preview(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the tenant would have spent after one more round with these settings (records nothing)."""
        return self._epsilon([*self.history, (noise_multiplier, sample_rate, steps)])

    def can_train(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        """Whether one more round with these settings stays within the cap."""
        eps = self.preview(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return eps <= self.cap + CAP_SLACK

    def charge(self, *, round: int, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record one trained round and persist it; returns the new cumulative ε.

        Call it *before* releasing the round's update. Raises :class:`BudgetError` (and records
        nothing) if the round number is not after every charged one, or if the round would take
        ε above the cap.
        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise BudgetError(f"round must be an integer ≥ 0, got {round!r}")
        rounds = self.rounds
        if round in rounds:
            raise BudgetError(f"round {round} is already charged to tenant {self.tenant_id!r}")
        if rounds and round < rounds[-1]:
            raise BudgetError(
                f"round {round} comes before the last charged round {rounds[-1]} of tenant {self.tenant_id!r}"
            )
        (segment,) = validate_history([(noise_multiplier, sample_rate, steps)])
        eps = self._epsilon([*self.history, segment])
        if eps > self.cap + CAP_SLACK:
            raise BudgetError(
                f"round {round} would take tenant {self.tenant_id!r} to ε = {eps:.4f}, above its cap "
                f"{self.cap:g} (spent so far {self._spent:.4f})"
            )
        self._state["history"].append(list(segment))
        self._state["rounds"].append(round)
        try:
            self._save()
        except OSError as err:  # keep memory and disk in agreement
            self._state["history"].pop()
            self._state["rounds"].pop()
            raise BudgetError(f"cannot persist budget state {self.path}: {err}") from err
        self._spent = eps
        return eps

    # ------------------------------------------------------------ internals

    def _epsilon(self, history: list[Segment]) -> float:
        return epsilon(history=history, delta=self.delta, accountant=check_accountant(self.accountant))

    def _save(self) -> None:
        _atomic_write_json(self.path, self._state)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load(path: Path) -> dict[str, Any]:
    """Read and validate a stored budget state; any damage is a :class:`BudgetError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BudgetError(f"budget state {path} cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise BudgetError(f"budget state {path} is not a JSON object")
    expected = {"version", "tenant", "accountant", "delta", "cap", "history", "rounds"}
    if set(data) != expected:
        raise BudgetError(f"budget state {path} has fields {sorted(data)}, expected {sorted(expected)}")
    if data["version"] != STATE_VERSION:
        raise BudgetError(f"budget state {path} has version {data['version']!r}, expected {STATE_VERSION}")
    cap = data["cap"]
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < cap < math.inf:
        raise BudgetError(f"budget state {path} has an invalid cap {cap!r}")
    history, rounds = data["history"], data["rounds"]
    if not isinstance(history, list) or not isinstance(rounds, list) or len(history) != len(rounds):
        raise BudgetError(f"budget state {path} must hold one history segment per charged round")
    try:
        validate_history(history)
    except BudgetError as err:
        raise BudgetError(f"budget state {path} is damaged: {err}") from err
    if any(isinstance(r, bool) or not isinstance(r, int) for r in rounds) or rounds != sorted(set(rounds)):
        raise BudgetError(f"budget state {path} has round numbers that are not strictly increasing integers")
    data["cap"] = float(cap)
    return data

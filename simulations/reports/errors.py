"""The reports' error: its own module so that the run audit and the empirical release audit can both raise
it without importing each other (no import circle, tests/test_layout.py)."""

from __future__ import annotations

from fedrec.shared_model.errors import FedrecError


class AuditError(FedrecError):
    """A RUN_DIR that cannot be audited (missing, not a run, corrupt files)."""

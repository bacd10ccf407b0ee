"""Errors of the privacy package (kept apart: ``privacy`` imports nothing else of ours).

The CLI treats every :class:`PrivacyError` as a user-facing, one-line error.
"""


class PrivacyError(Exception):
    """A privacy-layer problem the user must act on; the message is one complete sentence."""


class VaultError(PrivacyError):
    """A tenant folder or key cannot be read, authenticated or decrypted."""


class BudgetError(PrivacyError):
    """A DP configuration that cannot be honoured (cap ≤ 0, δ too large, nothing to sample…)."""


class LedgerError(PrivacyError):
    """A budget ledger that is malformed or fails verification."""

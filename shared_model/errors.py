"""User-facing errors of fedrec.

Anything raised as a :class:`FedrecError` is a problem with the user's input or environment: the CLI
prints its message as one line on stderr and exits non-zero, without a traceback. Every other
exception is a bug and keeps its traceback.
"""


class FedrecError(Exception):
    """A user error: the message is one complete sentence that says what to fix."""

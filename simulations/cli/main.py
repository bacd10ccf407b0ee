"""The ``fedrec`` command (CONTRACT.md): assembles the command modules and maps user errors.

User errors (``FedrecError``, ``PrivacyError``) print one line on stderr and exit 2, without a
traceback; anything else is a bug and keeps its traceback. Heavy imports (torch, flwr) happen inside
the commands so ``--help`` stays instant. Each command group lives in its own module with a
``register(app)``; none of them imports this one.
"""

from __future__ import annotations

import sys

import typer

from fedrec.privacy.errors import PrivacyError
from fedrec.server import cli_serve
from fedrec.shared_model.errors import FedrecError
from fedrec.simulations.cli import audit, bench, data, deploy, frontier, prepare, recommend, run
from fedrec.simulations.cli.common import err_console

app = typer.Typer(
    name="fedrec",
    help="Privacy-preserving federated recommender: Flower + Opacus user-level DP, encrypted tenant data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (data, run, prepare, recommend, cli_serve, audit, bench, frontier, deploy):
    module.register(app)


def main() -> None:
    """Console entry point: user errors → one line on stderr, exit 2."""
    try:
        app()
    except (FedrecError, PrivacyError) as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()

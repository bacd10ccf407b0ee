"""``fedrec audit`` (CONTRACT.md), attached to the app by :func:`register`.

* ``fedrec audit RUN_DIR [--empirical] [--out REPORT_DIR]`` — every check on every tenant, ε replayed
  with four accountants, optionally the canary attack; writes audit.json/md/html.
* ``fedrec audit --ledger PATH [--head HASH] [--plan dp_plan.json]`` — a tenant verifies its own
  ledger locally (no coordinator files needed).

Exit status: 0 when every check passes, 1 when any fails (each failed check is named), 2 for bad
input (one line, via ``fedrec.simulations.cli.main.main``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedrec.shared_model.errors import FedrecError

if TYPE_CHECKING:
    from fedrec.privacy.audit import Check

out_console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the ``fedrec`` app."""
    app.command("audit")(audit)


def audit(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="RUN_DIR written by `fedrec simulate` (privacy.json, rounds.jsonl, ledger/)."),
    ] = None,
    empirical: Annotated[
        bool, typer.Option("--empirical", help="Also attack a replica with canaries for an ε lower bound.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: RUN_DIR/audit).")] = None,
    canaries: Annotated[
        int,
        typer.Option(
            "--canaries",
            min=0,
            help="DP-SGD runs: data canaries per replica (0: only the gradient canaries).",
        ),
    ] = 250,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Independent replicas, pooled.")] = 4,
    canary_items: Annotated[
        int, typer.Option("--canary-items", min=2, help="Distinctive items per canary.")
    ] = 16,
    confidence: Annotated[float, typer.Option("--confidence", help="Confidence of the lower bound.")] = 0.95,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Tenant whose mechanism the replica uses (default: first).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the canary experiment.")] = 0,
    trials: Annotated[
        int,
        typer.Option("--trials", help="Release runs: trials of the release function (half with the canary)."),
    ] = 2000,
    release_users: Annotated[
        int | None,
        typer.Option("--release-users", help="Release runs: replica users (default: the tenant's count)."),
    ] = None,
    release_items: Annotated[
        int | None,
        typer.Option("--release-items", help="Release runs: replica items (default: the catalogue, ≤ 300)."),
    ] = None,
    release_canary_items: Annotated[
        int | None,
        typer.Option("--release-canary-items", help="Release runs: the canary's items (default: ≤ 100)."),
    ] = None,
    release_mechanism: Annotated[
        str | None,
        typer.Option(
            "--release-mechanism",
            help="Release runs: MODULE:FUNCTION audited instead of fedrec.client.task:release_message "
            "(same signature); the hook the mutation tests use to plant broken releases.",
        ),
    ] = None,
    dpsgd_canaries: Annotated[
        int,
        typer.Option(
            "--dpsgd-canaries",
            min=0,
            help="DP-SGD runs: white-box Dirac gradient canaries through the real Opacus optimizer, one run "
            "(0: off).",
        ),
    ] = 2000,
    dpsgd_real_users: Annotated[
        int,
        typer.Option("--dpsgd-real-users", min=1, help="DP-SGD runs: synthetic users beside the canaries."),
    ] = 100,
    dpsgd_canary_norm: Annotated[
        float,
        typer.Option("--dpsgd-canary-norm", help="DP-SGD runs: a canary's raw gradient norm, in units of C."),
    ] = 10.0,
    dpsgd_trainer: Annotated[
        str | None,
        typer.Option(
            "--dpsgd-trainer",
            help="DP-SGD runs: MODULE:FUNCTION audited instead of fedrec.client.train:make_private_trainer "
            "(same signature); the hook the mutation tests use to plant a broken DP-SGD.",
        ),
    ] = None,
    ledger: Annotated[
        Path | None,
        typer.Option("--ledger", help="Verify one tenant's own ledger.jsonl instead of a RUN_DIR."),
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", help="With --ledger: the head hash the ledger must end at.")
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(
            "--plan", help="With --ledger: the tenant's dp_plan.json (default: next to the ledger)."
        ),
    ] = None,
) -> None:
    """Verify privacy budgets: ledgers, recorded heads, caps, ε recomputed; optionally a canary attack."""
    if ledger is not None:
        if run_dir is not None:
            raise FedrecError("give either RUN_DIR or --ledger PATH, not both")
        _audit_ledger(ledger, head, plan)
        return
    if run_dir is None:
        raise FedrecError("give a RUN_DIR to audit (or --ledger PATH for one tenant's ledger)")
    if head is not None or plan is not None:
        raise FedrecError("--head and --plan go with --ledger")
    from fedrec.simulations.reports.audit import EmpiricalConfig
    from fedrec.simulations.reports.audit_report import audit as run_audit
    from fedrec.simulations.reports.dpsgd_audit import GradientAuditConfig, load_trainer
    from fedrec.simulations.reports.release_audit import ReleaseAuditConfig

    rel_cfg = ReleaseAuditConfig(
        trials=trials,
        users=release_users,
        items=release_items,
        canary_items=release_canary_items,
        mechanism=release_mechanism,
        confidence=confidence,
        seed=seed,
    )

    grad_cfg = None
    if empirical and dpsgd_canaries:
        grad_cfg = GradientAuditConfig(
            canaries=dpsgd_canaries,
            real_users=dpsgd_real_users,
            canary_norm=dpsgd_canary_norm,
            trainer=dpsgd_trainer,
            confidence=confidence,
            seed=seed,
        )
        load_trainer(dpsgd_trainer)  # a bad --dpsgd-trainer fails before any work
    emp = (
        EmpiricalConfig(
            canaries=canaries,
            runs=runs,
            canary_items=canary_items,
            confidence=confidence,
            tenant=tenant,
            seed=seed,
        )
        if empirical
        else None
    )
    with err_console.status("auditing …") as status:

        def log(line: str) -> None:
            status.update(line)
            err_console.print(f"[dim]{line}[/dim]", highlight=False)

        outcome = run_audit(run_dir, out=out, empirical=emp, release=rel_cfg, gradient=grad_cfg, log=log)
    _print_checks(
        [
            *outcome.checks.all_checks(),
            *(outcome.release.checks() if outcome.release else []),
            *(outcome.gradient.checks() if outcome.gradient else []),
        ]
    )
    privacy = _privacy_json(run_dir)
    out_console.print(
        f"adjacency: {privacy.get('adjacency') or 'not recorded (run predates it: counts, loss and evaluation '}"
        f"{'' if privacy.get('adjacency') else 'sums were sent exactly, NOT covered)'}; "
        f"evaluation: {privacy.get('evaluation', 'exact, NOT covered by ε')}",
        highlight=False,
        soft_wrap=True,
    )
    t = Table(title="ε per tenant")
    for col in ("tenant", "cap", "recorded", "replayed", "max |Δ|", "PRV", "PLD", "RDP", "RDP (dp_acc.)"):
        t.add_column(col, justify="left" if col == "tenant" else "right")
    for name, a in outcome.checks.tenants.items():
        r = a.replay
        if r is None or not r.recorded:
            t.add_row(name, _f(a.cap), "—", "—", "—", "—", "—", "—", "—")
            continue
        f = r.final
        t.add_row(
            name,
            _f(a.cap),
            _f(r.recorded[-1]),
            _f(r.replayed[-1]),
            f"{r.max_error:.1e}",
            *(_f(f.get(k)) for k in ("opacus_prv", "dp_accounting_pld", "opacus_rdp", "dp_accounting_rdp")),
        )
    out_console.print(t)
    e = outcome.empirical
    if e is not None:
        claim = "no DP claimed" if e.claimed_epsilon is None else f"claimed ε {e.claimed_epsilon:.3f}"
        out_console.print(
            f"empirical ({e.tenant}, {e.one_run.m} canaries): ε ≥ {e.epsilon_lb:.3f} at "
            f"{e.one_run.confidence:.0%} confidence ({e.one_run.correct}/{e.one_run.guesses} guesses right); "
            f"{claim} ({e.seconds:.1f} s)",
            highlight=False,
        )
    rel = outcome.release
    if rel is not None:
        out_console.print(rel.verdict(), highlight=False, soft_wrap=True)
    if outcome.gradient is not None:
        out_console.print(outcome.gradient.verdict(), highlight=False, soft_wrap=True)
    out_console.print(
        f"report: {outcome.report_dir / 'audit.html'} ({outcome.seconds:.1f} s)", highlight=False
    )
    _exit(outcome.failed())


def _audit_ledger(path: Path, head: str | None, plan_path: Path | None) -> None:
    from fedrec.privacy.audit import audit_ledger_file, plan_from_file
    from fedrec.privacy.ledger import read_entries

    path = Path(path)
    if not path.is_file():
        raise FedrecError(f"ledger {path} does not exist")
    plan_file = plan_path if plan_path is not None else path.parent / "dp_plan.json"
    plan = plan_from_file(plan_file) if plan_path is not None or plan_file.is_file() else None
    with err_console.status("verifying the ledger and replaying ε …"):
        checks, replay = audit_ledger_file(path, expected_head=head, plan=plan)
    _print_checks(checks)
    if replay is not None and replay.recorded:
        f = replay.final
        relations = sorted({str(e.get("relation", "not recorded")) for e in read_entries(path)[0]})
        out_console.print(f"adjacency: {', '.join(relations)}", highlight=False)
        out_console.print(
            f"ε recorded {replay.recorded[-1]:.6g}, replayed {replay.replayed[-1]:.6g} "
            f"(max |Δ| {replay.max_error:.1e}); PRV {_f(f.get('opacus_prv'))}, PLD "
            f"{_f(f.get('dp_accounting_pld'))}, RDP {_f(f.get('opacus_rdp'))}"
            + ("" if plan else "; no dp_plan.json: steps not checked against a plan")
            + ("" if head else "; no --head: a truncated tail or a rewrite cannot be seen"),
            highlight=False,
        )
    _exit([c for c in checks if not c.passed])


def _privacy_json(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(run_dir) / "privacy.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _print_checks(checks: list[Check]) -> None:
    t = Table(title="checks")
    for col in ("check", "tenant", "result", "detail"):
        t.add_column(col)
    for c in checks:
        if c.passed:
            t.add_row(c.name, c.tenant or "run", "[green]PASS[/green]", c.note)
        for f in c.findings:
            t.add_row(c.name, c.tenant or "run", "[red]FAIL[/red]", f"{f.where()}: {f.message}")
    out_console.print(t)


def _exit(failed: list[Check]) -> None:
    if failed:
        names = sorted({f"{c.name} ({c.tenant or 'run'})" for c in failed})
        err_console.print(f"[red]audit FAILED[/red]: {', '.join(names)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out_console.print("[green]audit passed[/green]: every check holds")


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"

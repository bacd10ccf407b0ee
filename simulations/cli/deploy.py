"""``fedrec deploy …``: on-premise deployment helpers, attached to the app by :func:`register`.

Operator: ``init`` (CA, SuperLink certificate, connection, optional partner keys, scripts),
``add-partner`` (a partner's public key), ``commands`` (print every command), ``launch`` (write the
run config, ``flwr run``, optionally wait), ``wait`` (poll a run with a timeout).
Partner: ``partner`` (own key pair, CA copy, ``supernode.sh``).
The work lives in :mod:`fedrec.simulations.deploy.kit`; docs/DEPLOY.md is the runbook.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedrec.shared_model.errors import FedrecError

out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

deploy_app = typer.Typer(
    help="On-premise deployment: certificates, SuperNode keys, SuperLink/SuperNode commands, runs.",
    no_args_is_help=True,
)

DeployDirArg = Annotated[
    Path, typer.Argument(help="The operator's deployment folder (made by `deploy init`).")
]


def register(app: typer.Typer) -> None:
    """Add ``deploy`` to the ``fedrec`` app (once, however often it is called)."""
    if all(group.name != "deploy" for group in app.registered_groups):
        app.add_typer(deploy_app, name="deploy")


def _print_cmd(title: str, env: dict[str, str], cmd: list[str]) -> None:
    from fedrec.simulations.deploy.kit import env_lines

    out_console.print(f"[bold]# {title}[/bold]")
    for line in env_lines(env):
        out_console.print(line, soft_wrap=True, markup=False)
    out_console.print(shlex.join(cmd), soft_wrap=True, markup=False)
    out_console.print()


@deploy_app.command("init")
def init(
    deploy_dir: DeployDirArg,
    address: Annotated[
        str, typer.Option("--address", help="host:port partners use to reach the SuperLink (a SAN too).")
    ],
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Extra SuperLink certificate name: DNS name or IP (repeat)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Interface the SuperLink binds.")] = "0.0.0.0",
    port: Annotated[
        int | None, typer.Option("--port", help="SuperLink port (default: the one in --address).")
    ] = None,
    partner: Annotated[
        list[str] | None,
        typer.Option("--partner", help="Make an auth key pair here for this partner (repeat)."),
    ] = None,
    app_dir: Annotated[
        Path | None, typer.Option("--app-dir", help="The fedrec checkout `flwr run` packages (default: .).")
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity of the SuperLink certificate.")] = 365,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing deployment's files.")
    ] = False,
) -> None:
    """Operator: create the CA, the SuperLink certificate, the Flower connection and the scripts."""
    from fedrec.simulations.deploy.kit import Deployment, init_deployment

    s = init_deployment(
        deploy_dir,
        address=address,
        sans=san or [],
        host=host,
        port=port,
        partners=partner or [],
        app_dir=app_dir,
        days=days,
        overwrite=overwrite,
    )
    dep = Deployment(deploy_dir.absolute())
    out_console.print(f"deployment in {dep.root}: SuperLink {s.address} (binds {s.host}:{s.port})")
    out_console.print(f"  certificate names: {', '.join(s.sans)}")
    out_console.print(f"  CA certificate for partners: {dep.ca_cert}")
    out_console.print(f"  CA private key (keep offline): {dep.ca_key}")
    for p in s.partners:
        out_console.print(
            f"  {p}: hand over {dep.root / 'partners' / p / 'auth.key'} securely, then delete it"
        )
    out_console.print(f"next: {dep.scripts / 'superlink.sh'}, then {dep.scripts / 'register.sh'}")


@deploy_app.command("add-partner")
def add_partner_cmd(
    deploy_dir: DeployDirArg,
    name: Annotated[str, typer.Argument(help="Partner name (e.g. its tenant id).")],
    public_key: Annotated[Path, typer.Argument(help="The partner's auth.key.pub (OpenSSH, ECDSA P-384).")],
) -> None:
    """Operator: store a partner's public key and add it to scripts/register.sh."""
    from fedrec.simulations.deploy.kit import Deployment, add_partner, key_fingerprint

    dep = Deployment(deploy_dir.absolute())
    add_partner(dep, name, public_key)
    fp = key_fingerprint(dep.partner_pub(name).read_bytes())
    out_console.print(
        f"{name}: {fp} (compare with the partner's); register it with {dep.scripts / 'register.sh'}"
    )


@deploy_app.command("partner")
def partner_cmd(
    partner_dir: Annotated[Path, typer.Argument(help="This partner's SuperNode folder (created).")],
    name: Annotated[str, typer.Option("--name", help="Partner name (e.g. its tenant id).")],
    superlink: Annotated[str, typer.Option("--superlink", help="host:port of the operator's SuperLink.")],
    ca: Annotated[Path, typer.Option("--ca", help="The operator's CA certificate (ca.pem).")],
    tenant_dir: Annotated[
        Path, typer.Option("--tenant-dir", help="The tenant folder from `fedrec prepare`.")
    ],
    key_file: Annotated[Path, typer.Option("--key-file", help="The tenant's data key.")],
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Where the budget and ledger persist (survives restarts).")
    ],
    node_port: Annotated[
        int, typer.Option("--node-port", help="The SuperNode's local Runtime API port (distinct per host).")
    ] = 9094,
    new_key: Annotated[
        bool, typer.Option("--new-key", help="Rotate: retire the current auth key pair and make a new one.")
    ] = False,
) -> None:
    """Partner: make the SuperNode's auth key pair (kept on this machine) and supernode.sh."""
    from fedrec.simulations.deploy.kit import init_partner, key_fingerprint

    root = partner_dir.absolute()
    init_partner(
        root,
        name=name,
        superlink=superlink,
        ca_cert=ca,
        tenant_dir=tenant_dir.absolute(),
        key_file=key_file.absolute(),
        state_dir=state_dir.absolute(),
        node_port=node_port,
        new_key=new_key,
    )
    pub = root / "auth.key.pub"
    out_console.print(f"send {pub} to the operator ({key_fingerprint(pub.read_bytes())}); never auth.key")
    out_console.print(
        f"start: {root / 'supernode.sh'}   ledger: {state_dir.absolute()}/<run-name>/ledger.jsonl"
    )


@deploy_app.command("commands")
def commands(deploy_dir: DeployDirArg) -> None:
    """Operator: print every command of the deployment (the same as scripts/*.sh)."""
    from fedrec.simulations.deploy.kit import Deployment, ls_command, register_command, superlink_command

    dep = Deployment(deploy_dir.absolute())
    s = dep.settings()
    env = dep.env(s.flower_bin)
    _print_cmd(
        "1. start the SuperLink (keep running; stop with SIGTERM to its PID)", env, superlink_command(dep, s)
    )
    for p in s.partners:
        _print_cmd(f"2. register {p}'s SuperNode key (once)", env, register_command(dep, s, p))
    out_console.print(
        "[bold]# 3. each partner: PARTNER_DIR/supernode.sh (from `fedrec deploy partner`)[/bold]\n"
    )
    out_console.print("[bold]# 4. launch a run and wait for it[/bold]")
    out_console.print(
        f"fedrec deploy launch {shlex.quote(str(dep.root))} --run-dir /abs/RUN_DIR "
        "--catalog /abs/catalog.json --rounds 5 --max-users N --wait --timeout 3600",
        soft_wrap=True,
        markup=False,
    )
    out_console.print()
    _print_cmd("5. status of a run (RUN_ID from step 4)", env, [*ls_command(s), "--run-id", "RUN_ID"])


@deploy_app.command("launch")
def launch(
    deploy_dir: DeployDirArg,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Absolute RUN_DIR on the coordinator host.")],
    catalog: Annotated[
        Path, typer.Option("--catalog", help="Absolute path of the public catalog.json on the coordinator.")
    ],
    max_users: Annotated[
        int, typer.Option("--max-users", help="Upper bound on the largest partner's user count (SecAgg+).")
    ],
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 3,
    tenants: Annotated[
        int | None, typer.Option("--tenants", help="Partners the run waits for (default: all registered).")
    ] = None,
    run_name: Annotated[
        str, typer.Option("--run-name", help="Names each partner's state dir for this run (budget, ledger).")
    ] = "run",
    epsilon: Annotated[float, typer.Option("--epsilon", help="Each partner's ε cap for the run.")] = 8.0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any other run-config key=VALUE (repeat).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the run finishes (exit 1 unless completed).")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds --wait waits at most.")] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write and print the run config only.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue RUN_DIR after its last checkpointed round (same --run-name; e.g. after the "
            "SuperLink died mid-run). Partners never pay twice for a round they were charged.",
        ),
    ] = False,
) -> None:
    """Operator: write the run config (DP + SecAgg+ on) and start the run with `flwr run`."""
    from fedrec.simulations.deploy.kit import (
        Deployment,
        deployment_run_config,
        launch_run,
        parse_set,
        resume_point,
        run_command,
        run_config_toml,
        wait_for_run,
    )

    dep = Deployment(deploy_dir.absolute())
    s = dep.settings()
    extra = {"epsilon": epsilon, **parse_set(set_ or [])}
    if resume:
        done = resume_point(run_dir, run_name, rounds)
        extra["resume"] = True
        err_console.print(f"resuming {run_dir} after round {done} of {rounds}")
    config = deployment_run_config(
        run_dir=run_dir,
        catalog=catalog,
        tenants=tenants if tenants is not None else len(s.partners),
        rounds=rounds,
        run_name=run_name,
        max_weight=max_users,
        extra=extra,
    )
    path = dep.root / "runs" / f"{run_name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_config_toml(config), encoding="utf-8")
    if dry_run:
        out_console.print(path.read_text(encoding="utf-8"), markup=False)
        out_console.print(shlex.join(run_command(dep, s, path)), soft_wrap=True, markup=False)
        return
    with err_console.status("submitting the run …"):
        run_id = launch_run(dep, path)
    out_console.print(f"run {run_id} submitted (config {path}); RUN_DIR {run_dir}")
    if wait:
        status = wait_for_run(dep, run_id, timeout, log=lambda line: err_console.print(f"[dim]{line}[/dim]"))
        out_console.print(f"run {run_id}: {status}")
        if status != "finished:completed":
            raise typer.Exit(1)


@deploy_app.command("wait")
def wait_cmd(
    deploy_dir: DeployDirArg,
    run_id: Annotated[int, typer.Argument(help="The run id `deploy launch` printed.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait at most.")] = 3600.0,
) -> None:
    """Operator: wait for a run to finish; exit 0 only for finished:completed."""
    from fedrec.simulations.deploy.kit import Deployment, wait_for_run

    status = wait_for_run(
        Deployment(deploy_dir.absolute()),
        run_id,
        timeout,
        log=lambda line: err_console.print(f"[dim]{line}[/dim]"),
    )
    out_console.print(f"run {run_id}: {status}")
    if status != "finished:completed":
        raise typer.Exit(1)


__all__ = ["register"]
_ = FedrecError  # user errors propagate to fedrec.simulations.cli.main.main (one line, exit 2)

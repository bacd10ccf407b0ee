"""``fedrec prepare`` and ``fedrec rotate-key`` (CONTRACT.md), attached to the app by :func:`register`.

One module per command group (``fedrec.simulations.cli.main`` calls ``register(app)``); imports of the
heavy modules happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedrec.simulations.cli.common import (
    SynthAlphaOpt,
    SynthNoiseOpt,
    SynthPerUserOpt,
    SynthProfileOpt,
    SynthRankOpt,
    synth_spec,
)

if TYPE_CHECKING:
    from fedrec.simulations.data.prepare import PrepareResult

out_console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``prepare`` and ``rotate-key`` to the ``fedrec`` app."""
    app.command("prepare")(prepare)
    app.command("rotate-key")(rotate_key)


def prepare(
    out: Annotated[
        Path, typer.Option("--out", help="FED_DIR to write (atomically; must not exist or be empty).")
    ],
    tenants: Annotated[
        int, typer.Option("--tenants", min=1, help="Number of tenants N (tenant-0 … tenant-N-1).")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="'synthetic' (default), a MovieLens folder/file (100K, 1M/10M, latest) or a .csv/.parquet.",
        ),
    ] = "synthetic",
    partition: Annotated[
        str,
        typer.Option("--partition", help="iid | dirichlet:A (non-IID by taste) | by:FIELD (age_band, …)."),
    ] = "iid",
    k_anonymity: Annotated[
        int,
        typer.Option("--k-anonymity", min=1, help="Each published quasi-identifier combination ≥ K users."),
    ] = 5,
    max_suppression: Annotated[
        float,
        typer.Option(
            "--max-suppression", min=0.0, max=1.0, help="Share of a tenant's users that may be suppressed."
        ),
    ] = 0.05,
    size_skew: Annotated[
        float, typer.Option("--size-skew", min=0.0, help="Tenant i gets a share ∝ 1/(i+1)^S of the users.")
    ] = 0.0,
    min_users: Annotated[
        int, typer.Option("--min-users", min=1, help="Refuse a partition leaving a tenant with fewer users.")
    ] = 10,
    keys_dir: Annotated[
        Path | None, typer.Option("--keys-dir", help="Where tenant keys go (default FED_DIR/keys).")
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns", help="For generic CSV/Parquet: user=COL,item=COL[,rating=COL][,timestamp=COL]."
        ),
    ] = None,
    test: Annotated[
        str | None,
        typer.Option("--test", help="Given split: the TEST file for --data TRAIN (test sets go with users)."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the synthetic generator and the partition.")
    ] = 0,
    min_rating: Annotated[
        float | None, typer.Option("--min-rating", help="Keep only interactions rated at least this.")
    ] = None,
    synth_users: Annotated[
        int | None, typer.Option("--synth-users", help="Users of --data synthetic.")
    ] = None,
    synth_items: Annotated[
        int | None, typer.Option("--synth-items", help="Items of --data synthetic.")
    ] = None,
    synth_profile: SynthProfileOpt = "movielens",
    synth_per_user: SynthPerUserOpt = None,
    synth_rank: SynthRankOpt = None,
    synth_noise: SynthNoiseOpt = None,
    synth_alpha: SynthAlphaOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an earlier FED_DIR (keys in an outside --keys-dir move to retired/)."
        ),
    ] = False,
) -> None:
    """Partition a dataset into tenants, anonymize each and encrypt each at rest (one key per tenant)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrec.simulations.cli.common import load_prepared
    from fedrec.simulations.data.prepare import (
        PrepareConfig,
        check_fed_out,
        parse_partition,
        plan_federation,
        prepare_federation,
    )

    parse_partition(partition)  # fail on a typo before loading anything
    check_fed_out(out, overwrite=overwrite)
    prepared = load_prepared(
        data,
        columns,
        seed,
        min_rating,
        synth_users,
        synth_items,
        test,
        synth=synth_spec(synth_profile, synth_per_user, synth_rank, synth_noise, synth_alpha),
    )
    cfg = PrepareConfig(
        tenants=tenants,
        partition=partition,
        k_anonymity=k_anonymity,
        max_suppression=max_suppression,
        size_skew=size_skew,
        min_users=min_users,
        seed=seed,
    )
    with err_console.status("partitioning and anonymizing …"):
        plan = plan_federation(prepared, cfg)  # refuses a bad partition before anything is written
    with Progress(
        TextColumn("[bold]encrypting tenants"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        task = progress.add_task("tenants", total=tenants, info="")

        def on_tenant(tenant_id: str) -> None:
            progress.update(task, advance=1, info=tenant_id)

        result = prepare_federation(
            prepared, out, cfg, keys_dir=keys_dir, overwrite=overwrite, on_tenant=on_tenant, plan=plan
        )
    print_summary(result)


def print_summary(result: PrepareResult) -> None:
    """The partition summary and anonymization report of every tenant, as a table."""
    plan = result.plan
    table = Table(title=f"federation {result.fed_dir} — partition {plan.spec}")
    for col in (
        "tenant",
        "users",
        "train",
        "with test",
        "k",
        "suppressed",
        "unique",
        "top genres",
    ):
        table.add_column(col, justify="left" if col in ("tenant", "top genres") else "right")
    for t in plan.tenants:
        r = t.report
        genres = ", ".join(f"{g['genre']} {100 * g['share']:.0f}%" for g in t.summary["top_genres"])
        table.add_row(
            t.tenant_id,
            str(t.summary["users"]),
            str(t.summary["train_interactions"]),
            str(t.summary["users_with_test"]),
            str(r.k_reached),
            f"{100 * r.suppressed_fraction:.1f}%",
            f"{100 * r.unique_before:.0f}%→{100 * r.unique_after:.0f}%",
            genres,
        )
    out_console.print(table)
    out_console.print(
        f"{len(plan.tenants)} tenants in {result.fed_dir}, keys in {result.keys_dir} ({result.seconds:.1f} s)"
    )


def rotate_key(
    fed_dir: Annotated[Path, typer.Argument(help="Federation folder made by `fedrec prepare`.")],
    tenant: Annotated[
        list[str] | None, typer.Option("--tenant", help="Tenant id to rotate (repeatable; default: all).")
    ] = None,
    keys_dir: Annotated[
        Path | None, typer.Option("--keys-dir", help="Where tenant keys are (default FED_DIR/keys).")
    ] = None,
) -> None:
    """Re-encrypt tenants' partitions under fresh keys; old keys move to KEYS_DIR/retired/."""
    from fedrec.simulations.data.prepare import federation_tenants, rotate_tenant_key
    from fedrec.simulations.errors import DataError

    known = federation_tenants(fed_dir)
    chosen = tenant or known
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise DataError(f"{fed_dir} has no tenant {unknown[0]!r} (tenants: {', '.join(known)})")
    for tenant_id in chosen:
        new, retired = rotate_tenant_key(fed_dir, tenant_id, keys_dir=keys_dir)
        where = f"; old key moved to {retired}" if retired is not None else ""
        out_console.print(f"{tenant_id}: re-encrypted with key {new.key_id}{where}")

"""``fedrec data``: write the built-in synthetic set, or fetch a MovieLens set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedrec.simulations.cli.common import (
    SeedOpt,
    SynthAlphaOpt,
    SynthNoiseOpt,
    SynthPerUserOpt,
    SynthProfileOpt,
    SynthRankOpt,
    err_console,
    out_console,
    synth_spec,
)

data_app = typer.Typer(help="Make or fetch datasets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must not exist or be empty).")],
    users: Annotated[int, typer.Option("--users", min=1, help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option("--items", min=2, help="Number of items.")] = 1000,
    seed: SeedOpt = 0,
    profile: SynthProfileOpt = "movielens",
    per_user: SynthPerUserOpt = None,
    rank: SynthRankOpt = None,
    noise: SynthNoiseOpt = None,
    alpha: SynthAlphaOpt = None,
) -> None:
    """Write the built-in synthetic dataset (MovieLens 'latest' CSV layout, + users.csv for movielens)."""
    from fedrec.simulations.data.sources import synthetic, write_synthetic

    spec = synth_spec(profile, per_user, rank, noise, alpha)
    with err_console.status("generating …"):
        ds = synthetic(users=users, items=items, seed=seed, spec=spec)
        paths = write_synthetic(ds, out)
    out_console.print(f"wrote {len(ds.interactions)} interactions to {', '.join(str(p) for p in paths)}")


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="ml-100k | ml-1m | ml-latest-small")],
    out: Annotated[Path, typer.Option("--out", help="Folder to extract into.")],
) -> None:
    """Fetch a MovieLens dataset from GroupLens (needs internet; the project never ships the files)."""
    from fedrec.simulations.data.sources import download

    with err_console.status(f"downloading {name} …"):
        path = download(name, out)
    out_console.print(f"{name} is in {path}")

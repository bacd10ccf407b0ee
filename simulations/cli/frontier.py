"""``fedrec frontier``: regenerate the privacy–utility frontier (PNG, CSV, Markdown)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedrec.shared_model.errors import FedrecError

err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``frontier`` to the ``fedrec`` app."""
    app.command("frontier")(frontier)


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FedrecError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise FedrecError(f"{name} must list integers ≥ 1, got {text!r}")
    return values


def _epsilons(text: str) -> tuple[float, ...]:
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        try:
            v = math.inf if p in ("inf", "∞") else float(p)
        except ValueError:
            raise FedrecError(f"--epsilons must be numbers or 'inf', got {part!r}") from None
        if not v > 0 or math.isnan(v):
            raise FedrecError(f"--epsilons must be > 0, got {part!r}")
        out.append(v)
    if not out:
        raise FedrecError("--epsilons is empty")
    return tuple(out)


def frontier(
    out: Annotated[Path, typer.Option("--out", help="Folder for frontier.png/.csv/.md (created).")],
    users: Annotated[
        str, typer.Option("--users", help="Total synthetic users per data set, comma-separated.")
    ] = "1000,10000,100000",
    epsilons: Annotated[
        str, typer.Option("--epsilons", help="ε values, comma-separated ('inf' = no noise).")
    ] = ("1,2,4,8,inf"),
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Seeds per point (the median is reported).")
    ] = 3,
    tenants: Annotated[int, typer.Option("--tenants", min=1, help="Tenants (iid partition).")] = 5,
    items: Annotated[int, typer.Option("--items", min=10, help="Synthetic catalogue size.")] = 1000,
    eval_users: Annotated[
        int, typer.Option("--eval-users", min=100, help="Test users evaluated per run (a fixed sample).")
    ] = 5000,
    include_ml100k: Annotated[
        Path | None,
        typer.Option("--include-ml100k", help="Also the MovieLens-100K folder at PATH (read in place)."),
    ] = None,
    delta: Annotated[float, typer.Option("--delta", help="δ of every release.")] = 1e-5,
    data: Annotated[
        str | None, typer.Option("--data", help="Also a given split: its TRAIN file (with --test).")
    ] = None,
    test: Annotated[str | None, typer.Option("--test", help="The TEST file of --data TRAIN.")] = None,
    no_mlp: Annotated[
        bool,
        typer.Option(
            "--no-mlp", help="Leave out the DP MLP column (the slowest: one whole federated run per point)."
        ),
    ] = False,
    mlp_noise: Annotated[
        str,
        typer.Option(
            "--mlp-noise",
            help="The DP MLP column's noise modes, comma-separated: local, distributed (SecAgg+). One whole "
            "federated run per mode, ε and seed.",
        ),
    ] = "local,distributed",
    first_seed: Annotated[
        int, typer.Option("--first-seed", min=0, help="Run seeds FIRST .. FIRST + --seeds - 1.")
    ] = 0,
    synth_profile: Annotated[
        str,
        typer.Option(
            "--synth-profile",
            help="The synthetic generator: 'movielens' or 'scale' (large catalogue; above the gram limit "
            "the DP-EASE/EigenGram columns are left out).",
        ),
    ] = "movielens",
    merge: Annotated[
        str | None,
        typer.Option(
            "--merge",
            help="Comma-separated frontier.csv files of earlier runs: render them (with this run's rows) "
            "into one table and plot.",
        ),
    ] = None,
) -> None:
    """Full HR@10 vs ε of DP popularity, DP-EASE (local and distributed noise) and the DP MLP, median of seeds."""
    from fedrec.simulations.data.synth_scale import SynthSpec
    from fedrec.simulations.reports.frontier import (
        FrontierConfig,
        add_choices,
        read_rows,
        run_frontier,
        write_outputs,
    )

    SynthSpec(profile=synth_profile)  # an unknown profile: one clear error before anything runs
    if include_ml100k is not None and not include_ml100k.exists():
        raise FedrecError(f"--include-ml100k {include_ml100k} does not exist")
    earlier = [Path(p.strip()) for p in (merge or "").split(",") if p.strip()]
    for p in earlier:
        if not p.is_file():
            raise FedrecError(f"--merge {p} is not a file")
    mlp_modes = tuple(dict.fromkeys(m.strip() for m in mlp_noise.split(",") if m.strip()))
    if not mlp_modes or any(m not in ("local", "distributed") for m in mlp_modes):
        raise FedrecError(f"--mlp-noise must list local and/or distributed, got {mlp_noise!r}")
    if (data is None) != (test is None):
        raise FedrecError("the frontier takes a given split as --data TRAIN --test TEST (both files)")
    cfg = FrontierConfig(
        users=_ints(users, "--users") if users.strip() else (),
        epsilons=_epsilons(epsilons),
        seeds=seeds,
        tenants=tenants,
        items=items,
        delta=delta,
        eval_users=eval_users,
        ml100k=include_ml100k,
        given=(data, test) if data is not None and test is not None else None,
        mlp=not no_mlp,
        mlp_modes=mlp_modes,
        first_seed=first_seed,
        synth_profile=synth_profile,
    )
    old = read_rows(earlier)
    runs = bool(cfg.users or cfg.ml100k or cfg.given)
    rows = run_frontier(cfg, log=lambda s: err_console.print(s, highlight=False)) if runs else []
    if old:
        rows = add_choices([*old, *rows], delta=delta)
    for p in write_outputs(out, rows):
        err_console.print(f"wrote {p}")

"""The ``fedrec`` command (CONTRACT.md).

User errors (``FedrecError``, ``PrivacyError``) print one line on stderr and exit 2, without a
traceback; anything else is a bug and keeps its traceback. Heavy imports (torch, flwr) happen inside
the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from privacy.errors import PrivacyError
from shared_model.errors import FedrecError

if TYPE_CHECKING:
    from simulations.dataset import PreparedData

app = typer.Typer(
    name="fedrec",
    help="Privacy-preserving federated recommender: Flower + Opacus user-level DP, encrypted tenant data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make or fetch datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out_console = Console()
err_console = Console(stderr=True)

# ------------------------------------------------------------------ shared options
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="'synthetic' (default), a MovieLens folder/file (100K, 1M/10M, latest), or a .csv/.parquet log.",
    ),
]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns", help="For generic CSV/Parquet: user=COL,item=COL[,rating=COL][,timestamp=COL]."
    ),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of the synthetic generator, sampling and training.")
]
MinRatingOpt = Annotated[
    float | None,
    typer.Option("--min-rating", help="Keep only interactions rated at least this (default: all)."),
]
SynthUsersOpt = Annotated[int | None, typer.Option("--synth-users", help="Users of --data synthetic.")]
SynthItemsOpt = Annotated[int | None, typer.Option("--synth-items", help="Items of --data synthetic.")]
TestOpt = Annotated[
    str | None,
    typer.Option(
        "--test",
        help="Given split: the TEST file for --data TRAIN ('user item item …' lines or a CSV); used as is, "
        "metrics Recall/NDCG/HitRate@20.",
    ),
]


def load_prepared(
    src: str,
    columns: str | None,
    seed: int,
    min_rating: float | None,
    users: int | None,
    items: int | None,
    test: str | None = None,
) -> PreparedData:
    """Load + clean + split a data source (or a given TRAIN/TEST pair), with a status spinner."""
    from simulations.dataset import prepare_dataset, prepare_given_split
    from simulations.sources import load, load_given_split

    with err_console.status(f"loading {src} …"):
        if test is not None:
            if src == "synthetic":
                raise FedrecError("--test TEST needs --data TRAIN (a file), not the synthetic generator")
            train_raw, test_raw = load_given_split(src, test, columns=columns)
            data = prepare_given_split(train_raw, test_raw, seed=seed, min_rating=min_rating)
        else:
            raw = load(src, columns=columns, seed=seed, synth_users=users, synth_items=items)
            data = prepare_dataset(raw, min_rating=min_rating)
    err_console.print(
        f"[dim]{data.source}: {data.split.n_users} users, {data.catalog.n_items} items, "
        f"{data.n_interactions} interactions[/dim]"
    )
    return data


def print_metrics_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    """rows: name → {"full": {...}, "sampled": {...}}."""
    t = Table(title=title)
    for col in (
        "model",
        "full HR@10",
        "full NDCG@10",
        "MRR",
        "coverage@10",
        "sampled HR@10",
        "sampled NDCG@10",
    ):
        t.add_column(col, justify="right" if col != "model" else "left")

    def f(x: Any) -> str:
        return "" if x is None else f"{float(x):.4f}"

    for name, m in rows.items():
        full, samp = m.get("full", {}), m.get("sampled", {})
        t.add_row(
            name,
            f(full.get("hr@10")),
            f(full.get("ndcg@10")),
            f(full.get("mrr")),
            f(full.get("coverage@10")),
            f(samp.get("hr@10")),
            f(samp.get("ndcg@10")),
        )
    out_console.print(t)


# ------------------------------------------------------------------ data
@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must not exist or be empty).")],
    users: Annotated[int, typer.Option("--users", min=1, help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option("--items", min=2, help="Number of items.")] = 1000,
    seed: SeedOpt = 0,
) -> None:
    """Write the built-in synthetic dataset (MovieLens 'latest' CSV layout + users.csv)."""
    from simulations.sources import synthetic, write_synthetic

    with err_console.status("generating …"):
        ds = synthetic(users=users, items=items, seed=seed)
        paths = write_synthetic(ds, out)
    out_console.print(f"wrote {len(ds.interactions)} interactions to {', '.join(str(p) for p in paths)}")


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="ml-100k | ml-1m | ml-latest-small")],
    out: Annotated[Path, typer.Option("--out", help="Folder to extract into.")],
) -> None:
    """Fetch a MovieLens dataset from GroupLens (needs internet; the project never ships the files)."""
    from simulations.sources import download

    with err_console.status(f"downloading {name} …"):
        path = download(name, out)
    out_console.print(f"{name} is in {path}")


# ------------------------------------------------------------------ centralized
@app.command()
def centralized(
    out: Annotated[Path, typer.Option("--out", help="RUN_DIR to write (atomically).")],
    data: DataOpt = "synthetic",
    columns: ColumnsOpt = None,
    test: TestOpt = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Maximum epochs, early stopping on validation [150]."),
    ] = None,
    patience: Annotated[
        int | None, typer.Option("--patience", min=1, help="Epochs without improvement before stopping [40].")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Adam learning rate [3e-3].")] = None,
    seed: SeedOpt = 0,
    min_rating: MinRatingOpt = None,
    synth_users: SynthUsersOpt = None,
    synth_items: SynthItemsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing RUN_DIR.")] = False,
) -> None:
    """Train the MLP recommender on all data (no federation, no DP) and compare with baselines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from simulations.centralized import CentralizedConfig, run_centralized
    from simulations.rundir import check_out_dir

    check_out_dir(out, overwrite=overwrite)
    prepared = load_prepared(data, columns, seed, min_rating, synth_users, synth_items, test)
    given = {"epochs": epochs, "patience": patience, "lr": lr}
    cfg = CentralizedConfig(seed=seed, **{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
    resolved = {"data": data, "test": test, "columns": columns, "min_rating": min_rating, "seed": seed}
    with Progress(
        TextColumn("[bold]epoch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        task = progress.add_task("train", total=cfg.epochs, info="")

        def on_epoch(epoch: int, loss: float, ndcg: float, improved: bool) -> None:
            star = "*" if improved else " "
            progress.update(task, completed=epoch, info=f"loss {loss:.4f}  val NDCG@10 {ndcg:.4f}{star}")

        metrics = run_centralized(
            prepared, cfg, out, overwrite=overwrite, resolved_config=resolved, on_epoch=on_epoch
        )
    rows = {"mlp (this run)": metrics, **metrics["baselines"]}
    print_metrics_table(f"test metrics — {metrics['dataset']['source']}", rows)
    out_console.print(f"{metrics['seconds']:.1f} s; model and metrics in {out}")


# ------------------------------------------------------------------ simulate
@app.command()
def simulate(
    out: Annotated[
        Path | None, typer.Option("--out", help="RUN_DIR to write (atomically); not with --resume.")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 5,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Data source to partition (default: synthetic); or --federation."),
    ] = None,
    federation: Annotated[
        Path | None,
        typer.Option("--federation", help="A folder written by `fedrec prepare` (instead of --data)."),
    ] = None,
    tenants: Annotated[int, typer.Option("--tenants", min=1, help="Tenants to partition --data into.")] = 3,
    partition: Annotated[str, typer.Option("--partition", help="iid | dirichlet:A | by:FIELD")] = "iid",
    k_anonymity: Annotated[
        int, typer.Option("--k-anonymity", min=1, help="k for the tenants' quasi-identifiers.")
    ] = 5,
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="Each tenant's user-level ε cap for the whole run.")
    ] = 8.0,
    delta: Annotated[float, typer.Option("--delta", help="δ (must be < 1/users of every tenant).")] = 1e-5,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Same pipeline without clipping or noise.")] = False,
    caps: Annotated[str, typer.Option("--caps", help="Per-tenant caps, e.g. 'tenant-0=3,tenant-1=1'.")] = "",
    local_epochs: Annotated[float, typer.Option("--local-epochs", help="Expected passes per round.")] = 1.0,
    batch_users: Annotated[
        int, typer.Option("--batch-users", min=1, help="Expected users per DP step.")
    ] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Local Adam learning rate.")] = 3e-3,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Per-user clipping bound C.")] = 1.0,
    approach: Annotated[
        str,
        typer.Option(
            "--approach",
            help="auto (pick from tenant sizes and ε, docs/PRIVACY_UTILITY.md) | mlp (DP-SGD rounds) | "
            "dp_ease | dp_popularity (one DP item release per tenant; --rounds does not apply).",
        ),
    ] = "auto",
    secagg: Annotated[
        bool,
        typer.Option("--secagg", help="SecAgg+: the server sees only the masked sum of the tenants' deltas."),
    ] = False,
    aggregation: Annotated[
        str,
        typer.Option("--aggregation", help="fedavg | median | trimmed:B (robust rules refuse --secagg)."),
    ] = "fedavg",
    max_update_norm: Annotated[
        float, typer.Option("--max-update-norm", help="L2 bound on one tenant's update per round.")
    ] = 20.0,
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", help="Seconds to wait for a round (each SecAgg+ stage).")
    ] = 1800.0,
    dropout: Annotated[
        float, typer.Option("--dropout", help="Simulated: each tenant misses a round with probability P.")
    ] = 0.0,
    crash: Annotated[
        list[str] | None,
        typer.Option("--crash", help="Simulated: TENANT@ROUND, the tenant's process dies mid-round."),
    ] = None,
    adversary: Annotated[
        list[str] | None,
        typer.Option(
            "--adversary", help="Simulated: TENANT:nan|inf|scale=F|signflip|shape|dtype|keys|users=N."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the interrupted run to this RUN_DIR from its checkpoint."),
    ] = None,
    columns: ColumnsOpt = None,
    test: TestOpt = None,
    seed: SeedOpt = 0,
    min_rating: MinRatingOpt = None,
    synth_users: SynthUsersOpt = None,
    synth_items: SynthItemsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing RUN_DIR.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Join this running Ray cluster (IP:PORT of its head, as `ray start --head` prints) "
            "instead of starting a local one.",
        ),
    ] = None,
) -> None:
    """Multi-tenant federated training with user-level DP (Flower simulation, one node per tenant)."""
    from shared_model.runconfig import RunConfig
    from simulations.rundir import check_out_dir
    from simulations.simulate import resume as resume_run
    from simulations.simulate import simulate as run

    def log(line: str) -> None:
        err_console.print(f"[dim]{line}[/dim]", highlight=False, soft_wrap=True)

    if resume is not None:
        if out is not None or data is not None or federation is not None:
            raise FedrecError(
                "--resume RUN_DIR takes the run's own configuration; drop --out/--data/--federation"
            )
        print_run_summary(resume, resume_run(resume, verbose=verbose, log=log, ray_address=ray_address))
        return
    if out is None:
        raise FedrecError("give --out RUN_DIR (or --resume RUN_DIR to continue an interrupted run)")
    if data is not None and federation is not None:
        raise FedrecError("give either --data or --federation, not both")
    if test is not None and data is None:
        raise FedrecError(
            "--test TEST goes with --data TRAIN (a federation folder already holds its test sets)"
        )
    if secagg and aggregation.strip() != "fedavg":
        raise FedrecError(
            f"--aggregation {aggregation} needs every update in the clear; with --secagg the server sees "
            "only their sum (use fedavg)"
        )
    check_out_dir(out, overwrite=overwrite)
    cfg = RunConfig(
        num_server_rounds=rounds,
        dp=not no_dp,
        epsilon=epsilon,
        delta=delta,
        caps=caps,
        local_epochs=local_epochs,
        batch_users=batch_users,
        lr=lr,
        max_grad_norm=max_grad_norm,
        seed=seed,
        approach=approach.strip().replace("-", "_"),
        secagg=secagg,
        aggregation=aggregation.strip(),
        max_update_norm=max_update_norm,
        round_timeout=round_timeout,
        fault_dropout=dropout,
        fault_crash=",".join(crash or []),
        fault_adversary=",".join(adversary or []),
    )
    prepare = None
    if federation is None:
        from simulations.prepare import PrepareConfig, prepare_federation

        prepared = load_prepared(
            data or "synthetic", columns, seed, min_rating, synth_users, synth_items, test
        )

        def prepare(fed_dir: Path) -> None:
            prepare_federation(
                prepared,
                fed_dir,
                PrepareConfig(tenants=tenants, partition=partition, k_anonymity=k_anonymity, seed=seed),
            )

    metrics = run(
        cfg,
        out,
        federation=federation,
        prepare=prepare,
        overwrite=overwrite,
        verbose=verbose,
        log=log,
        ray_address=ray_address,
    )
    print_run_summary(out, metrics)


def print_run_summary(out: Path, metrics: dict[str, Any]) -> None:
    """Per-tenant privacy table, what the robustness machinery did, the metrics next to the baselines."""
    privacy = json.loads((out / "privacy.json").read_text(encoding="utf-8"))
    if privacy.get("dp"):
        title = (
            f"privacy spend per tenant — unit: {privacy['unit']}, δ={privacy['delta']:g}, "
            f"accountant: {privacy['accountant']}, rounds: {privacy['rounds']}"
        )
    else:
        title = f"tenants — no DP (--no-dp), rounds: {privacy['rounds']}"
    out_console.print(title, soft_wrap=True, highlight=False)
    approach = privacy.get("approach") or {}
    if approach.get("reason"):
        out_console.print(
            f"approach: {approach['name']} — {approach['reason']}"
            + (
                f" (noise: {approach['noise_mode']})"
                if approach.get("noise_mode") not in (None, "none")
                else ""
            ),
            soft_wrap=True,
            highlight=False,
        )
    t = Table()
    for col in ("tenant", "users", "rounds trained", "ε", "cap", "status"):
        t.add_column(col, justify="left" if col in ("tenant", "status") else "right")
    for name, info in privacy["tenants"].items():
        eps = "—" if info["epsilon"] is None else f"{info['epsilon']:.3f}"
        cap = "—" if info["cap"] is None else f"{info['cap']:g}"
        t.add_row(name, str(info["users"]), str(info["rounds_trained"]), eps, cap, info["status"])
    out_console.print(t)
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text(encoding="utf-8").splitlines() if x]
    rejected = sum(1 for r in rows for i in r["tenants"].values() if i["status"] == "rejected")
    failures = sum(len(r["failures"]) for r in rows)
    unchanged = sum(1 for r in rows if not r.get("aggregated"))
    sa = privacy.get("secagg")
    out_console.print(
        (
            f"SecAgg+: on (threshold {sa['threshold']} of {sa['num_shares']}, ±{sa['clipping_range']:g}); "
            if sa
            else "SecAgg+: off; "
        )
        + f"rejected updates: {rejected}; failed replies: {failures}; rounds without an update: {unchanged}"
        + (
            f"; resumed {sum(1 for r in rows if 'resumed_from' in r)}×"
            if any("resumed_from" in r for r in rows)
            else ""
        )
        + " (details per round in rounds.jsonl)",
        soft_wrap=True,
        highlight=False,
    )
    name = {"mlp": "federated mlp", "dp_ease": "DP-EASE" if privacy.get("dp") else "EASE"}.get(
        approach.get("name", "mlp"), str(approach.get("name", "mlp")).replace("_", " ")
    )
    rows_m = {f"{name} (this run)": metrics, **metrics.get("baselines", {})}
    print_metrics_table(f"test metrics — {metrics['dataset'].get('source', '')}", rows_m)
    out_console.print(f"{metrics['seconds']:.1f} s; run files in {out}")


# ------------------------------------------------------------------ recommend
@app.command()
def recommend(
    model: Annotated[Path, typer.Option("--model", help="RUN_DIR holding model.pt + model.json.")],
    history: Annotated[
        str, typer.Option("--history", help="Comma-separated original item ids, oldest first.")
    ],
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="How many items to return.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    explain_: Annotated[
        bool, typer.Option("--explain", help="Name the history items behind each item.")
    ] = False,
) -> None:
    """Top-K for a history with the global model (no user table needed: any user, a new one too)."""
    from shared_model.artifacts import load_model
    from shared_model.recommend import Recommender

    rec = Recommender(load_model(model))
    ids = [x for x in (s.strip() for s in history.split(",")) if x]
    if not ids:
        raise FedrecError("--history is empty; give comma-separated item ids, e.g. --history 50,172,181")
    known, unknown = rec.to_indices(ids)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise FedrecError(f"unknown item id(s) in --history: {shown} (not in the model's catalogue)")
    from shared_model.recommend import now_context

    ctx = now_context()
    result = rec.recommend([known], k=k, context=ctx)[0]
    cat = rec.catalog
    because: list[str] = [""] * len(result.items)
    if explain_:
        from shared_model.explain import explain

        n_feats = len(rec.model.cfg.user_cardinalities)
        reasons = explain(
            rec.model, known[-rec.loaded.sampling.max_eval_history :], result.items, ctx, n_feats
        )
        because = [", ".join(cat.titles[x.item] for x in rs) for rs in reasons]
    rows = [
        {
            "rank": r + 1,
            "item": cat.item_ids[i],
            "score": float(s),
            "title": cat.titles[i],
            "because": because[r],
        }
        for r, (i, s) in enumerate(zip(result.items, result.scores, strict=True))
    ]
    if as_json:
        out_console.print_json(json.dumps({"items": rows, "model": rec.loaded.run_id}))
        return
    t = Table(title=f"top-{k} for a history of {len(known)} item(s) — model {rec.loaded.run_id}")
    cols = ("rank", "item", "score", "title", *(("because you watched",) if explain_ else ()))
    for col in cols:
        t.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for r in rows:
        cells = [str(r["rank"]), str(r["item"]), f"{r['score']:.3f}", str(r["title"])]
        t.add_row(*cells, *((str(r["because"]),) if explain_ else ()))
    out_console.print(t)


def _register_plugins() -> None:
    """Commands that live in their own modules (each exposes ``register(app)``)."""
    from server import cli_serve
    from simulations import cli_audit, cli_bench, cli_deploy, cli_frontier, cli_prepare

    cli_prepare.register(app)
    cli_serve.register(app)
    cli_audit.register(app)
    cli_bench.register(app)
    cli_frontier.register(app)
    cli_deploy.register(app)


_register_plugins()


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

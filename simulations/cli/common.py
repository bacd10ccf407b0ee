"""What the command modules share: the consoles, the data-source options, loading a source, and the
tables a run prints (metrics next to baselines, the per-tenant privacy spend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedrec.simulations.data.dataset import PreparedData
    from fedrec.simulations.data.synth_scale import SynthSpec

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
SynthProfileOpt = Annotated[
    str,
    typer.Option(
        "--synth-profile",
        help="Shape of --data synthetic: 'movielens' (small, rated) or 'scale' (large catalogue, long tail, "
        "few items per user, low-rank tastes + noise).",
    ),
]
SynthPerUserOpt = Annotated[
    float | None,
    typer.Option("--synth-per-user", help="Median items per user of --synth-profile scale [20]."),
]
SynthRankOpt = Annotated[
    int | None, typer.Option("--synth-rank", help="Taste topics of --synth-profile scale [200].")
]
SynthNoiseOpt = Annotated[
    float | None,
    typer.Option("--synth-noise", help="Share of draws from global popularity, --synth-profile scale [0.3]."),
]

SynthAlphaOpt = Annotated[
    float | None,
    typer.Option(
        "--synth-alpha",
        help="Mean Dirichlet concentration per taste topic of a user, --synth-profile scale [0.01]; smaller: "
        "fewer topics per user, more for a personal model to find (docs/PRIVACY_UTILITY.md: 0.003 with "
        "--synth-noise 0.1 has a real log's non-private EASE ÷ popularity).",
    ),
]


def synth_spec(
    profile: str,
    per_user: float | None,
    rank: int | None,
    noise: float | None,
    alpha: float | None = None,
) -> SynthSpec | None:
    """The generator shape from the --synth-* options (None: the default generator, untouched)."""
    from fedrec.simulations.data.synth_scale import SynthSpec

    given = {"per_user": per_user, "rank": rank, "noise": noise, "alpha": alpha}
    if profile == "movielens" and any(v is not None for v in given.values()):
        from fedrec.simulations.errors import DataError

        raise DataError(
            "--synth-per-user/--synth-rank/--synth-noise/--synth-alpha shape --synth-profile scale only."
        )
    return SynthSpec(profile=profile, **{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]


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
    synth: SynthSpec | None = None,
) -> PreparedData:
    """Load + clean + split a data source (or a given TRAIN/TEST pair), with a status spinner."""
    from fedrec.shared_model.errors import FedrecError
    from fedrec.simulations.data.dataset import prepare_dataset, prepare_given_split
    from fedrec.simulations.data.sources import load, load_given_split

    with err_console.status(f"loading {src} …"):
        if test is not None:
            if src == "synthetic":
                raise FedrecError("--test TEST needs --data TRAIN (a file), not the synthetic generator")
            train_raw, test_raw = load_given_split(src, test, columns=columns)
            data = prepare_given_split(train_raw, test_raw, seed=seed, min_rating=min_rating)
        else:
            raw = load(src, columns=columns, seed=seed, synth_users=users, synth_items=items, synth=synth)
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
    for r in rows:  # dp_two_stage: how many items the Gram covered and why (the M rule or --gram-limit)
        picked = (r.get("release") or {}).get("select")
        if picked:
            out_console.print(f"dp_two_stage: picked {picked['why']}", soft_wrap=True, highlight=False)
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

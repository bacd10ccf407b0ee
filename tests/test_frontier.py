"""fedrec.simulations.reports.frontier + cli_frontier: a tiny frontier end to end (files, medians, the choice)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import typer
from typer.testing import CliRunner

from fedrec.simulations.cli import frontier as cli_frontier
from fedrec.simulations.reports.frontier import median_table


def test_frontier_command_writes_png_csv_and_markdown(tmp_path: Path) -> None:
    app = typer.Typer()
    cli_frontier.register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    out = tmp_path / "f"
    result = CliRunner().invoke(
        app,
        [
            "frontier",
            "--out",
            str(out),
            "--users",
            "300",
            "--epsilons",
            "8,inf",
            "--seeds",
            "2",
            "--items",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("frontier.png", "frontier.csv", "frontier_median.csv", "frontier.md"):
        assert (out / name).stat().st_size > 0
    with (out / "frontier.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # per seed: popularity ×2 ε, (dp_popularity, dp_ease) × (2 modes at ε=8, 1 at ∞), the ridge-only
    # ablation and eigen_gram × 2 modes at ε=8, chosen × 3
    assert len(rows) == 2 * (2 + 6 + 2 + 2 + 3)
    assert {r["approach"] for r in rows if r["approach"] == "dp_ease_ridge"} == {"dp_ease_ridge"}
    chosen = [r for r in rows if r["approach"] == "chosen"]
    assert {r["picked"] for r in chosen if float(r["epsilon"]) == math.inf} == {"ease"}
    md = (out / "frontier.md").read_text(encoding="utf-8")
    assert "synthetic-300" in md and "| ∞ |" in md


def test_median_table_takes_the_median_over_seeds() -> None:
    rows = [
        {
            "dataset": "d",
            "epsilon": 1.0,
            "approach": "dp_ease",
            "mode": "local",
            "hr@10": v,
            "ndcg@10": v,
            "seed": i,
        }
        for i, v in enumerate((0.1, 0.3, 0.2))
    ]
    (med,) = median_table(rows)
    assert med["hr@10"] == 0.2 and med["seeds"] == 3


def test_bad_epsilons_are_a_user_error() -> None:
    app = typer.Typer()
    cli_frontier.register(app)

    @app.command("noop")
    def noop() -> None:
        pass

    result = CliRunner().invoke(app, ["frontier", "--out", "/tmp/x", "--epsilons", "0,abc"])
    assert result.exit_code != 0

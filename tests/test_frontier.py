"""fedrec.simulations.reports.frontier + cli_frontier: a tiny frontier end to end (files, medians, the choice)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    # ablation and eigen_gram × 2 modes at ε=8, the DP MLP at ε=8 (none at ∞), chosen × 3
    assert len(rows) == 2 * (2 + 6 + 2 + 2 + 1 + 3)
    assert {r["approach"] for r in rows if r["approach"] == "dp_ease_ridge"} == {"dp_ease_ridge"}
    chosen = [r for r in rows if r["approach"] == "chosen"]
    assert {r["picked"] for r in chosen if float(r["epsilon"]) == math.inf} == {"ease"}
    # The DP MLP column: the release at 0.9 ε then DP-SGD rounds, composed to the same ε (user-level, δ)
    mlp = [r for r in rows if r["approach"] == "dp_mlp"]
    assert [(float(r["epsilon"]), r["mode"], r["seed"]) for r in mlp] == [
        (8.0, "local", "0"),
        (8.0, "local", "1"),
    ]
    for r in mlp:
        assert 7.99 < float(r["epsilon_spent"]) <= 8.0
        assert float(r["release_share"]) == 0.9 and int(r["sgd_rounds"]) == 5
        assert float(r["sigma_sgd"]) > 0 and float(r["sigma_release"]) > 0
        assert 0 <= float(r["hr@10"]) <= 1 and 0 <= float(r["val_hr@10"]) <= 1
        assert int(r["genre_columns"]) > 0  # the synthetic catalogue's public genres: the frozen table
    val = [r for r in rows if r.get("val_hr@10") and r["approach"] in ("dp_popularity", "dp_ease")]
    assert {r["mode"] for r in val} == {"local"} and len(val) == 4
    md = (out / "frontier.md").read_text(encoding="utf-8")
    assert "synthetic-300" in md and "| ∞ |" in md
    assert "DP MLP (release 0.9 ε + DP-SGD head)" in md and "best on validation" in md

    # --merge renders earlier CSVs without running anything: the same table
    again = tmp_path / "g"
    result = CliRunner().invoke(
        app, ["frontier", "--out", str(again), "--users", "", "--merge", str(out / "frontier.csv")]
    )
    assert result.exit_code == 0, result.output
    assert (again / "frontier.md").read_text(encoding="utf-8") == md
    assert (again / "frontier.png").stat().st_size > 0


def test_no_mlp_leaves_the_column_out(tmp_path: Path) -> None:
    app = typer.Typer()
    cli_frontier.register(app)

    @app.command("noop")
    def noop() -> None:
        pass

    out = tmp_path / "f"
    args = ["frontier", "--out", str(out), "--users", "200", "--epsilons", "4", "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--items", "50", "--no-mlp", "--first-seed", "3"])
    assert result.exit_code == 0, result.output
    with (out / "frontier.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and not [r for r in rows if r["approach"] == "dp_mlp"]
    assert {r["seed"] for r in rows} == {"3"}
    assert "DP MLP" not in (out / "frontier.md").read_text(encoding="utf-8")


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


FEDREC = [sys.executable, "-m", "fedrec.simulations.cli.main"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--users", "", "--merge", "{tmp}/nope.csv"], "nope.csv is not a file"),
        (["--users", "100", "--synth-profile", "huge"], "--synth-profile must be one of"),
    ],
    ids=["missing-merge-csv", "unknown-synth-profile"],
)
def test_bad_frontier_input_is_one_clear_error(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [*FEDREC, "frontier", "--out", str(out), *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1]
    assert not out.exists()


def test_scale_profile_above_the_gram_limit_leaves_the_gram_columns_out(tmp_path: Path) -> None:
    """A catalogue above the gram limit (4 000 items): no dense Gram release, DP popularity still runs."""
    out = tmp_path / "f"
    args = ["frontier", "--out", str(out), "--users", "400", "--items", "20000", "--epsilons", "8"]
    proc = subprocess.run(
        [*FEDREC, *args, "--seeds", "1", "--synth-profile", "scale", "--eval-users", "100", "--no-mlp"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "no DP-EASE/EigenGram" in proc.stderr
    with (out / "frontier.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["approach"] for r in rows} == {"popularity", "dp_popularity"}
    assert {r["dataset"] for r in rows} == {"synthetic-scale-400x20000"}
    assert int(rows[0]["items"]) > 4000

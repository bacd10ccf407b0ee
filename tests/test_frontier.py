"""fedrec.simulations.reports.frontier + cli_frontier: a tiny frontier end to end (files, medians, the choice)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedrec.simulations.cli import frontier as cli_frontier
from fedrec.simulations.reports.frontier import median_table


def test_frontier_command_writes_png_csv_and_markdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = typer.Typer()
    cli_frontier.register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    out = tmp_path / "f"
    scratch = tmp_path / "scratch"  # the DP MLP's temporary federations (keys, partitions) go here
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
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
    # ablation and eigen_gram × 2 modes at ε=8, the DP MLP × 2 modes at ε=8 (none at ∞), chosen × 3
    assert len(rows) == 2 * (2 + 6 + 2 + 2 + 2 + 3)
    assert {r["approach"] for r in rows if r["approach"] == "dp_ease_ridge"} == {"dp_ease_ridge"}
    chosen = [r for r in rows if r["approach"] == "chosen"]
    assert {r["picked"] for r in chosen if float(r["epsilon"]) == math.inf} == {"ease"}
    # at ε = 8 auto trains the genres head where choose() would release DP popularity (300 users, public
    # genres): the automatic choice is then the DP MLP column's own point, with auto's reason
    for r in (r for r in chosen if float(r["epsilon"]) == 8.0 and r["picked"].startswith("mlp")):
        assert r["picked"] == "mlp (genres head)" and "DP MLP head" in r["reason"]
        twin = next(
            m for m in rows if m["approach"] == "dp_mlp" and (m["seed"], m["mode"]) == (r["seed"], r["mode"])
        )
        assert r["hr@10"] == twin["hr@10"]
    assert any(r["picked"] == "mlp (genres head)" for r in chosen)
    # The DP MLP column: one whole federated run per (seed, mode) through the product's loop, at most ε
    # per tenant over all its stages (user-level, δ); 300 users: below the EASE-table head's bound
    mlp = [r for r in rows if r["approach"] == "dp_mlp"]
    assert sorted((float(r["epsilon"]), r["mode"], r["seed"]) for r in mlp) == [
        (8.0, "distributed", "0"),
        (8.0, "distributed", "1"),
        (8.0, "local", "0"),
        (8.0, "local", "1"),
    ]
    for r in mlp:
        assert 7.9 < float(r["epsilon_spent"]) <= 8.0
        assert r["head"] == "genres" and "300 users < 5000" in r["head_reason"]
        assert r["dp_mode"] == "local-steps" and int(r["rounds"]) >= 2
        assert 0 <= float(r["hr@10"]) <= 1 and 0 <= float(r["val_hr@10"]) <= 1
    # the runs' federations (keys, encrypted partitions) and run dirs do not outlive them (torch's own
    # compile cache may stay)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor")] == []
    val = [r for r in rows if r.get("val_hr@10") and r["approach"] in ("dp_popularity", "dp_ease")]
    assert {r["mode"] for r in val} == {"local", "distributed"} and len(val) == 8
    md = (out / "frontier.md").read_text(encoding="utf-8")
    assert "synthetic-300" in md and "| ∞ |" in md
    assert "DP MLP, distributed noise (SecAgg)" in md and "(genres head)" in md and "best on validation" in md

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
        (["--users", "100", "--mlp-noise", "local,secagg"], "--mlp-noise must list local and/or distributed"),
    ],
    ids=["missing-merge-csv", "unknown-synth-profile", "unknown-mlp-noise"],
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


def test_the_dp_mlp_column_trains_the_head_auto_would_train() -> None:
    """The column's MLP is the one ``auto`` trains: the EASE-table head from 5 000 users within the gram
    limit, else the genres head, each with its reason."""
    from fedrec.simulations.reports.frontier_mlp import mlp_head

    assert mlp_head(5000, 1000)[0] == "ease"
    head, why = mlp_head(4999, 1000)
    assert head == "" and "4999 users < 5000" in why
    head, why = mlp_head(30000, 40000)
    assert head == "" and "40000 items > the gram limit (4000)" in why

"""The `fedrec` command as a user runs it: a real subprocess, real files, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FEDREC = [sys.executable, "-m", "fedrec"]


def fedrec(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDREC, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), proc.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def centralized_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("c") / "run"
    proc = fedrec(
        "centralized",
        "--data",
        "synthetic",
        "--synth-users",
        "500",
        "--synth-items",
        "200",
        "--epochs",
        "25",
        "--patience",
        "25",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out.parent / "stderr.txt").write_text(proc.stderr)
    return out


@pytest.mark.slow
def test_centralized_writes_the_contract_files_and_beats_popularity(centralized_run: Path) -> None:
    # stderr is a pipe here, not a terminal: one plain progress line per epoch instead of a live bar
    epochs_run = json.loads((centralized_run / "metrics.json").read_text())["training"]["epochs_run"]
    stderr = (centralized_run.parent / "stderr.txt").read_text()
    lines = re.findall(r"^epoch (\d+)/25 .*val NDCG@10", stderr, flags=re.MULTILINE)
    assert lines == [str(e) for e in range(1, epochs_run + 1)], stderr[-2000:]
    for name in ("metrics.json", "model.pt", "model.json", "config.json"):
        assert (centralized_run / name).is_file()
    m = json.loads((centralized_run / "metrics.json").read_text())
    assert set(m) >= {"full", "sampled", "baselines", "dataset", "seconds"}
    assert m["dataset"] == {**m["dataset"], "users": 500, "items": 200}
    assert m["full"]["hr@10"] > m["baselines"]["popularity"]["full"]["hr@10"], m
    assert m["sampled"]["negatives"] == 99
    meta = json.loads((centralized_run / "model.json").read_text())
    assert set(meta) >= {"model", "catalog", "run_id"} and "user_ids" not in json.dumps(meta)


@pytest.mark.slow
def test_recommend_prints_a_ranked_table_with_titles_and_reasons(centralized_run: Path) -> None:
    proc = fedrec("recommend", "--model", str(centralized_run), "--history", "1,2,3", "-k", "5", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "Synthetic Movie" in proc.stdout and "because you watched" in proc.stdout
    js = fedrec("recommend", "--model", str(centralized_run), "--history", "1,2,3", "-k", "5", "--json")
    items = json.loads(js.stdout)["items"]
    assert [r["rank"] for r in items] == [1, 2, 3, 4, 5] and not {r["item"] for r in items} & {"1", "2", "3"}
    assert [r["score"] for r in items] == sorted((r["score"] for r in items), reverse=True)


@pytest.mark.slow
def test_recommend_refuses_unknown_items(centralized_run: Path) -> None:
    proc = fedrec("recommend", "--model", str(centralized_run), "--history", "1,nope-9,2")
    assert_one_line_error(proc, "unknown item id", "nope-9")


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(
        fedrec("recommend", "--model", str(tmp_path), "--history", "1"), "model.pt is missing"
    )


def test_bad_data_sources_fail_cleanly_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert_one_line_error(
        fedrec("centralized", "--data", str(tmp_path / "absent"), "--out", str(out)), "absent"
    )
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "notes.txt").write_text("hello\n")
    assert_one_line_error(fedrec("centralized", "--data", str(weird), "--out", str(out)))
    log = tmp_path / "log.csv"
    log.write_text("uid,iid,ts\n1,10,5\n1,11,6\n2,10,7\n")
    assert_one_line_error(
        fedrec("centralized", "--data", str(log), "--columns", "user=uid,item=item_id", "--out", str(out)),
        "item_id",
    )
    empty = tmp_path / "empty.csv"
    empty.write_text("uid,iid\n")
    assert_one_line_error(
        fedrec("centralized", "--data", str(empty), "--columns", "user=uid,item=iid", "--out", str(out))
    )
    # parses, but no user has the 3 interactions a validation + test item need
    assert_one_line_error(
        fedrec(
            "centralized",
            "--data",
            str(log),
            "--columns",
            "user=uid,item=iid,timestamp=ts",
            "--out",
            str(out),
        ),
        "too small to split",
    )
    assert not out.exists(), "nothing half-written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")], "no temp dir left behind"


def test_every_command_has_help() -> None:
    for cmd in (
        ["--help"],
        ["centralized", "--help"],
        ["simulate", "--help"],
        ["recommend", "--help"],
        ["prepare", "--help"],
        ["serve", "--help"],
        ["data", "synth", "--help"],
    ):
        proc = fedrec(*cmd)
        assert proc.returncode == 0 and "Usage" in proc.stdout, cmd

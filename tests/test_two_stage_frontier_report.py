"""The report of ``scripts/two_stage_frontier.py --out`` (issue 15, "Report"): a real run of the script on
a tiny synthetic set writes ``frontier.jsonl``, ``frontier.md`` (one row per ε, the medians over noise
seeds of the jsonl's rows) and a PNG; ``--render-only`` renders parts measured separately the same way."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ARGS = [
    "--users",
    "300",
    "--items",
    "400",
    "--eps",
    "4,8",
    "--modes",
    "secagg,local",
    "--m",
    "",
    "--m-rule",
    "1",
]


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("two_stage_frontier", SCRIPTS / "two_stage_frontier.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "approach" in r]


def _table(md: str) -> dict[float, list[str]]:
    """ε → the cells of the first table's data rows."""
    out: dict[float, list[str]] = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and re.fullmatch(r"[0-9.]+", cells[0]):
            assert float(cells[0]) not in out, "one row per ε"
            out[float(cells[0])] = cells
    return out


def _median_cell(cell: str) -> float:
    return float(cell.split(" (")[0].strip("*"))


def test_out_writes_jsonl_md_png_with_the_medians_of_the_rows(frontier, tmp_path: Path) -> None:
    out = tmp_path / "report"
    frontier.main([*ARGS, "--noise-seeds", "0,1", "--out", str(out)])
    for name in ("frontier.jsonl", "frontier.md", "frontier.png"):
        assert (out / name).is_file(), name
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")
    rows = _rows(out / "frontier.jsonl")
    md = (out / "frontier.md").read_text()
    table = _table(md)
    assert sorted(table) == [4.0, 8.0]
    # columns per mode: DP popularity, dp_two_stage, ratio, M (secagg first, then local)
    for eps, cells in table.items():
        for k, mode in enumerate(("secagg", "local")):
            pop = [r["recall20"] for r in rows if r["approach"] == "dp_popularity" and r["epsilon"] == eps
                   and r["mode"] == mode]  # fmt: skip
            two = [
                r
                for r in rows
                if r["approach"] == "dp_two_stage" and r["epsilon"] == eps and r["mode"] == mode
            ]
            assert len(pop) == len(two) == 2  # one per noise seed
            assert _median_cell(cells[1 + 4 * k]) == pytest.approx(float(np.median(pop)), abs=5e-5)
            assert _median_cell(cells[2 + 4 * k]) == pytest.approx(
                float(np.median([r["recall20"] for r in two])), abs=5e-5
            )
            ms = sorted({r["m"] for r in two})
            assert cells[4 + 4 * k].replace(" ", "") in {f"{ms[0]}", f"{ms[0]}–{ms[-1]}"}
    # the non-private references: popularity and EASE on each M the rule picked
    picked = {r["m"] for r in rows if r["approach"] == "dp_two_stage"}
    assert {r["m"] for r in rows if r["approach"].startswith("ease")} == picked
    assert "Non-private references" in md and "popularity" in md and "EASE on the same M items" in md
    assert "δ = 1e-05" in md and "PRV" in md and "noise seeds: 0, 1" in md and "--out" in md
    assert '"meta"' in (out / "frontier.jsonl").read_text().splitlines()[0]

    # measured in parts (one noise seed each), rendered together: the same table
    parts = []
    for seed in (0, 1):
        part = tmp_path / f"part{seed}"
        frontier.main([*ARGS, "--noise-seeds", str(seed), "--no-ease", "--out", str(part)])
        parts.append(str(part / "frontier.jsonl"))
    merged = tmp_path / "merged"
    frontier.main(["--render-only", ",".join(parts), "--out", str(merged)])
    assert _table((merged / "frontier.md").read_text()) == table
    assert (merged / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert len([r for r in _rows(merged / "frontier.jsonl") if r["approach"].startswith("popularity")]) == 1

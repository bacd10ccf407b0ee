"""Frontier report of ``scripts/two_stage_frontier.py --out DIR`` (issue 15, "Report"): the rows it
measured as ``frontier.jsonl``, a Markdown table ``frontier.md`` (per ε: DP popularity and
``dp_two_stage`` per noise mode, the median Recall@20 over noise seeds with each seed's value in
brackets, the ratio two-stage ÷ DP popularity of the same noise mode, the M picked) and a plot
``frontier.png`` (Recall@20 vs ε, log2 axis, median point, min–max over seeds as error bars, the
non-private references as dashed lines). Only aggregate figures: no user ids, no interactions.

``frontier.jsonl`` starts with one ``{"meta": {...}}`` line per run (command line, date, wall time,
tenants, δ); the others are the script's rows as it printed them. ``read_rows`` reads several such
files (a frontier measured in parts, e.g. one noise seed per command) and drops repeated rows (the
non-private references every part measures again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("secagg", "local")
MODE_LABEL = {"secagg": "SecAgg", "local": "local"}


def write_jsonl(path: Path, metas: Sequence[dict[str, Any]], rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for meta in metas:
            f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_rows(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metas, rows) of one or more ``frontier.jsonl`` files; exact repeats of a row are kept once."""
    metas: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if "meta" in obj:
                metas.append(obj["meta"])
                continue
            if "approach" not in obj:  # the script's closing {"total_s": ...} line, if pasted from stdout
                continue
            key = json.dumps({k: v for k, v in obj.items() if k != "fit_s"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(obj)
    return metas, rows


def _variant(row: dict[str, Any]) -> str:
    """How a two-stage row's M was set and fitted; one table per variant."""
    how = (
        f"M rule c = {', '.join(f'{c:g}' for c in row['rule_c'])}" if row.get("rule_c") else f"M = {row['m']}"
    )
    extra = []
    if row.get("shrinkage", "soft") != "soft":
        extra.append(f"shrinkage {row['shrinkage']}")
    if row.get("lam_per_user") is not None:
        extra.append(f"ridge {row['lam_per_user']:g} per user")
    return "; ".join([how, *extra])


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _m_range(ms: Sequence[int]) -> str:
    lo, hi = min(ms), max(ms)
    return f"{lo:,}".replace(",", " ") if lo == hi else f"{lo:,}–{hi:,}".replace(",", " ")


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over noise seeds: ``dp_popularity[(eps, mode)]`` and ``two_stage[variant][(eps, mode)]``,
    each ``{"median", "values" (by noise seed), "seeds", "m" (list, two-stage only)}``; the non-private
    references ``popularity`` and ``ease`` (``{m: recall}``)."""

    def cell(rs: list[dict[str, Any]]) -> dict[str, Any]:
        rs = sorted(rs, key=lambda r: r["noise_seed"])
        vals = [float(r["recall20"]) for r in rs]
        out: dict[str, Any] = {
            "median": float(np.median(vals)),
            "values": vals,
            "min": min(vals),
            "max": max(vals),
            "seeds": [r["noise_seed"] for r in rs],
        }
        if "m" in rs[0]:
            out["m"] = [int(r["m"]) for r in rs]
        return out

    pop: dict[tuple[float, str], list[dict[str, Any]]] = {}
    two: dict[str, dict[tuple[float, str], list[dict[str, Any]]]] = {}
    ease: dict[int, float] = {}
    popularity = None
    for r in rows:
        a = r["approach"]
        if a == "dp_popularity":
            pop.setdefault((float(r["epsilon"]), r["mode"]), []).append(r)
        elif a == "dp_two_stage":
            two.setdefault(_variant(r), {}).setdefault((float(r["epsilon"]), r["mode"]), []).append(r)
        elif a == "popularity (non-private)":
            popularity = float(r["recall20"])
        elif a.startswith("ease (non-private"):
            ease.setdefault(int(r["m"]), float(r["recall20"]))
    return {
        "dp_popularity": {k: cell(v) for k, v in pop.items()},
        "two_stage": {var: {k: cell(v) for k, v in d.items()} for var, d in two.items()},
        "popularity": popularity,
        "ease": ease,
    }


def _seeds_cell(c: dict[str, Any] | None, bold: bool = False) -> str:
    if c is None:
        return "—"
    med = f"**{_fmt(c['median'])}**" if bold else _fmt(c["median"])
    return f"{med} ({', '.join(_fmt(v) for v in c['values'])})"


def _header(metas: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[str]:
    first = metas[0] if metas else {}
    data = rows[0]["data"] if rows else first.get("data", "?")
    which = rows[0].get("which", "test") if rows else "test"
    seed = rows[0].get("seed", 0) if rows else 0
    share = rows[0].get("select_share", 0.1) if rows else 0.1
    seeds = sorted({r["noise_seed"] for r in rows if "noise_seed" in r})
    tenants = sorted({m.get("tenants") for m in metas if m.get("tenants") is not None})
    deltas = sorted({m.get("delta") for m in metas if m.get("delta") is not None})
    split = (
        f"each user's items 80/20 at random into train/test (data/split seed {seed}); Recall@20 on "
        f"{'test' if which == 'test' else 'validation (20 % of train; test untouched)'}, full ranking over "
        "every item not in the user's train set"
    )
    lines = [
        f"# `dp_two_stage` frontier: {data}",
        "",
        f"- data: {data}; split: {split}",
        f"- privacy: δ = {', '.join(f'{d:g}' for d in deltas) or '1e-05'}, unit = user, accountant PRV, "
        f"rounds = 2 stage releases (stage 1 DP popularity with {share:g} of μ², stage 2 the Gram of the M "
        "selected items)",
        f"- noise: SecAgg = the server's sum carries one release's σ; local = each of "
        f"{', '.join(str(t) for t in tenants) or '?'} tenants adds its full σ (σ·√tenants on the sum)",
        f"- noise seeds: {', '.join(str(s) for s in seeds)}; cells: median Recall@20 (each seed's value in "
        "brackets, in seed order); ratio = two-stage median ÷ DP popularity median of the same noise mode",
        f"- date: {', '.join(sorted({m.get('date', '?') for m in metas})) or '?'}",
    ]
    for m in metas:
        lines.append(f"- command ({m.get('wall_s', '?')} s wall): `{m.get('command', '?')}`")
    return lines


def markdown(metas: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    s = summarize(rows)
    pop, two = s["dp_popularity"], s["two_stage"]
    eps_all = sorted({k[0] for k in pop} | {k[0] for d in two.values() for k in d})
    modes = [
        m for m in MODES if any(k[1] == m for k in pop) or any(k[1] == m for d in two.values() for k in d)
    ]
    lines = _header(metas, rows)
    variants = two or {"(no dp_two_stage rows)": {}}
    for var, cells in variants.items():
        lines += ["", f"### dp_two_stage, {var}", ""]
        head = ["ε"]
        for mode in modes:
            lab = MODE_LABEL.get(mode, mode)
            head += [f"DP popularity ({lab})", f"dp_two_stage {lab}", "ratio", "M"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for eps in eps_all:
            row = [f"{eps:g}"]
            for mode in modes:
                p, t = pop.get((eps, mode)), cells.get((eps, mode))
                ratio = f"{t['median'] / p['median']:.2f}×" if p and t and p["median"] > 0 else "—"
                row += [_seeds_cell(p), _seeds_cell(t, bold=True), ratio, _m_range(t["m"]) if t else "—"]
            lines.append("| " + " | ".join(row) + " |")
    refs = []
    if s["popularity"] is not None:
        refs.append(f"popularity {_fmt(s['popularity'])}")
    if s["ease"]:
        ease = s["ease"]
        lo, hi = min(ease), max(ease)
        per = []
        for mode in modes:
            cells = next(iter(two.values()), {})
            got = [
                f"ε {eps:g} {_fmt(float(np.median([ease[m] for m in c['m']])))}"
                for eps in eps_all
                if (c := cells.get((eps, mode))) and all(m in ease for m in c["m"])
            ]
            if got:
                per.append(f"{MODE_LABEL.get(mode, mode)}: {', '.join(got)}")
        refs.append(
            f"EASE on the same M items {_fmt(min(ease.values()))}–{_fmt(max(ease.values()))} over the "
            f"{len(ease)} M measured ({_m_range([lo, hi])})"
            + (f"; median over each seed's M — {'; '.join(per)}" if per else "")
        )
    lines += [
        "",
        "Non-private references (no noise): " + ("; ".join(refs) if refs else "none measured") + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: list[tuple[str, dict[tuple[float, str], dict[str, Any]]]] = [
        ("DP popularity", s["dp_popularity"])
    ]
    multi = len(s["two_stage"]) > 1
    for var, cells in s["two_stage"].items():
        series.append((f"dp_two_stage ({var})" if multi else "dp_two_stage", cells))
    styles = {"secagg": ("-", "o"), "local": (":", "s")}
    for k, (name, cells) in enumerate(series):
        for mode in MODES:
            pts = sorted((e, c) for (e, md), c in cells.items() if md == mode)
            if not pts:
                continue
            xs = [e for e, _ in pts]
            med = np.array([c["median"] for _, c in pts])
            lo = med - np.array([c["min"] for _, c in pts])
            hi = np.array([c["max"] for _, c in pts]) - med
            ax.errorbar(
                xs, med, yerr=[lo, hi], marker=styles[mode][1], linestyle=styles[mode][0], capsize=3,
                color=("tab:blue", "tab:green", "tab:red", "tab:orange")[k % 4], label=f"{name}, {MODE_LABEL[mode]}",
            )  # fmt: skip
    if s["popularity"] is not None:
        ax.axhline(
            s["popularity"], color="grey", linestyle="--", linewidth=1, label="popularity (non-private)"
        )
    if s["ease"]:
        ms = sorted(s["ease"])
        shown = ms if len(ms) <= 2 else [ms[0], ms[-1]]
        for m, color in zip(shown, ("tab:purple", "tab:brown"), strict=False):
            ax.axhline(
                s["ease"][m], color=color, linestyle="--", linewidth=1,
                label=f"EASE (non-private), same {_m_range([m])} items",
            )  # fmt: skip
    ax.set_xscale("log", base=2)
    eps = sorted({e for _, cells in series for e, _ in cells})
    if eps:
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
    ax.set_xlabel("ε (user-level, δ = 1e-5)")
    ax.set_ylabel("Recall@20 (median; bars: min–max over noise seeds)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, metas: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[Path]:
    """``frontier.jsonl``, ``frontier.md`` and ``frontier.png`` in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "frontier.jsonl", out / "frontier.md", out / "frontier.png"]
    write_jsonl(paths[0], metas, rows)
    paths[1].write_text(markdown(metas, rows), encoding="utf-8")
    data = rows[0]["data"] if rows else ""
    plot(rows, paths[2], title=f"dp_two_stage vs DP popularity: {data}")
    return paths

"""PNG plots of a federated run: validation metrics vs round, ε vs round per tenant with caps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_run(run_dir: Path) -> list[Path]:
    """Write ``metrics.png`` and (with DP) ``epsilon.png`` into ``run_dir``; returns the paths."""
    rows = _rounds(run_dir)
    written = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("hr@10", "ndcg@10", "mrr"):
        pts = [(r["round"], r["val"][key]) for r in rows if key in r.get("val", {})]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"val {key}")
    ax.set_xlabel("round")
    ax.set_ylabel("full-ranking metric (validation)")
    ax.set_title("Global model by round")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "metrics.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "metrics.png")

    privacy_path = run_dir / "privacy.json"
    privacy = json.loads(privacy_path.read_text(encoding="utf-8")) if privacy_path.is_file() else {}
    if privacy.get("dp"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for tenant, info in sorted(privacy.get("tenants", {}).items()):
            pts = [
                (r["round"], t["epsilon"])
                for r in rows
                for name, t in r.get("tenants", {}).items()
                if name == tenant and t.get("epsilon") is not None
            ]
            if not pts:
                continue
            (line,) = ax.plot(*zip(*pts, strict=True), marker="o", label=tenant)
            if info.get("cap") is not None:
                ax.axhline(info["cap"], color=line.get_color(), ls="--", lw=0.8)
        ax.set_xlabel("round")
        ax.set_ylabel(f"cumulative ε (δ={privacy.get('delta')}, {privacy.get('accountant')})")
        ax.set_title("User-level privacy spend per tenant (dashed: cap)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "epsilon.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "epsilon.png")
    return written

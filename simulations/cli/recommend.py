"""``fedrec recommend``: a top-K for a history, with the global model alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedrec.server.cli_serve import CandidatesOpt
from fedrec.shared_model.errors import FedrecError
from fedrec.simulations.cli.common import out_console


def register(app: typer.Typer) -> None:
    app.command()(recommend)


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
    candidates: CandidatesOpt = "auto",
) -> None:
    """Top-K for a history with the global model (no user table needed: any user, a new one too)."""
    from fedrec.shared_model.artifacts import load_model
    from fedrec.shared_model.recommend import Recommender, parse_candidates

    n_cand = parse_candidates(candidates)
    rec = Recommender(load_model(model), candidates=n_cand)
    ids = [x for x in (s.strip() for s in history.split(",")) if x]
    if not ids:
        raise FedrecError("--history is empty; give comma-separated item ids, e.g. --history 50,172,181")
    known, unknown = rec.to_indices(ids)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise FedrecError(f"unknown item id(s) in --history: {shown} (not in the model's catalogue)")
    from fedrec.shared_model.recommend import now_context

    ctx = now_context()
    result = rec.recommend([known], k=k, context=ctx)[0]
    cat = rec.catalog
    because: list[str] = [""] * len(result.items)
    if explain_:
        from fedrec.shared_model.explain import explain

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

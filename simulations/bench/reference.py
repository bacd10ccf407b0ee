"""The trivial FastAPI top-K endpoint ``fedrec bench serve`` measures next to ``fedrec serve``.

What a team would write in an afternoon: a pydantic body, a dict from item id to row, the mean of the
history's rows of a random (N × 32) embedding table, numpy scores over all N items, ``argpartition``
top-K, a JSON answer of the same shape. No masking, no auth, no diversity, no explanations: the
floor of what an HTTP top-K costs in Python on this machine.

    FEDREC_REF_IDS=ids.txt uvicorn --factory fedrec.simulations.bench.reference:create

``FEDREC_REF_IDS``: a file of the catalogue's item ids, one per line (else ids "0" … "1681").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

DIM = 32


class Body(BaseModel):
    history: list[str] = []
    k: int = 10


def create() -> FastAPI:
    path = os.environ.get("FEDREC_REF_IDS")
    ids = Path(path).read_text(encoding="utf-8").split() if path else [str(i) for i in range(1682)]
    n = len(ids)
    row = {x: i for i, x in enumerate(ids)}
    emb = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)  # (N, d)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/recommend")
    async def recommend(body: Body) -> dict[str, Any]:
        rows = [row[x] for x in body.history if x in row]
        u = emb[rows].mean(0) if rows else np.zeros(DIM, dtype=np.float32)  # (d,)
        s = emb @ u  # (N,)
        k = min(body.k, n)
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top])]
        return {"items": [{"item": ids[i], "score": float(s[i])} for i in top.tolist()]}

    return app

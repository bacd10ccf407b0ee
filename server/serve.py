"""``fedrec serve``: the HTTP API of CONTRACT.md over one loaded model, reloadable without downtime.

Layers, each a few lines thick:

* :class:`Engine` — one loaded model ready to answer: the shared :class:`Recommender` (the one ranking
  path), plus MMR diversity and leave-one-out explanations. Pure Python, no HTTP.
* :class:`ModelHolder` — the current engine; :meth:`ModelHolder.reload` loads a newer checkpoint
  next to it and swaps one reference, so a request in flight finishes on the engine it started with
  and none is dropped.
* :func:`create_app` — FastAPI app: pydantic request models with bounds, a body-size limit (413),
  optional bearer keys (401), validation errors as 4xx without echoing the body, reload on file change
  or SIGHUP.

Privacy: request bodies (histories) are never logged, by us or by uvicorn's access log (request
line and status only); validation errors do not echo the input back either.

Empty history (or only unknown items): the model is scored with an empty history, i.e. a zero user
vector, so the ranking is the model's learned item prior — MLP(0, v_i) + b_i — which the training on
sampled negatives makes popularity-like (the item bias grows with how often an item is a positive).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from fedrec.shared_model.artifacts import LoadedModel, load_model
from fedrec.shared_model.diversity import mmr, unit_rows
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.explain import explain
from fedrec.shared_model.quantize import quantize_for_serving
from fedrec.shared_model.ranking import mask_items
from fedrec.shared_model.recommend import Recommender, now_context

log = logging.getLogger("fedrec.serve")

MAX_K = 1000  # most items one request may ask for
MAX_HISTORY = 5000  # most ids in ``history`` (and in ``exclude``); the model reads the latest 200
MAX_ID_CHARS = 64  # longest item id accepted
MAX_BODY_BYTES = 256 * 1024  # request body limit (413 above); 2 × 5000 ids fit with room to spare
EXPLAIN_TOP = 3  # history items named per explained recommendation

ItemId = StrictInt | Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


# ------------------------------------------------------------------ API models
class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description="Item ids the user interacted with, oldest first.",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="How many items to return.")
    exclude: list[ItemId] = Field(
        default_factory=list, max_length=MAX_HISTORY, description="Item ids never to recommend."
    )
    explain: bool = Field(False, description="Add the history items that contributed most to each item.")
    diversity: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="MMR trade-off: 0 = pure relevance."
    )


class Because(BaseModel):
    item: str
    title: str
    contribution: float = Field(description="Drop of the item's score when this history item is left out.")


class RecommendedItem(BaseModel):
    item: str
    score: float
    title: str
    because: list[Because] | None = None


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model: str = Field(description="Run id of the model that answered.")
    unknown: list[str] = Field(description="History ids not in the model's catalogue (ignored).")


class ItemInfo(BaseModel):
    item: str
    title: str
    genres: list[str]
    year: int | None


# ------------------------------------------------------------------ engine
class Engine:
    """One loaded model ready to answer requests (no HTTP here)."""

    def __init__(self, loaded: LoadedModel, *, int8: bool = False) -> None:
        self.int8 = int8
        self.rec = Recommender(quantize_for_serving(loaded) if int8 else loaded)
        self.run_id = loaded.run_id
        cat = loaded.catalog
        self.item_ids, self.titles = cat.item_ids, cat.titles
        self._n_feats = len(loaded.model.cfg.user_cardinalities)
        self._cap = loaded.sampling.max_eval_history
        # Similarity space of MMR: genres when the catalogue has them, else the item embeddings.
        has_genres = cat.genres.shape[1] > 0 and bool(cat.genres.any())
        vecs = cat.genres if has_genres else self.rec.model.item_side()[0].numpy()
        self._unit = unit_rows(vecs)

    def recommend(
        self,
        history: list[str],
        *,
        k: int = 10,
        exclude: list[str] | None = None,
        explain_items: bool = False,
        diversity: float = 0.0,
    ) -> dict[str, Any]:
        """The body of a ``/v1/recommend`` answer."""
        known, unknown = self.rec.to_indices(history)
        ex_known, _ = self.rec.to_indices(exclude or [])
        ctx = now_context()
        if diversity == 0.0:
            r = self.rec.recommend([known], k=k, exclude=[ex_known], context=ctx)[0]
            items, scores = r.items, r.scores
        else:
            s = self.rec.scores([known], ctx)  # (1, N)
            mask_items(s, [known], [ex_known])
            items, scores = mmr(s[0], self._unit, k, diversity)
        out = [
            {"item": self.item_ids[i], "score": float(sc), "title": self.titles[i]}
            for i, sc in zip(items.tolist(), scores.tolist(), strict=True)
        ]
        if explain_items:
            seen = known[-self._cap :]
            reasons = explain(self.rec.model, seen, items, ctx, self._n_feats, top=EXPLAIN_TOP)
            for row, rs in zip(out, reasons, strict=True):
                row["because"] = [
                    {
                        "item": self.item_ids[x.item],
                        "title": self.titles[x.item],
                        "contribution": x.contribution,
                    }
                    for x in rs
                ]
        return {"items": out, "model": self.run_id, "unknown": list(dict.fromkeys(unknown))}

    def item(self, item_id: str) -> dict[str, Any] | None:
        j = self.rec.index.get(item_id)
        if j is None:
            return None
        cat = self.rec.catalog
        year = int(cat.years[j])
        genres = [cat.genre_names[g] for g in np.flatnonzero(cat.genres[j])]
        return {"item": item_id, "title": cat.titles[j], "genres": genres, "year": year or None}


def _signature(model_dir: Path) -> tuple[tuple[int, int, int], ...]:
    """(inode, size, mtime) of model.pt and model.json: changes whenever a checkpoint is written."""
    sig = []
    for name in ("model.pt", "model.json"):
        try:
            st = (model_dir / name).stat()
        except FileNotFoundError:
            sig.append((0, 0, 0))
        else:
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sig)


class ModelHolder:
    """The engine in service; :meth:`reload` swaps in a newer checkpoint atomically."""

    def __init__(self, model_dir: Path, *, int8: bool = False) -> None:
        self.model_dir, self.int8 = model_dir, int8
        self._lock = threading.Lock()  # one reload at a time
        self.signature = _signature(model_dir)
        self.engine = Engine(load_model(model_dir), int8=int8)  # start-up errors surface here
        self.reloads = 0

    def changed(self) -> bool:
        return _signature(self.model_dir) != self.signature

    def reload(self) -> bool:
        """Load the checkpoint on disk and swap it in; False (old model kept) if unchanged or unusable.

        A checkpoint caught half-written (files changing during the load, or inconsistent) is not
        used; the next poll or SIGHUP retries.
        """
        with self._lock:
            before = _signature(self.model_dir)
            if before == self.signature:
                return False
            try:
                engine = Engine(load_model(self.model_dir), int8=self.int8)
            except FedrecError as e:
                log.warning("reload skipped, keeping model %s: %s", self.engine.run_id, e)
                return False
            if _signature(self.model_dir) != before:
                log.info("checkpoint changed while loading; will retry")
                return False
            old, self.engine, self.signature = self.engine.run_id, engine, before
            self.reloads += 1
            log.info("reloaded model: %s → %s", old, engine.run_id)
            return True


# ------------------------------------------------------------------ HTTP plumbing
def read_api_keys(path: Path) -> frozenset[str]:
    """Bearer keys, one per line (blank lines and ``#`` comments ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FedrecError(f"cannot read --api-keys file {path}: {e}") from None
    keys = frozenset(s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#"))
    if not keys:
        raise FedrecError(f"--api-keys file {path} holds no key (one key per line)")
    return keys


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (declared or streamed), before it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reject(send, 400, "invalid Content-Length")
                return
            if int(declared) > self.max_bytes:
                await self._reject(send, 413, f"request body over {self.max_bytes} bytes")
                return
        seen, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a truncated body is replaced by the 413 below
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not started:
            await self._reject(send, 413, f"request body over {self.max_bytes} bytes")


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """422 (400 for unparsable JSON) listing what is wrong, without echoing the input (histories)."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(x) for x in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()[:20]
    ]
    status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return JSONResponse({"detail": errors}, status_code=status)


def create_app(
    model_dir: Path,
    *,
    api_keys_file: Path | None = None,
    int8: bool = False,
    reload_on_change: bool = False,
    reload_poll_s: float = 1.0,
    reload_on_sighup: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The serving app for the model in ``model_dir`` (loaded now: a bad RUN_DIR fails here).

    ``reload_on_change`` polls model.pt/model.json every ``reload_poll_s`` seconds;
    ``reload_on_sighup`` reloads on SIGHUP (needs the main thread's event loop, as under uvicorn).
    """
    holder = ModelHolder(Path(model_dir), int8=int8)
    keys = read_api_keys(api_keys_file) if api_keys_file is not None else None
    bearer = HTTPBearer(auto_error=False, description="Only when the server runs with --api-keys.")

    def authorize(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if keys is None:
            return
        token = cred.credentials.encode() if cred is not None else b""
        ok = False
        for key in keys:  # compare against every key: timing does not tell which one matched
            ok |= hmac.compare_digest(token, key.encode())
        if not ok:
            raise HTTPException(
                401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    async def reload_now() -> None:
        if await asyncio.to_thread(holder.reload):
            log.info("serving %s", holder.engine.run_id)

    async def poll_changes() -> None:
        while True:
            await asyncio.sleep(reload_poll_s)
            if holder.changed():
                await reload_now()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        if reload_on_change:
            tasks.add(loop.create_task(poll_changes()))
        hup = False
        if reload_on_sighup:
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: tasks.add(loop.create_task(reload_now())))
                hup = True
            except (NotImplementedError, RuntimeError, ValueError) as e:
                log.warning("SIGHUP reload unavailable here: %s", e)
        eng = holder.engine
        log.info("serving model %s (%d items%s)", eng.run_id, len(eng.item_ids), ", int8" if eng.int8 else "")
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="fedrec serving API",
        version="1",
        summary="Top-K recommendations for any history from a fedrec model (CONTRACT.md).",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    secured = [Depends(authorize)]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        eng = holder.engine
        return {"status": "ok", "model": eng.run_id, "items": len(eng.item_ids), "int8": eng.int8}

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=secured)
    async def recommend(req: RecommendRequest) -> JSONResponse:
        # Sub-millisecond and GIL-bound: computed on the event loop, without a thread hop.
        body = holder.engine.recommend(
            [str(x) for x in req.history],
            k=req.k,
            exclude=[str(x) for x in req.exclude],
            explain_items=req.explain,
            diversity=req.diversity,
        )
        return JSONResponse(body)

    @app.get("/v1/items/{item_id}", response_model=ItemInfo, dependencies=secured)
    async def item(item_id: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]) -> dict[str, Any]:
        info = holder.engine.item(item_id)
        if info is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        return info

    return app


# ------------------------------------------------------------------ running
def run(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys_file: Path | None = None,
    int8: bool = False,
    reload_on_change: bool = False,
    threads: int = 1,
    log_level: str = "info",
) -> None:
    """Load, then serve until SIGINT/SIGTERM (in-flight requests finish; 10 s grace)."""
    import torch
    import uvicorn

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    app = create_app(
        model_dir,
        api_keys_file=api_keys_file,
        int8=int8,
        reload_on_change=reload_on_change,
        reload_on_sighup=True,
    )
    log.info("model loaded in %.2f s", time.perf_counter() - t0)
    if api_keys_file is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-keys: anyone who can reach it can query the model", host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=True,  # request line and status only: bodies (histories) are never logged
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    uvicorn.Server(config).run()

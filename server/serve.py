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
import gc
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from fedrec.shared_model.artifacts import LoadedModel, load_model
from fedrec.shared_model.diversity import pool_size, unit_rows
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.explain import explain
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.quantize import quantize_for_serving
from fedrec.shared_model.recommend import Recommender, now_context

log = logging.getLogger("fedrec.serve")

MAX_K = 1000  # most items one request may ask for
MAX_HISTORY = 5000  # most ids in ``history`` (and in ``exclude``); the model reads the latest 200
MAX_ID_CHARS = 64  # longest item id accepted
MAX_BODY_BYTES = 256 * 1024  # request body limit (413 above); 2 × 5000 ids fit with room to spare
EXPLAIN_TOP = 3  # history items named per explained recommendation
PT_ONLY_QUIET_S = 1.0  # --reload-on-change: how long a model.pt changed alone must hold still
# --batch-wait-ms by worker count (docs/BENCHMARKS.md, quiet interleaved runs at ml-100k, c = 16): one
# worker sees every connection, so a 1 ms wait fills batches; with several workers each sees a share
# of them, batches stay small, and a shorter wait leaves the CPU to the other worker (0.2 ms ahead).
BATCH_WAIT_MS_ONE_WORKER = 1.0
BATCH_WAIT_MS_SEVERAL_WORKERS = 0.2


def default_batch_wait_ms(workers: int) -> float:
    """``serve``'s micro-batch wait when ``--batch-wait-ms`` is not given, by worker count."""
    return BATCH_WAIT_MS_ONE_WORKER if workers <= 1 else BATCH_WAIT_MS_SEVERAL_WORKERS


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
@dataclass(frozen=True)
class Query:
    """One request, parsed against one engine's catalogue (dense indices), ready to rank."""

    engine: Engine  # the engine whose catalogue the indices refer to (and that must answer)
    known: np.ndarray  # (L,) history items in the catalogue, oldest first
    exclude: np.ndarray  # (E,) items never to recommend
    unknown: list[str]  # history ids not in the catalogue, first occurrence order, once each
    k: int = 10
    explain: bool = False
    diversity: float = 0.0


class Engine:
    """One loaded model ready to answer requests (no HTTP here)."""

    def __init__(self, loaded: LoadedModel, *, int8: bool = False, candidates: int | None = 0) -> None:
        """``candidates``: items the MLP re-ranks per request (0 = exact, None = auto; ``Recommender``)."""
        self.int8 = int8
        served = quantize_for_serving(loaded) if int8 else loaded
        fp32 = loaded.model if int8 and isinstance(loaded.model, HistoryMLP) else None
        self.rec = Recommender(served, candidates=candidates, retrieval_model=fp32)
        self.run_id = loaded.run_id
        cat = loaded.catalog
        self.item_ids, self.titles = cat.item_ids, cat.titles
        self._n_feats = len(loaded.model.cfg.user_cardinalities)
        self._cap = loaded.sampling.max_eval_history
        self._unit, self._rows = _similarity_space(self.rec)

    def query(
        self,
        history: list[str],
        *,
        k: int = 10,
        exclude: list[str] | None = None,
        explain_items: bool = False,
        diversity: float = 0.0,
    ) -> Query:
        """Map ids to this engine's dense indices (a dict lookup per id: O(history), not O(catalogue))."""
        known, unknown = self.rec.to_indices(history)
        ex_known, _ = self.rec.to_indices(exclude or [])
        return Query(self, known, ex_known, list(dict.fromkeys(unknown)), k, explain_items, diversity)

    def answer(self, queries: Sequence[Query]) -> list[dict[str, Any]]:
        """The bodies of many ``/v1/recommend`` answers from ONE scoring call (catalogue or candidates).

        Each row gets the same masking (history and excluded items), top-K or MMR diversity and
        explanations as if it had been asked alone.
        """
        assert all(q.engine is self for q in queries), "queries must be parsed by the engine answering"
        ctx = now_context()
        need = max(pool_size(q.k) if q.diversity > 0 else q.k for q in queries)  # candidates a row needs
        exclude = [q.exclude for q in queries] if any(len(q.exclude) for q in queries) else None
        ranked = self.rec.rank_scores([q.known for q in queries], exclude, ctx, min_candidates=need)
        picks: list[tuple[np.ndarray, np.ndarray]] = [(_NO_ITEMS, _NO_SCORES)] * len(queries)
        plain = [b for b, q in enumerate(queries) if q.diversity == 0.0]
        if plain:
            rows = None if len(plain) == len(queries) else plain
            idx, sc = ranked.top(max(queries[b].k for b in plain), rows)  # a prefix of each is its top-k
            for j, b in enumerate(plain):
                i, v = idx[j, : queries[b].k], sc[j, : queries[b].k]
                keep = i >= 0
                picks[b] = (i[keep], v[keep])
        for b, q in enumerate(queries):
            if q.diversity != 0.0:
                picks[b] = ranked.mmr(b, self._unit, q.k, q.diversity, self._rows)
        return [self._body(q, *pick, ctx) for q, pick in zip(queries, picks, strict=True)]

    def _body(self, q: Query, items: np.ndarray, scores: np.ndarray, ctx: np.ndarray) -> dict[str, Any]:
        ids, titles = self.item_ids, self.titles
        out = [
            {"item": ids[i], "score": sc, "title": titles[i]}
            for i, sc in zip(items.tolist(), scores.tolist(), strict=True)
        ]
        if q.explain:
            seen = q.known[-self._cap :]
            reasons = explain(self.rec.model, seen, items, ctx, self._n_feats, top=EXPLAIN_TOP)
            for row, rs in zip(out, reasons, strict=True):
                row["because"] = [
                    {"item": ids[x.item], "title": titles[x.item], "contribution": x.contribution} for x in rs
                ]
        return {"items": out, "model": self.run_id, "unknown": q.unknown}

    def recommend(self, history: list[str], **options: Any) -> dict[str, Any]:
        """The body of a ``/v1/recommend`` answer for one request (``options``: those of :meth:`query`)."""
        return self.answer([self.query(history, **options)])[0]

    def item(self, item_id: str) -> dict[str, Any] | None:
        j = self.rec.index.get(item_id)
        if j is None:
            return None
        cat = self.rec.catalog
        year = int(cat.years[j])
        genres = [cat.genre_names[g] for g in np.flatnonzero(cat.genres[j])]
        return {"item": item_id, "title": cat.titles[j], "genres": genres, "year": year or None}


_NO_ITEMS, _NO_SCORES = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)


def _similarity_space(rec: Recommender) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit item vectors for MMR and, where items share rows, the row of each item (see ``mmr``).

    Genres when the catalogue has them; else the MLP's item vectors, or a DP-EASE model's rows of B
    over its support (every item outside it shares one zero row: M + 1 rows, not N × M floats).
    """
    cat, model = rec.catalog, rec.model
    if cat.genres.shape[1] > 0 and bool(cat.genres.any()):
        return unit_rows(cat.genres), None
    if isinstance(model, ItemReleaseModel):
        if model.cfg.n_support:
            m = model.cfg.n_support
            vecs = np.zeros((m + 1, m), dtype=np.float32)  # (M + 1, M), row M = outside the support
            vecs[:m] = model.weights.numpy()
            return unit_rows(vecs), model.column_of[: model.cfg.n_items].numpy()
        return unit_rows(model.prior.numpy()[:, None]), None
    return unit_rows(model.item_side()[0].numpy()), None


class Batcher:
    """Micro-batching: requests that arrive together are ranked in one :meth:`Engine.answer` call.

    The first request of a batch waits while more keep coming: one pass of the event loop at a time
    (requests already received get parsed and join), for at most ``max_wait_s``, and only as long as
    the last pass brought someone new. A lone request therefore pays two loop passes (event-loop
    callbacks: no task), never more than ``max_wait_s``; under load a batch fills while the previous
    one is computed. ``max_wait_s = 0``
    ranks every request on its own. The ranking runs on the event loop (it is GIL-bound Python and
    torch, sub-millisecond per row): no thread hop.
    """

    def __init__(self, *, max_wait_s: float = 0.001, max_batch: int = 64) -> None:
        if not 0.0 <= max_wait_s <= 1.0 or max_batch < 1:
            raise ValueError(f"need 0 ≤ max_wait_s ≤ 1 and max_batch ≥ 1, got {max_wait_s}, {max_batch}")
        self.max_wait_s, self.max_batch = max_wait_s, max_batch
        self._pending: list[tuple[Query, asyncio.Future[dict[str, Any]]]] = []
        self._collecting = False
        self.batches = self.requests = 0  # counters, read by tests and the benchmark

    async def submit(self, q: Query) -> dict[str, Any]:
        if self.max_wait_s == 0.0:
            self.batches, self.requests = self.batches + 1, self.requests + 1
            return q.engine.answer([q])[0]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append((q, fut))
        if not self._collecting:
            self._start_collecting(loop)
        return await fut

    def _start_collecting(self, loop: asyncio.AbstractEventLoop) -> None:
        # Event-loop callbacks, not a task: a lone request pays two loop passes and no coroutine.
        self._collecting = True
        loop.call_soon(self._pass, loop, loop.time() + self.max_wait_s, -1)

    def _pass(self, loop: asyncio.AbstractEventLoop, deadline: float, before: int) -> None:
        """After each event-loop pass: wait one more while the last one brought someone new."""
        n = len(self._pending)
        if n > before and n < self.max_batch and loop.time() < deadline:
            loop.call_soon(self._pass, loop, deadline, n)  # received requests get parsed and join
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._collecting = False
        if self._pending:  # more than one batch's worth arrived: the rest goes next
            self._start_collecting(loop)
        self._run(batch)

    def _run(self, batch: list[tuple[Query, asyncio.Future[dict[str, Any]]]]) -> None:
        self.batches, self.requests = self.batches + 1, self.requests + len(batch)
        by_engine: dict[int, list[tuple[Query, asyncio.Future[dict[str, Any]]]]] = {}
        for item in batch:  # a reload between parse and ranking: each query stays on its engine
            by_engine.setdefault(id(item[0].engine), []).append(item)
        for group in by_engine.values():
            try:
                bodies = group[0][0].engine.answer([q for q, _ in group])
            except Exception as e:
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), body in zip(group, bodies, strict=True):
                if not fut.done():  # a client that went away cancelled its future
                    fut.set_result(body)


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

    def __init__(self, model_dir: Path, *, int8: bool = False, candidates: int | None = 0) -> None:
        self.model_dir, self.int8, self.candidates = model_dir, int8, candidates
        self._lock = threading.Lock()  # one reload at a time
        self.signature = _signature(model_dir)
        self.engine = self._load()  # start-up errors surface here
        self.reloads = 0

    def _load(self) -> Engine:
        return Engine(load_model(self.model_dir), int8=self.int8, candidates=self.candidates)

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
                engine = self._load()
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


class OrjsonResponse(JSONResponse):
    """FastAPI's JSON response class, encoded by orjson (several times faster than ``json.dumps``)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


_FIELDS = frozenset(("history", "k", "exclude", "explain", "diversity"))


def _ids(v: object) -> list[str] | None:
    """``history`` / ``exclude`` as the route reads them (``str`` of each id), if plainly valid; else None."""
    if type(v) is not list or len(v) > MAX_HISTORY:
        return None
    for x in v:
        t = type(x)
        if not (t is int or (t is str and 0 < len(x) <= MAX_ID_CHARS)):
            return None
    return [x if type(x) is str else str(x) for x in v]


def fast_request(body: bytes) -> dict[str, Any] | None:
    """The fields of a ``/v1/recommend`` body that :class:`RecommendRequest` accepts as they are, else None.

    The fast path of :class:`FastRecommend`: a JSON object of known fields with values of the exact
    types and bounds of the pydantic model (ids: int or a 1–64-character string; ``k`` an int in
    1..MAX_K; ``explain`` a bool; ``diversity`` a number in [0, 1]). Only bodies the model would take
    unchanged pass; anything else (a coercion, a bound, a parse error, an unknown field…) returns
    None and goes through FastAPI and pydantic, which answer it exactly as before.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or not _FIELDS.issuperset(obj):
        return None
    history = _ids(obj.get("history", []))
    exclude = _ids(obj.get("exclude", []))
    k, explain_items, diversity = obj.get("k", 10), obj.get("explain", False), obj.get("diversity", 0.0)
    if history is None or exclude is None or type(k) is not int or not 1 <= k <= MAX_K:
        return None
    if type(explain_items) is not bool or type(diversity) not in (int, float) or not 0.0 <= diversity <= 1.0:
        return None
    return {
        "history": history,
        "k": k,
        "exclude": exclude,
        "explain_items": explain_items,
        "diversity": float(diversity),
    }


_JSON_HEADERS = [(b"content-type", b"application/json")]


class FastRecommend:
    """ASGI middleware: ``POST /v1/recommend`` answered without FastAPI's routing, dependency injection
    and pydantic validation, for the requests whose answer needs none of them.

    The request must carry a JSON content type, a ``Content-Length`` within the body limit, a valid
    bearer key where keys are required, and a body :func:`fast_request` accepts. It is then parsed by
    orjson, ranked through the same :class:`Batcher` and :class:`Engine` as the route, and answered
    with the same JSON body and headers. Every other request (other paths, bad or odd input, a missing
    key, a chunked body) goes to the app with its body replayed, and gets exactly the answer it got
    before: 4xx with its message, 401, 413. What it skips (routing, the ``Depends`` graph, the body's
    validation, the response class, the body-limit wrapper) was ~0.3 ms of a lone ml-100k request
    (in-process: 0.71–0.87 → 0.46–0.52 ms; docs/BENCHMARKS.md, serve).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        holder: ModelHolder,
        batcher: Batcher,
        keys: frozenset[str] | None,
        max_bytes: int,
        counts: dict[str, int],
    ) -> None:
        self.app, self.holder, self.batcher, self.max_bytes = app, holder, batcher, max_bytes
        self.keys = None if keys is None else [k.encode() for k in keys]
        self.counts = counts  # requests answered here ("fast") and passed on ("app"); read by tests

    def _eligible(self, headers: list[tuple[bytes, bytes]]) -> bool:
        length = ctype = auth = None
        n_length = 0
        for name, value in headers:
            if name == b"content-length":
                length, n_length = value, n_length + 1
            elif name == b"content-type" and ctype is None:
                ctype = value
            elif name == b"authorization" and auth is None:
                auth = value
        if n_length != 1 or length is None or not length.isdigit() or not 0 < int(length) <= self.max_bytes:
            return False
        if ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
            return False
        if self.keys is not None:  # the check of the route's ``authorize`` (HTTPBearer's parsing)
            scheme, _, token = (auth or b"").decode("latin-1").partition(" ")
            tok = token.strip().encode("latin-1")
            ok = False
            for key in self.keys:  # compare against every key: timing does not tell which one matched
                ok |= hmac.compare_digest(tok, key)
            if scheme.lower() != "bearer" or not tok or not ok:
                return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != "/v1/recommend"
            or scope["method"] != "POST"
            or not self._eligible(scope["headers"])
        ):
            if scope["type"] == "http" and scope["path"] == "/v1/recommend":
                self.counts["app"] += 1
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away before sending its body
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        fields = fast_request(body)
        if fields is None:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            self.counts["app"] += 1
            await self.app(scope, replay, send)
            return
        self.counts["fast"] += 1
        eng = self.holder.engine
        answer = orjson.dumps(await self.batcher.submit(eng.query(fields.pop("history"), **fields)))
        headers = [(b"content-length", str(len(answer)).encode()), *_JSON_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


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
    return OrjsonResponse({"detail": errors}, status_code=status)


def create_app(
    model_dir: Path,
    *,
    api_keys_file: Path | None = None,
    int8: bool = False,
    reload_on_change: bool = False,
    reload_poll_s: float = 1.0,
    reload_on_sighup: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    batch_wait_ms: float = 1.0,
    max_batch: int = 64,
    candidates: int | None = 0,
    holder: ModelHolder | None = None,
    fast_path: bool = True,
) -> FastAPI:
    """The serving app for the model in ``model_dir`` (loaded now: a bad RUN_DIR fails here).

    ``reload_on_change`` polls model.pt/model.json every ``reload_poll_s`` seconds;
    ``reload_on_sighup`` reloads on SIGHUP (needs the main thread's event loop, as under uvicorn).
    ``batch_wait_ms`` bounds how long a request may wait for others to share its ranking call
    (:class:`Batcher`; 0 = no micro-batching), ``max_batch`` how many share one. ``candidates``: how
    many items an MLP re-ranks per request (0 = the exact full-catalogue pass, None = auto by catalogue
    size; ``fedrec.shared_model.recommend``). ``holder``: an already loaded model. ``fast_path``:
    answer plainly valid ``/v1/recommend`` requests without FastAPI's layers (:class:`FastRecommend`;
    False only to compare the two).
    """
    if not 0.0 <= batch_wait_ms <= 1000.0:
        raise FedrecError(f"batch wait must be within 0..1000 ms, got {batch_wait_ms}")
    holder = ModelHolder(Path(model_dir), int8=int8, candidates=candidates) if holder is None else holder
    batcher = Batcher(max_wait_s=batch_wait_ms / 1000.0, max_batch=max_batch)
    keys = read_api_keys(api_keys_file) if api_keys_file is not None else None
    bearer = HTTPBearer(auto_error=False, description="Only when the server runs with --api-keys.")

    # async: a sync dependency would cost every request a hop to the thread pool.
    async def authorize(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
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
        # A checkpoint is model.pt, then model.json (save_model writes it last). Reload once the
        # change has held still for one poll and model.json is part of it, or, for a model.pt
        # rewritten alone, once it has held still for PT_ONLY_QUIET_S: a poll between the two writes
        # must not swap in the new model.pt with the old model.json (and reload again right after).
        loop = asyncio.get_running_loop()
        pending: object = None
        since = 0.0
        while True:
            await asyncio.sleep(reload_poll_s)
            sig = _signature(holder.model_dir)
            if sig == holder.signature:
                pending = None
            elif sig != pending:
                pending, since = sig, loop.time()
            elif sig[1] != holder.signature[1] or loop.time() - since >= PT_ONLY_QUIET_S:
                pending = None
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
        how = f"MLP re-ranks {eng.rec.candidates} candidates" if eng.rec.candidates else "exact ranking"
        if eng.rec.auto_check is not None:
            how += f"; --candidates auto: {eng.rec.auto_check.reason}"
        log.info("serving model %s (%d items, %s%s)", eng.run_id, len(eng.item_ids), how, ", int8" * eng.int8)
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
        default_response_class=OrjsonResponse,
    )
    app.state.holder, app.state.batcher = holder, batcher
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.fast_path = {"fast": 0, "app": 0}  # /v1/recommend requests by who answered them
    if fast_path:  # added last: the outermost of the two
        app.add_middleware(
            FastRecommend,
            holder=holder,
            batcher=batcher,
            keys=keys,
            max_bytes=max_body_bytes,
            counts=app.state.fast_path,
        )
    secured = [Depends(authorize)]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        eng = holder.engine
        return {
            "status": "ok",
            "model": eng.run_id,
            "items": len(eng.item_ids),
            "int8": eng.int8,
            "candidates": eng.rec.candidates,
            "candidates_auto": None if eng.rec.auto_check is None else eng.rec.auto_check.to_json(),
            "batch_wait_ms": batcher.max_wait_s * 1000.0,
        }

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=secured)
    async def recommend(req: RecommendRequest) -> OrjsonResponse:
        q = holder.engine.query(
            [str(x) for x in req.history],
            k=req.k,
            exclude=[str(x) for x in req.exclude],
            explain_items=req.explain,
            diversity=req.diversity,
        )
        return OrjsonResponse(await batcher.submit(q))

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
    workers: int = 1,
    batch_wait_ms: float | None = None,
    max_batch: int = 64,
    candidates: int | None = 0,
) -> None:
    """Load, then serve until SIGINT/SIGTERM (in-flight requests finish; 10 s grace).

    ``workers`` > 1: the model is loaded ONCE here, then this process forks the workers, which share
    its pages copy-on-write (the weights are only read) and accept on one listening socket. SIGHUP
    and SIGINT/SIGTERM are forwarded to every worker; a reload gives each worker its own new copy.
    ``batch_wait_ms`` None: :func:`default_batch_wait_ms` of ``workers``.
    """
    import torch
    import uvicorn

    if workers < 1:
        raise FedrecError(f"--workers must be ≥ 1, got {workers}")
    torch.set_num_threads(threads)
    if batch_wait_ms is None:
        batch_wait_ms = default_batch_wait_ms(workers)
    t0 = time.perf_counter()
    app = create_app(
        model_dir,
        api_keys_file=api_keys_file,
        int8=int8,
        reload_on_change=reload_on_change,
        reload_on_sighup=True,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        candidates=candidates,
    )
    log.info(
        "model loaded in %.2f s; micro-batch wait %g ms (%d worker%s)",
        time.perf_counter() - t0, batch_wait_ms, workers, "s" * (workers > 1),
    )  # fmt: skip
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
    # The loaded objects (torch, FastAPI, the model) leave the GC's lists: the collections that
    # requests trigger then scan only what requests allocate, and workers do not touch shared pages.
    gc.collect()
    gc.freeze()
    if workers == 1:
        uvicorn.Server(config).run()
        return
    sock = config.bind_socket()  # one listening socket, inherited by every worker
    pids: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # worker: serve until told to stop, never return into the parent's code
            code = 0
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    sock.close()
    log.info("serving with %d workers (pids %s), model loaded once", workers, " ".join(map(str, pids)))

    def forward(signum: int, _frame: Any) -> None:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    failed = 0
    for p in pids:
        while True:
            try:
                _, status = os.waitpid(p, 0)
                break
            except ChildProcessError:
                status = 0
                break
            except InterruptedError:
                continue
        failed += os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM, -signal.SIGINT)
    if failed:
        raise FedrecError(f"{failed} of {workers} workers exited with an error")

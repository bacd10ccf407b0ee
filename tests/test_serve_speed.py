"""Serving at speed: micro-batching, the fast top-K, every model kind at 40k items, workers, the load bench.

Batched answers must be exactly the answers each request gets alone (masking, diversity,
explanations); the fast paths must equal the slow references they replace. Speed itself is measured
by ``fedrec bench serve`` (docs/BENCHMARKS.md), never asserted here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedrec.server.serve import Batcher, Engine, create_app
from fedrec.shared_model.artifacts import load_model, save_model
from fedrec.shared_model.data import Catalog
from fedrec.shared_model.diversity import mmr, unit_rows
from fedrec.shared_model.dp_item import DPEASE
from fedrec.shared_model.item_model import ItemReleaseModel
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.ranking import top_k
from fedrec.shared_model.training import SamplingConfig
from tests.test_serve import SERVE, free_port, new_checkpoint, served

BIG = 40_000  # a real-scale catalogue


def catalog(n: int, genres: bool) -> Catalog:
    rng = np.random.default_rng(1)
    g = (rng.random((n, 6)) < 0.3).astype(np.float32) if genres else np.zeros((n, 0), dtype=np.float32)
    names = tuple(f"g{j}" for j in range(g.shape[1]))
    return Catalog(
        item_ids=tuple(f"i{i}" for i in range(n)),
        titles=tuple(f"T{i}" for i in range(n)),
        genre_names=names,
        genres=g,
        years=np.zeros(n, dtype=np.int32),
    )


def write_model(out: Path, kind: str, n: int) -> Path:
    """A model of ``kind`` over ``n`` items (random weights: these tests check ranking mechanics)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cat = catalog(n, genres=kind == "mlp")
    model: HistoryMLP | ItemReleaseModel
    if kind == "mlp":
        model = HistoryMLP(ModelConfig(n_items=n, n_genres=6, dim=8, hidden=(16, 8)), cat.genres)
        with torch.no_grad():
            model.bias.weight.normal_(0, 1.0)  # type: ignore[union-attr]
    elif kind == "dp_ease":
        m = min(300, n)
        x = (rng.random((400, m)) < 0.05).astype(np.float64)
        support = np.sort(rng.choice(n, m, replace=False))
        fitted = DPEASE().fit_gram(x.T @ x, offdiag_std=0.0, diag_std=0.0, users=400, items=np.arange(m))
        fitted.items = support  # the same weights, over a support spread across the catalogue
        model = ItemReleaseModel.from_ease(fitted, n, kind="dp_ease", prior=rng.standard_normal(n))
    else:
        model = ItemReleaseModel.from_popularity(rng.poisson(3.0, n).astype(float), noise_std=1.0)
    save_model(out, model, cat, SamplingConfig(), run_id=f"{kind}-{n}")
    return out


@pytest.fixture(scope="module", params=["mlp", "dp_ease", "dp_popularity"])
def big_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_model(tmp_path_factory.mktemp(request.param) / "run", request.param, BIG)
    return Engine(load_model(path))


# ------------------------------------------------------------------ top-K
def test_fast_top_k_is_the_full_stable_sort() -> None:
    rng = np.random.default_rng(0)
    for t in range(400):
        b, n = int(rng.integers(1, 4)), int(rng.integers(2, 1000))  # both sides of the sort threshold (256)
        k = int(rng.integers(1, n + 3))
        s = (rng.integers(-2, 3, (b, n)) if t % 2 else rng.standard_normal((b, n))).astype(np.float32)
        s[rng.random((b, n)) < 0.3] = -np.inf  # masked items, many ties
        order = np.argsort(-s, axis=1, kind="stable")[:, : min(k, n)]
        best = np.take_along_axis(s, order, 1)
        order[np.isneginf(best)] = -1
        idx, sc = top_k(s, k)
        np.testing.assert_array_equal(idx, order)
        np.testing.assert_array_equal(sc, best)


# ------------------------------------------------------------------ item models
def test_dp_ease_row_sums_equal_the_binary_row_matmul(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path / "run", "dp_ease", 2000)).model
    assert isinstance(model, ItemReleaseModel)
    rng = np.random.default_rng(2)
    hist = torch.from_numpy(rng.integers(0, 2001, (6, 40)))  # pad (2000), repeats, out-of-support items
    hist[0] = 2000  # an empty history
    hist[1, :10] = int(model.items[3])  # one item ten times counts once
    want = model._support_rows(hist) @ model.weights
    torch.testing.assert_close(model._inside_scores(hist), want, rtol=1e-5, atol=1e-5)
    cand = torch.from_numpy(rng.integers(0, 2000, (6, 7)))
    torch.testing.assert_close(model(hist, cand), model.score_all(hist).gather(1, cand))


# ------------------------------------------------------------------ batching
def queries(eng: Engine) -> list[dict[str, object]]:
    ids = list(eng.item_ids)
    rng = np.random.default_rng(3)
    out: list[dict[str, object]] = []
    for j in range(7):
        h = [ids[i] for i in rng.choice(len(ids), 1 + 5 * j, replace=False)]
        ex = [ids[i] for i in rng.choice(len(ids), j, replace=False)]
        out.append(
            {
                "history": h + (["unknown-x"] if j == 2 else []),
                "k": [10, 1, 25, 5, 10, 3, 50][j],
                "exclude": ex,
                "explain_items": j in (1, 4),
                "diversity": 0.5 if j in (3, 4) else 0.0,
            }
        )
    out.append({"history": [], "k": 4, "exclude": [], "explain_items": False, "diversity": 0.0})
    return out


def test_a_batch_answers_every_kind_at_40k_items_as_each_request_alone(big_engine: Engine) -> None:
    eng = big_engine
    qs = queries(eng)
    alone = [eng.recommend(**q) for q in qs]  # type: ignore[arg-type]
    together = eng.answer([eng.query(**q) for q in qs])  # type: ignore[arg-type]
    assert [[x["item"] for x in a["items"]] for a in together] == [
        [x["item"] for x in a["items"]] for a in alone
    ]
    for q, a, b in zip(qs, alone, together, strict=True):
        np.testing.assert_allclose([x["score"] for x in b["items"]], [x["score"] for x in a["items"]], 1e-5)
        got = [x["item"] for x in b["items"]]
        banned = set(q["history"]) | set(q["exclude"])  # type: ignore[call-overload]
        assert len(got) == q["k"] and not set(got) & banned  # masking holds in a batch too
        assert ("because" in b["items"][0]) == q["explain_items"]
        if q["explain_items"]:
            assert b["items"] == a["items"]  # same explanations
        assert b["unknown"] == a["unknown"]


def test_mmr_with_shared_rows_equals_full_vectors() -> None:
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 6, 500)  # 500 items sharing 6 vectors
    vecs = unit_rows(rng.standard_normal((6, 4)))
    s = rng.standard_normal(500).astype(np.float32)
    a = mmr(s, vecs[rows], 10, 0.6)
    b = mmr(s, vecs, 10, 0.6, rows)
    np.testing.assert_array_equal(a[0], b[0])


def test_concurrent_requests_share_ranking_calls_and_get_their_own_answer(tmp_path: Path) -> None:
    path = write_model(tmp_path / "run", "mlp", 3000)
    eng = Engine(load_model(path))
    qs = queries(eng)[:6] * 4  # 24 requests in flight at once
    app = create_app(path, batch_wait_ms=1.0)
    batcher: Batcher = app.state.batcher
    answers: list[tuple[int, dict[str, object]]] = []
    barrier = threading.Barrier(len(qs))

    def one(i: int) -> None:
        q = dict(qs[i])
        body = {"history": q["history"], "k": q["k"], "exclude": q["exclude"]}
        body |= {"explain": q["explain_items"], "diversity": q["diversity"]}
        with httpx.Client(base_url=u, timeout=20) as c:
            barrier.wait()
            r = c.post("/v1/recommend", json=body)
            assert r.status_code == 200
            answers.append((i, r.json()))

    with served(app, log_level="warning") as u:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(qs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert batcher.requests == len(qs) and batcher.batches < len(qs), "nothing was batched"
        with httpx.Client(base_url=u, timeout=20) as c:  # a lone request is a batch of one
            before = batcher.batches
            assert c.post("/v1/recommend", json={"history": ["i1"]}).status_code == 200
            assert batcher.batches == before + 1
    assert len(answers) == len(qs)
    for i, got in answers:
        want = eng.recommend(**qs[i])  # type: ignore[arg-type]
        assert [x["item"] for x in got["items"]] == [x["item"] for x in want["items"]]  # type: ignore[index, union-attr]


def test_batch_wait_is_bounded(tmp_path: Path) -> None:
    path = write_model(tmp_path / "run", "dp_popularity", 50)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(max_wait_s=2.0)
    app = create_app(path, batch_wait_ms=0.0)  # 0 = every request ranked on its own
    with served(app, log_level="warning") as u, httpx.Client(base_url=u) as c:
        assert c.post("/v1/recommend", json={"history": ["i1"], "k": 3}).status_code == 200
        assert c.get("/healthz").json()["batch_wait_ms"] == 0.0
    assert app.state.batcher.batches == 1


# ------------------------------------------------------------------ processes (slow)
def start(cmd: list[str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.slow
def test_workers_share_one_model_reload_on_sighup_and_stop_cleanly(tmp_path: Path) -> None:
    work = write_model(tmp_path / "run", "mlp", 500)
    old = load_model(work)
    save_model(work, old.model, old.catalog, old.sampling, run_id="first")
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", "--model", str(work), "--port", str(port), "--workers", "2"]
    proc = start(cmd, port)
    base = f"http://127.0.0.1:{port}"
    try:
        kids = children(proc.pid)
        assert len(kids) == 2
        with httpx.Client(base_url=base, timeout=10) as c:
            # no --batch-wait-ms: several workers get the shorter default (docs/BENCHMARKS.md)
            assert c.get("/healthz").json()["batch_wait_ms"] == 0.2
            for _ in range(40):
                assert c.post("/v1/recommend", json={"history": ["i1", "i2"]}).status_code == 200
        new_checkpoint(work, "after-hup", seed=3)
        proc.send_signal(signal.SIGHUP)  # forwarded to every worker
        deadline = time.monotonic() + 30
        while True:
            with httpx.Client(base_url=base, timeout=10) as c:  # new connections reach either worker
                models = {
                    c.get("/healthz", headers={"connection": "close"}).json()["model"] for _ in range(20)
                }
            if models == {"after-hup"}:
                break
            assert time.monotonic() < deadline, f"SIGHUP did not reload every worker: {models}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    for k in kids:
        status = Path(f"/proc/{k}/status")
        assert not status.exists() or "zombie" in status.read_text().lower(), "a worker outlived the server"


@pytest.mark.slow
def test_bench_serve_reports_a_run_and_a_reload_without_errors(tmp_path: Path) -> None:
    path = write_model(tmp_path / "run", "mlp", 500)
    out = tmp_path / "bench.json"
    gen = "wrk" if shutil.which("wrk") else "python"
    cmd = [sys.executable, "-c", SERVE, "bench", "serve", "--model", str(path), "--workers", "1"]
    cmd += ["--concurrency", "4", "--seconds", "2", "--generator", gen, "--reload-check", "--json", str(out)]
    cmd += ["--candidates", "0,100"]  # the exact MLP pass and a re-rank of 100, next to one reference
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    fed = [r for r in res["runs"] if r["server"] == "fedrec"]
    assert sorted(r["candidates_used"] for r in fed) == [0, 100]
    assert {r["batch_wait_ms"] for r in fed} == {1.0}  # no --batch-wait-ms: the server's 1-worker default
    for r in fed:
        assert r["errors"] == 0 and r["requests"] > 0
        assert r["ratio_to_reference"] > 0 and 0 < r["server_cpu_share"] <= 1
    assert res["reload_check"]["errors"] == 0 and res["reload_check"]["requests"] > 0
    assert "i1" not in out.read_text().replace('"items"', "")  # no history in the results
    bad = subprocess.run(
        [sys.executable, "-c", SERVE, "bench", "serve", "--model", str(path), "--generator", "curl"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--generator" in bad.stderr


@pytest.mark.slow
def test_sigterm_under_load_finishes_the_batched_requests_in_flight(tmp_path: Path) -> None:
    """Graceful shutdown with micro-batching (1 worker, the 1 ms default wait): SIGTERM while 8 clients
    post. Every response is a 200 (no 5xx, no batch cancelled half-way), requests in flight at the
    signal are still answered, new connections are refused, and the server exits 0 without a traceback.
    A connection the server had not yet read a request from may be closed (that is TCP, not an answer:
    counted, never a status)."""
    work = write_model(tmp_path / "run", "mlp", 500)
    port = free_port()
    proc = start([sys.executable, "-c", SERVE, "serve", "--model", str(work), "--port", str(port)], port)
    done: list[tuple[float, int]] = []  # (monotonic time of the answer, status)
    closed: list[str] = []
    refused = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        body = {"history": [f"i{i}", f"i{i + 10}", f"i{i + 20}"], "k": 10}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not refused.is_set():
                try:
                    r = c.post("/v1/recommend", json=body)
                except httpx.ConnectError:
                    refused.set()  # the listening socket is gone: the server is stopping
                    return
                except httpx.TransportError as e:  # a keep-alive connection closed by the stop
                    with lock:
                        closed.append(type(e).__name__)
                    continue
                with lock:
                    done.append((time.monotonic(), r.status_code))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)  # under load: every client has a request out at any moment
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        for t in threads:
            t.join(timeout=30)
    finally:
        refused.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out and "CancelledError" not in out, out
    statuses = [s for _, s in done]
    assert len(statuses) > 100 and set(statuses) == {200}, sorted(set(statuses))
    assert any(t > t_stop for t, _ in done), "no request in flight at SIGTERM was answered"
    assert all(name in ("RemoteProtocolError", "ReadError", "WriteError") for name in closed), closed

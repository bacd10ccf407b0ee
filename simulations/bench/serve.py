"""Load benchmark of ``fedrec serve`` on loopback, next to the in-process cost of one ranking call.

    .venv/bin/python -m fedrec.simulations.bench.serve --model RUN_DIR [--data /path/to/ml-100k] [--out bench.json]

1. In-process: median/p99 of ``Engine.recommend`` (what one request computes), fp32 and int8.
2. HTTP: starts ``fedrec serve`` on 127.0.0.1 (a free port) as a subprocess, drives it with an async
   httpx client at each concurrency (bounded by --requests and --seconds per level, after a warm-up),
   reports p50/p90/p99 latency, requests/s and errors, and stops the server. fp32, then --int8.
3. With --data: HR@10 of fp32 vs int8, and MMR diversity's intra-list diversity vs HR@10.

Client and server share the machine's cores, so the figures are a floor for what the server does alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

SERVE = "from fedrec.simulations.cli.main import main; main()"
HISTORY_LEN = 20  # items per benchmark history (ml-100k's median user has ~65; the model reads ≤ 200)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def in_process(
    model_dir: Path, histories: list[list[str]], *, int8: bool, calls: int = 2000
) -> dict[str, float]:
    import torch

    from fedrec.server.serve import Engine
    from fedrec.shared_model.artifacts import load_model

    torch.set_num_threads(1)
    eng = Engine(load_model(model_dir), int8=int8)
    for h in histories[:100]:
        eng.recommend(h, k=10)
    times = []
    for i in range(calls):
        t = time.perf_counter()
        eng.recommend(histories[i % len(histories)], k=10)
        times.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "mean_ms": float(np.mean(times))}


async def drive(base: str, histories: list[list[str]], conc: int, n: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        for h in histories[:50]:  # warm-up
            await client.post("/v1/recommend", json={"history": h, "k": 10})
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors, sent
            while sent < n and time.perf_counter() < deadline:
                h = histories[sent % len(histories)]
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/recommend", json={"history": h, "k": 10})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append((time.perf_counter() - t) * 1e3)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": conc,
        "requests": len(lat),
        "errors": errors,
        "req_per_s": len(lat) / wall,
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(model_dir: Path, *, int8: bool) -> Any:
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--log-level", "warning"] + (["--int8"] if int8 else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise SystemExit("server did not start within 60 s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def quality(model_dir: Path, data: str) -> dict[str, Any]:
    from fedrec.shared_model.artifacts import load_model
    from fedrec.shared_model.diversity import evaluate_mmr
    from fedrec.shared_model.evaluate import evaluate
    from fedrec.shared_model.quantize import quantize_for_serving
    from fedrec.shared_model.training import ModelScorer
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.sources import load

    loaded = load_model(model_dir)
    prepared = prepare_dataset(load(data))
    split, cat = prepared.split, prepared.catalog
    out: dict[str, Any] = {}
    for name, lm in (("fp32", loaded), ("int8", quantize_for_serving(loaded))):
        m = evaluate(ModelScorer(lm.model, lm.sampling), split, cat, which="test").to_metrics()["full"]
        out[name] = {"hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"], "ild@10": m["ild@10"]}
    scorer = ModelScorer(loaded.model, loaded.sampling)
    out["diversity"] = {
        str(lam): evaluate_mmr(scorer, split, cat, diversity=lam) for lam in (0.0, 0.2, 0.4, 0.6, 0.8)
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="RUN_DIR with model.pt + model.json")
    ap.add_argument("--data", help="dataset of the model (for HR@10 of int8 and diversity)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", type=int, default=3000, help="requests per concurrency level (max)")
    ap.add_argument("--seconds", type=float, default=15.0, help="time limit per concurrency level")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from fedrec.shared_model.artifacts import load_model

    ids = list(load_model(args.model).catalog.item_ids)
    rng = np.random.default_rng(0)
    histories = [[ids[i] for i in rng.choice(len(ids), HISTORY_LEN, replace=False)] for _ in range(500)]
    res: dict[str, Any] = {"history_len": HISTORY_LEN, "k": 10, "cpus": os.cpu_count()}
    for int8 in (False, True):
        name = "int8" if int8 else "fp32"
        res[name] = {"in_process": in_process(args.model, histories, int8=int8), "http": []}
        print(f"[{name}] in-process ranking: {res[name]['in_process']}", flush=True)
        with server(args.model, int8=int8) as base:
            for c in (int(x) for x in args.concurrency.split(",")):
                row = asyncio.run(drive(base, histories, c, args.requests, args.seconds))
                row["http_over_in_process_p50"] = row["p50_ms"] / res[name]["in_process"]["p50_ms"]
                res[name]["http"].append(row)
                print(f"[{name}] " + "  ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)
    if args.data:
        res["quality"] = quality(args.model, args.data)
        print(json.dumps(res["quality"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

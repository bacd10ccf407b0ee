"""Load benchmark of ``fedrec serve`` on loopback, against a trivial FastAPI top-K endpoint in the same run.

``fedrec bench serve --model RUN_DIR [--data DATA] [--workers 1,2] [--concurrency 1,16] ...``

For each worker count the server is started as a subprocess (``fedrec serve --workers N``), then the
reference endpoint (``fedrec.simulations.bench.reference``, same worker count, same catalogue size), and
each is driven at every concurrency level by ``wrk`` (1 thread, C connections, POST bodies drawn from
real histories by a Lua script) — or, where ``wrk`` is absent (or ``--generator python``), by an
asyncio httpx client, which is much slower and then the bottleneck. Reported per run: req/s,
p50/p90/p99 latency, errors (socket errors and non-2xx), CPU seconds of the server (all its processes)
and of the generator, the load average, and the ratio of req/s to the reference's. With several
workers, the unique memory (USS) of each worker next to the first worker's resident memory.
``--reload-check`` rewrites the model's checkpoint during a load run (the server runs with
``--reload-on-change``) and reports the errors seen (there must be none).

Bodies come from ``--data`` (each user's latest ``HISTORY_LEN`` items, in time order) or, without it,
are drawn from the catalogue with a long-tailed popularity. They exist only in a temporary file that
is deleted after the run; nothing of a history is printed or written to the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

SERVE = "from fedrec.simulations.cli.main import main; main()"
HISTORY_LEN = 20  # items per benchmark history (the model reads ≤ 200)
N_BODIES = 1000  # distinct request bodies per run
CLK_TCK = os.sysconf("SC_CLK_TCK")

WRK_LUA = r"""
local bodies, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = math.random(#bodies)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  i = i % #bodies + 1
  return wrk.format(nil, "/v1/recommend", nil, bodies[i])
end
function done(s, lat, req)
  local e = s.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    s.requests, s.duration, e.connect, e.read, e.write, e.status, e.timeout,
    lat:percentile(50), lat:percentile(90), lat:percentile(99), lat.max))
end
"""


# ------------------------------------------------------------------ bodies
def bodies_from(item_ids: list[str], data: str | None, *, n: int = N_BODIES, seed: int = 0) -> list[bytes]:
    """JSON request bodies: real histories from ``data``, else long-tailed draws from the catalogue."""
    rng = np.random.default_rng(seed)
    hists: list[list[str]] = []
    if data is not None:
        from fedrec.simulations.data.sources import load

        inter = load(data).interactions.sort_values(["user", "timestamp"], kind="stable")
        for _, items in inter.groupby("user", sort=False)["item"]:
            hists.append([str(x) for x in items.tolist()[-HISTORY_LEN:]])
        hists = [hists[i] for i in rng.permutation(len(hists))[:n]]
    else:
        p = 1.0 / np.arange(1, len(item_ids) + 1) ** 0.8  # Zipf-like popularity
        p /= p.sum()
        m = min(HISTORY_LEN, len(item_ids))
        hists = [[item_ids[i] for i in rng.choice(len(item_ids), m, replace=False, p=p)] for _ in range(n)]
    return [json.dumps({"history": h, "k": 10}).encode() for h in hists]


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (exited ones count 0)."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """Resident (RSS) and unique (USS: private pages) memory of one process, MB."""
    rss = uss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
    return {"rss_mb": rss / 1024, "uss_mb": uss / 1024}


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Start a server subprocess, wait for /healthz, stop it with SIGTERM at the end."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 120 s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fedrec_cmd(
    model: Path,
    port: int,
    workers: int,
    *,
    batch_wait_ms: float | None,
    reload: bool,
    candidates: str = "auto",
) -> list[str]:
    """``batch_wait_ms`` None: the server's default for ``workers`` (no ``--batch-wait-ms``)."""
    cmd = [sys.executable, "-c", SERVE, "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--workers", str(workers), "--log-level", "warning"]
    if batch_wait_ms is not None:
        cmd += ["--batch-wait-ms", str(batch_wait_ms)]
    cmd += ["--candidates", candidates]
    return cmd + (["--reload-on-change"] if reload else [])


def reference_cmd(port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--factory", "fedrec.simulations.bench.reference:create",
        "--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


# ------------------------------------------------------------------ generators
def run_wrk(base: str, bodies_file: Path, lua: Path, conc: int, seconds: float) -> dict[str, Any]:
    """One wrk run (1 thread, ``conc`` connections); its CPU time from the kernel's rusage."""
    cmd = ["wrk", "-t1", f"-c{conc}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(lua), base]
    proc = subprocess.Popen([*cmd, "--", str(bodies_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = (proc.stdout.read() if proc.stdout else b"").decode()
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        err = (proc.stderr.read() if proc.stderr else b"").decode()
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {err.strip() or out.strip()}")
    w = json.loads(line.removeprefix("WRKJSON "))
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    return {
        "requests": w["requests"],
        "errors": errors,
        "req_per_s": w["requests"] / (w["duration_us"] / 1e6),
        "p50_ms": w["p50_us"] / 1e3,
        "p90_ms": w["p90_us"] / 1e3,
        "p99_ms": w["p99_us"] / 1e3,
        "generator_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def _drive_python(base: str, bodies: list[bytes], conc: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = sent = 0
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors, sent
            while time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t = time.perf_counter()
                try:
                    ok = (await client.post("/v1/recommend", content=body, headers=headers)).is_success
                except httpx.HTTPError:
                    ok = False
                lat.append((time.perf_counter() - t) * 1e3)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "errors": errors,
        "req_per_s": len(lat) / wall,
        "p50_ms": _pct(lat, 50),
        "p90_ms": _pct(lat, 90),
        "p99_ms": _pct(lat, 99),
    }


def run_python(base: str, bodies: list[bytes], conc: int, seconds: float) -> dict[str, Any]:
    """The fallback generator (asyncio + httpx in this process); its CPU time from this process."""
    t0 = time.process_time()
    row = asyncio.run(_drive_python(base, bodies, conc, seconds))
    row["generator_cpu_s"] = time.process_time() - t0
    return row


# ------------------------------------------------------------------ the benchmark
def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats (errors summed)."""
    out: dict[str, Any] = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k != "errors"}
    out["requests"] = int(sum(r["requests"] for r in rows))
    out["errors"] = int(sum(r["errors"] for r in rows))
    out["repeats"] = len(rows)
    return out


def _measure(
    proc: subprocess.Popen[str],
    base: str,
    conc: int,
    seconds: float,
    generator: str,
    bodies: list[bytes],
    files: tuple[Path, Path],
) -> dict[str, Any]:
    pids = process_tree(proc.pid)
    cpu0 = cpu_seconds(pids)
    wrk = generator == "wrk"
    row = run_wrk(base, *files, conc, seconds) if wrk else run_python(base, bodies, conc, seconds)
    row["server_cpu_s"] = cpu_seconds(pids) - cpu0
    total = row["server_cpu_s"] + row["generator_cpu_s"]
    row["server_cpu_share"] = row["server_cpu_s"] / total if total > 0 else float("nan")
    return row


def _warm(base: str, bodies: list[bytes]) -> None:
    with httpx.Client(base_url=base, timeout=30, headers={"content-type": "application/json"}) as c:
        for b in bodies[:50]:
            c.post("/v1/recommend", content=b)


def _reload_during_load(model: Path, base: str, proc: subprocess.Popen[str], **kw: Any) -> dict[str, Any]:
    """One load run during which the served checkpoint is rewritten (atomically) twice."""
    import torch

    def rewrite() -> None:
        for _ in range(2):
            time.sleep(kw["seconds"] / 3)
            state = torch.load(model / "model.pt", weights_only=True)
            tmp = model / ".model.pt.tmp"
            torch.save(state, tmp)
            os.replace(tmp, model / "model.pt")

    t = threading.Thread(target=rewrite)
    t.start()
    row = _measure(proc, base, **kw)
    t.join()
    with httpx.Client(base_url=base, timeout=10) as c:
        row["reloads_seen"] = c.get("/healthz").is_success
    return row


def run_bench(
    model: Path,
    *,
    data: str | None,
    workers: list[int],
    concurrency: list[int],
    seconds: float,
    repeats: int,
    generator: str,
    reference: bool,
    reload_check: bool,
    batch_wait_ms: float | None,
    candidates: tuple[str, ...] = ("auto",),
    log: Any = print,
) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); returns the results as a JSON-able dict.

    ``candidates``: one fedrec server per value of ``serve --candidates`` (e.g. ``("0", "1000")``:
    the exact MLP pass and the re-rank of 1 000 candidates), each measured next to the same reference.
    """
    from fedrec.shared_model.artifacts import load_model

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stop the servers (finally blocks) on SIGTERM
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    if generator == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--generator wrk: wrk is not installed (apt-get install wrk)")
    loaded = load_model(model)
    ids = list(loaded.catalog.item_ids)
    bodies = bodies_from(ids, data)
    res: dict[str, Any] = {
        "benchmark": "serve",
        "model": loaded.run_id,
        "items": len(ids),
        "kind": loaded.meta.get("kind", "mlp"),
        "history_len": HISTORY_LEN,
        "k": 10,
        "bodies": "real histories" if data else "long-tailed draws from the catalogue",
        "generator": generator,
        "seconds": seconds,
        "repeats": repeats,
        "batch_wait_ms": batch_wait_ms,
        "candidates": list(candidates),
        "cpus": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-serve-") as tmp:
        files = (Path(tmp) / "bodies.jsonl", Path(tmp) / "post.lua")
        files[0].write_bytes(b"\n".join(bodies) + b"\n")
        files[1].write_text(WRK_LUA, encoding="utf-8")
        ids_file = Path(tmp) / "item_ids.txt"  # the reference maps the same ids (public catalogue)
        ids_file.write_text("\n".join(ids) + "\n", encoding="utf-8")
        for w in workers:
            # fedrec and the reference run side by side (an idle server costs nothing) and each cell is
            # measured alternately, fedrec then reference, repeat after repeat: on a shared machine the
            # load drifts, and interleaving keeps it the same for both sides of a ratio.
            with contextlib.ExitStack() as stack:
                up: dict[tuple[str, str | None], tuple[subprocess.Popen[str], str]] = {}
                names: list[tuple[str, str | None]] = [("fedrec", v) for v in candidates]
                for name, cand in [*names, *([("reference", None)] if reference else [])]:
                    port = free_port()
                    if name == "fedrec":
                        cmd = fedrec_cmd(
                            model, port, w, batch_wait_ms=batch_wait_ms, reload=False, candidates=str(cand)
                        )
                        env = None
                    else:
                        cmd, env = reference_cmd(port, w), {"FEDREC_REF_IDS": str(ids_file)}
                    log(
                        f"serve bench: starting {name}{'' if cand is None else f' --candidates {cand}'}, {w} worker(s) …"
                    )
                    up[name, cand] = (stack.enter_context(server(cmd, port, env)), f"http://127.0.0.1:{port}")
                    _warm(up[name, cand][1], bodies)
                res.setdefault("memory", {})[str(w)] = _worker_memory(up[names[0]][0].pid, w)
                for c in concurrency:
                    rows: dict[tuple[str, str | None], list[dict[str, Any]]] = {key: [] for key in up}
                    for _ in range(repeats):
                        for key, (proc, base) in up.items():
                            rows[key].append(_measure(proc, base, c, seconds, generator, bodies, files))
                    for key, (_, base) in up.items():
                        name, cand = key
                        row = {"server": name, "workers": w, "concurrency": c, **_median_row(rows[key])}
                        if name == "fedrec":
                            health = _healthz(base)
                            row["candidates"], row["candidates_used"] = cand, int(health.get("candidates", 0))
                            row["batch_wait_ms"] = health.get("batch_wait_ms")  # the server's, as it says
                        row["load_average"] = list(os.getloadavg())
                        res["runs"].append(row)
                        log(
                            f"  {name}{'' if cand is None else f' c.={cand}'} conc={c}: {row['req_per_s']:.0f} "
                            f"req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, errors {row['errors']}"
                        )
        if reload_check:
            log("serve bench: reload during load …")
            with tempfile.TemporaryDirectory(prefix="fedrec-bench-model-") as mdir:
                copy = Path(mdir) / "run"
                shutil.copytree(model, copy)
                port = free_port()
                cmd = fedrec_cmd(
                    copy, port, workers[0], batch_wait_ms=batch_wait_ms, reload=True, candidates=candidates[0]
                )
                with server(cmd, port) as proc:
                    base = f"http://127.0.0.1:{port}"
                    _warm(base, bodies)
                    c = max(concurrency)
                    row = _reload_during_load(
                        copy,
                        base,
                        proc,
                        conc=c,
                        seconds=seconds,
                        generator=generator,
                        bodies=bodies,
                        files=files,
                    )
                    res["reload_check"] = {"workers": workers[0], "concurrency": c, **row}
                    log(f"  reload under load: {row['requests']} requests, errors {row['errors']}")
    ref = {
        (r["workers"], r["concurrency"]): r["req_per_s"] for r in res["runs"] if r["server"] == "reference"
    }
    for r in res["runs"]:
        if r["server"] == "fedrec" and (r["workers"], r["concurrency"]) in ref:
            r["ratio_to_reference"] = r["req_per_s"] / ref[(r["workers"], r["concurrency"])]
    res["load_average_end"] = list(os.getloadavg())
    return res


def _healthz(base: str) -> dict[str, Any]:
    """The server's /healthz: how many candidates it re-ranks (0 = exact), its micro-batch wait."""
    with httpx.Client(base_url=base, timeout=10) as c:
        body: dict[str, Any] = c.get("/healthz").json()
        return body


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _worker_memory(pid: int, workers: int) -> dict[str, Any]:
    """Memory of the server: one process (1 worker), or the parent and each forked worker."""
    if workers == 1:
        return {"server": memory_mb(pid)}
    kids = _children(pid)
    mem = [memory_mb(p) for p in kids]
    out: dict[str, Any] = {"parent": memory_mb(pid), "workers": mem}
    if len(mem) >= 2:
        # The first worker's resident memory vs what each further worker adds (its private pages).
        out["extra_worker_uss_over_first_rss"] = (
            float(np.median([m["uss_mb"] for m in mem[1:]])) / mem[0]["rss_mb"]
        )
    return out

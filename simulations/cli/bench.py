"""``fedrec bench dp-step | simulate | serve``: registered on the main app by ``register(app)``.

Each prints a table (medians over repeats, ratios against a reference measured in the same run) and,
with ``--json PATH``, writes the same figures as JSON. The work lives in ``fedrec.simulations.bench.suite``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedrec.simulations.errors import DataError

out_console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="torch threads (same for every mode).")]


def _log(line: str) -> None:
    err_console.print(f"[dim]{line}[/dim]", highlight=False)


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        _log(f"wrote {path}")


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def dp_step_table(result: dict[str, Any]) -> Table:
    t = Table(
        title=f"One local training step ({result['batch_users']} users, {result['threads']} thread(s), "
        f"median of {result['repeats']})"
    )
    for col in ("items", "mode", "ms", "× plain", "peak Δ MB"):
        t.add_column(col, justify="right" if col not in ("mode",) else "left")
    for size, row in result["sizes"].items():
        for mode, e in row["modes"].items():
            if "skipped" in e:
                t.add_row(size, mode, "skipped", "", "", style="dim")
                continue
            note = "" if e["runs"] >= result["repeats"] else f" (n={e['runs']})"
            t.add_row(
                size,
                mode,
                _f(e["ms"]) + note,
                _f(e["ratio"], "{:.2f}"),
                _f(e.get("peak_delta_mb")),
                style="bold" if mode == "fast" else None,
            )
    return t


def simulate_table(result: dict[str, Any]) -> Table:
    s = result["setup"]
    t = Table(
        title=f"Simulation: {s['tenants']} tenants × {s['users']} users × {s['rounds']} rounds, "
        f"DP {'on' if s['dp'] else 'off'}"
    )
    t.add_column("figure")
    t.add_column("value", justify="right")
    rows = [
        ("prepare (synthetic → encrypted tenants) s", _f(result.get("prepare_s"))),
        ("simulated run (Flower + Ray) s", _f(result.get("simulated_s"))),
        ("  rounds completed", str(result.get("completed_rounds"))),
        ("  peak RSS, process tree, MB", _f(result.get("simulated_peak_tree_rss_mb"), "{:.0f}")),
        ("same client work sequentially s", _f(result.get("sequential_s"))),
        ("  of which training s", _f(result.get("sequential_train_s"))),
        ("  peak RSS, one process, MB", _f(result.get("sequential_peak_rss_mb"), "{:.0f}")),
        ("overhead = simulated ÷ sequential", _f(result.get("overhead"), "{:.2f}")),
        ("one uncached tenant decryption s", _f(result.get("decrypt_one_tenant_s"), "{:.3f}")),
    ]
    cpu = result.get("simulated_cpu") or {}
    for key, name in (
        ("driver_cpu_s", "  CPU s, driver (ServerApp + in-memory SuperLink)"),
        ("client_actors_cpu_s", "  CPU s, client actors"),
        ("ray_other_cpu_s", "  CPU s, other Ray processes"),
    ):
        if key in cpu:
            rows.append((name, _f(cpu[key])))
    for key, name in (("round_s", "round s, simulated"), ("sequential_round_s", "round s, sequential")):
        if result.get(key):
            rows.append((name, " ".join(_f(x) for x in result[key])))
    for key in ("load_average_start", "load_average_after_simulation", "load_average_end"):
        if result.get(key):
            rows.append((key.replace("_", " "), " ".join(f"{x:.2f}" for x in result[key])))
    for name, value in rows:
        t.add_row(name, value)
    return t


def serve_table(result: dict[str, Any]) -> Table:
    t = Table(title=f"fedrec serve on loopback (history {result['history_len']}, k={result['k']})")
    for col in ("precision", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", "p50 ÷ in-process"):
        t.add_column(col, justify="right")
    for prec in ("fp32", "int8"):
        if prec not in result:
            continue
        ip = result[prec]["in_process"]
        t.add_row(prec, "in-process", "", _f(ip["p50_ms"], "{:.2f}"), _f(ip["p99_ms"], "{:.2f}"), "", "1.00")
        for row in result[prec]["http"]:
            t.add_row(
                prec,
                str(row["concurrency"]),
                _f(row["req_per_s"], "{:.0f}"),
                _f(row["p50_ms"], "{:.2f}"),
                _f(row["p99_ms"], "{:.2f}"),
                str(row["errors"]),
                _f(row["http_over_in_process_p50"], "{:.1f}"),
            )
    return t


def _bench_serve_script() -> ModuleType:
    """The serving benchmark module (``fedrec.simulations.bench.serve``), imported only when asked for."""
    from fedrec.simulations.bench import serve

    return serve


def run_serve_bench(
    model: Path, *, concurrency: list[int], requests: int, seconds: float, int8: bool
) -> dict[str, Any]:
    """In-process ranking cost, then HTTP at each concurrency level (fp32, and int8 when asked)."""
    import asyncio

    import numpy as np

    from fedrec.shared_model.artifacts import load_model

    bs = _bench_serve_script()
    ids = list(load_model(model).catalog.item_ids)
    rng = np.random.default_rng(0)
    n = min(bs.HISTORY_LEN, len(ids))
    histories = [[ids[i] for i in rng.choice(len(ids), n, replace=False)] for _ in range(500)]
    res: dict[str, Any] = {"benchmark": "serve", "history_len": n, "k": 10, "cpus": os.cpu_count()}
    for q in (False, True) if int8 else (False,):
        name = "int8" if q else "fp32"
        _log(f"serve: {name} in-process ranking …")
        res[name] = {"in_process": bs.in_process(model, histories, int8=q), "http": []}
        with bs.server(model, int8=q) as base:
            for c in concurrency:
                _log(f"serve: {name} HTTP at concurrency {c} …")
                row = asyncio.run(bs.drive(base, histories, c, requests, seconds))
                row["http_over_in_process_p50"] = row["p50_ms"] / res[name]["in_process"]["p50_ms"]
                res[name]["http"].append(row)
    return res


def register(app: typer.Typer) -> None:
    """Add ``fedrec bench dp-step|simulate|serve`` to ``app``."""
    bench_app = typer.Typer(help="Benchmarks: DP step, whole simulation, serving.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

    @bench_app.command("dp-step")
    def dp_step(
        sizes: Annotated[str, typer.Option("--sizes", help="Item-table sizes, comma-separated.")] = (
            "1682,20000,100000"
        ),
        modes: Annotated[
            str, typer.Option("--modes", help="plain,opacus-hooks,opacus-ghost,fast (plain is always run).")
        ] = "plain,opacus-hooks,opacus-ghost,fast",
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed steps per mode.")] = 15,
        hooks_repeats: Annotated[
            int, typer.Option("--hooks-repeats", min=1, help="Timed steps of opacus-hooks (it is slow).")
        ] = 3,
        hooks_max_items: Annotated[
            int, typer.Option("--hooks-max-items", help="Skip opacus-hooks above this table size.")
        ] = 100_000,
        batch_users: Annotated[int, typer.Option("--batch-users", min=1, help="Users per step.")] = 64,
        threads: ThreadsOpt = 1,
        memory: Annotated[
            bool, typer.Option("--memory/--no-memory", help="Peak memory, one fresh process per mode.")
        ] = True,
        json_path: JsonOpt = None,
    ) -> None:
        """Plain PyTorch vs Opacus hooks vs Opacus ghost vs fedrec's DP step (time and peak memory)."""
        from fedrec.simulations.bench.suite import DP_MODES, bench_dp_step

        try:
            size_list = tuple(int(s) for s in sizes.split(","))
        except ValueError as e:
            raise DataError(f"--sizes must be comma-separated integers, got {sizes!r}") from e
        mode_list = [m.strip() for m in modes.split(",") if m.strip()]
        unknown = sorted(set(mode_list) - set(DP_MODES))
        if unknown:
            raise DataError(f"unknown --modes {', '.join(unknown)}; choose from {', '.join(DP_MODES)}")
        if any(n < 2 for n in size_list):
            raise DataError("--sizes must be at least 2 items each")
        result = bench_dp_step(
            sizes=size_list,
            modes=tuple(["plain", *[m for m in mode_list if m != "plain"]]),
            repeats=repeats,
            hooks_repeats=hooks_repeats,
            threads=threads,
            hooks_max_items=hooks_max_items,
            memory=memory,
            batch_users=batch_users,
            log=_log,
        )
        out_console.print(dp_step_table(result))
        _write_json(json_path, result)

    @bench_app.command("simulate")
    def simulate(
        tenants: Annotated[int, typer.Option("--tenants", min=1, help="Tenants (iid partition).")] = 10,
        users: Annotated[int, typer.Option("--users", min=10, help="Synthetic users in total.")] = 10_000,
        items: Annotated[int, typer.Option("--items", min=10, help="Synthetic items.")] = 1_000,
        rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 3,
        no_dp: Annotated[bool, typer.Option("--no-dp", help="Without clipping and noise.")] = False,
        epsilon: Annotated[float, typer.Option("--epsilon", help="Each tenant's ε cap.")] = 8.0,
        ray_cpus: Annotated[int | None, typer.Option("--ray-cpus", help="CPUs Ray may use.")] = None,
        ray_address: Annotated[
            str | None,
            typer.Option("--ray-address", help="Join this running Ray cluster (ray://… or IP:PORT)."),
        ] = None,
        sequential: Annotated[
            bool, typer.Option("--sequential/--no-sequential", help="Also time the work sequentially.")
        ] = True,
        json_path: JsonOpt = None,
    ) -> None:
        """Wall time, peak memory and orchestration overhead of a synthetic multi-tenant DP simulation."""
        from fedrec.simulations.bench.suite import SimSetup, bench_simulate

        if users < 10 * tenants:
            raise DataError(f"--users must be at least 10 per tenant ({10 * tenants}), got {users}")
        setup = SimSetup(
            tenants=tenants, users=users, items=items, rounds=rounds, dp=not no_dp, epsilon=epsilon
        )
        result = bench_simulate(
            setup, ray_cpus=ray_cpus, ray_address=ray_address, sequential=sequential, log=_log
        )
        out_console.print(simulate_table(result))
        _write_json(json_path, result)

    @bench_app.command("serve")
    def serve(
        model: Annotated[Path, typer.Option("--model", help="RUN_DIR holding model.pt + model.json.")],
        concurrency: Annotated[
            str, typer.Option("--concurrency", help="Levels, comma-separated.")
        ] = "1,16,64",
        requests: Annotated[int, typer.Option("--requests", min=1, help="Requests per level (max).")] = 3000,
        seconds: Annotated[float, typer.Option("--seconds", min=0.1, help="Time limit per level.")] = 15.0,
        int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also benchmark int8 serving.")] = True,
        json_path: JsonOpt = None,
    ) -> None:
        """Loopback load test of `fedrec serve` against the in-process cost of one ranking call."""
        if not (model / "model.json").is_file():
            raise DataError(f"{model} holds no model.json (give a RUN_DIR written by simulate/centralized)")
        try:
            levels = [int(c) for c in concurrency.split(",")]
        except ValueError as e:
            raise DataError(f"--concurrency must be comma-separated integers, got {concurrency!r}") from e
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        result = run_serve_bench(model, concurrency=levels, requests=requests, seconds=seconds, int8=int8)
        out_console.print(serve_table(result))
        _write_json(json_path, result)

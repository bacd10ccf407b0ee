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
        title=f"One local training step on {result.get('device_name', 'cpu')} ({result['batch_users']} users, "
        f"dim {result.get('dim', 32)}, "
        f"{result['threads']} thread(s), median of {result['repeats']})"
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
    t = Table(
        title=f"fedrec serve vs a trivial FastAPI top-K, {result['items']} items ({result['kind']}), "
        f"{result['generator']}, {result['seconds']:g} s × {result['repeats']}, "
        f"load {result['load_average_start'][0]:.1f}→{result['load_average_end'][0]:.1f}"
    )
    cols = (
        "server",
        "cand.",
        "wait ms",
        "workers",
        "conc.",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "× ref",
    )
    for col in (*cols, "server CPU %"):
        t.add_column(col, justify="left" if col == "server" else "right")
    for r in result["runs"]:
        t.add_row(
            r["server"],
            str(r["candidates_used"]) if "candidates_used" in r else "",
            _f(r.get("batch_wait_ms"), "{:g}"),
            str(r["workers"]),
            str(r["concurrency"]),
            _f(r["req_per_s"], "{:.0f}"),
            _f(r["p50_ms"], "{:.2f}"),
            _f(r["p90_ms"], "{:.2f}"),
            _f(r["p99_ms"], "{:.2f}"),
            str(r["errors"]),
            _f(r.get("ratio_to_reference"), "{:.2f}"),
            _f(100 * r["server_cpu_share"], "{:.0f}"),
            style="bold" if r["server"] == "fedrec" else "dim",
        )
    rc = result.get("reload_check")
    if rc:
        t.add_row("reload", "", "", str(rc["workers"]), str(rc["concurrency"]), _f(rc["req_per_s"], "{:.0f}"),
                  _f(rc["p50_ms"], "{:.2f}"), _f(rc["p90_ms"], "{:.2f}"), _f(rc["p99_ms"], "{:.2f}"),
                  str(rc["errors"]), "", _f(100 * rc["server_cpu_share"], "{:.0f}"))  # fmt: skip
    for w, mem in result.get("memory", {}).items():
        ratio = mem.get("extra_worker_uss_over_first_rss")
        if ratio is not None:
            t.caption = (
                t.caption or ""
            ) + f"{w} workers: extra worker USS = {ratio:.3f} × first worker RSS. "
    return t


def _bench_serve_script() -> ModuleType:
    """The serving benchmark module (``fedrec.simulations.bench.serve``), imported only when asked for."""
    from fedrec.simulations.bench import serve

    return serve


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
        dim: Annotated[
            int, typer.Option("--dim", min=1, help="Embedding width (256: the EASE-table head's).")
        ] = 32,
        threads: ThreadsOpt = 1,
        memory: Annotated[
            bool, typer.Option("--memory/--no-memory", help="Peak memory, one fresh process per mode.")
        ] = True,
        device: Annotated[
            str,
            typer.Option(
                "--device",
                help="cpu, cuda (cuda:N) or auto (cuda when torch sees a GPU). Peak memory is CPU-only.",
            ),
        ] = "cpu",
        json_path: JsonOpt = None,
    ) -> None:
        """Plain PyTorch vs Opacus hooks vs Opacus ghost vs fedrec's DP step (time and peak memory)."""
        import torch

        from fedrec.simulations.bench.suite import DP_MODES, bench_dp_step

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
            raise DataError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
        if device != "cpu" and not torch.cuda.is_available():
            raise DataError(
                f"--device {device}: torch {torch.__version__} sees no CUDA GPU "
                f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu or auto"
            )

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
            dim=dim,
            device=device,
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
        data: Annotated[
            str | None,
            typer.Option("--data", help="The model's data set: request bodies from real histories."),
        ] = None,
        workers: Annotated[str, typer.Option("--workers", help="Worker counts, comma-separated.")] = "1,2",
        concurrency: Annotated[
            str, typer.Option("--concurrency", help="Connections, comma-separated.")
        ] = "1,16",
        seconds: Annotated[float, typer.Option("--seconds", min=1.0, help="Length of one load run.")] = 10.0,
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Load runs per cell (medians).")] = 1,
        generator: Annotated[
            str, typer.Option("--generator", help="auto (wrk if installed) | wrk | python.")
        ] = "auto",
        reference: Annotated[
            bool, typer.Option("--reference/--no-reference", help="Also measure the trivial FastAPI top-K.")
        ] = True,
        reload_check: Annotated[
            bool, typer.Option("--reload-check", help="Rewrite the checkpoint during one load run.")
        ] = False,
        batch_wait_ms: Annotated[
            float | None,
            typer.Option(
                "--batch-wait-ms",
                min=0.0,
                max=1.0,
                help="The server's --batch-wait-ms (default: the server's, by worker count).",
                show_default=False,
            ),
        ] = None,
        candidates: Annotated[
            str,
            typer.Option(
                "--candidates",
                help="The server's --candidates, comma-separated: one fedrec server per value (e.g. 0,1000).",
            ),
        ] = "auto",
        json_path: JsonOpt = None,
    ) -> None:
        """Drive `fedrec serve` with wrk (POST bodies of real histories) next to a trivial FastAPI top-K."""
        if not (model / "model.json").is_file():
            raise DataError(f"{model} holds no model.json (give a RUN_DIR written by simulate/centralized)")
        if generator not in ("auto", "wrk", "python"):
            raise DataError(f"--generator must be auto, wrk or python, got {generator!r}")
        try:
            w_list = [int(c) for c in workers.split(",")]
            c_list = [int(c) for c in concurrency.split(",")]
        except ValueError as e:
            raise DataError(f"--workers and --concurrency must be comma-separated integers ({e})") from e
        if min(w_list + c_list) < 1:
            raise DataError("--workers and --concurrency must be ≥ 1")
        from fedrec.shared_model.recommend import parse_candidates

        cand_list = tuple(dict.fromkeys(v.strip() for v in candidates.split(",")))
        for v in cand_list:
            parse_candidates(v)  # a bad value: one-line error before any server starts
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            result = _bench_serve_script().run_bench(
                model,
                data=data,
                workers=w_list,
                concurrency=c_list,
                seconds=seconds,
                repeats=repeats,
                generator=generator,
                reference=reference,
                reload_check=reload_check,
                batch_wait_ms=batch_wait_ms,
                candidates=cand_list,
                log=_log,
            )
        except RuntimeError as e:
            raise DataError(str(e)) from None
        out_console.print(serve_table(result))
        _write_json(json_path, result)

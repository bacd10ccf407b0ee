"""``fedrec bench``: the commands run and write what they promise (correctness, never timings), and a
simulation joins an existing Ray cluster by address.

Benchmarks are not timed here: tests check shapes, keys and error handling on tiny settings.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedrec.simulations.bench.suite import (
    StepSetup,
    TreeMemory,
    load_average,
    make_step,
    process_cpu_s,
    step_memory,
)
from fedrec.simulations.cli.bench import register
from fedrec.simulations.cli.main import app
from tests.flower_env import flower_env

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def bench_commands() -> None:
    if not any(getattr(g, "name", None) == "bench" for g in app.registered_groups):
        register(app)


def test_dp_step_writes_plain_dp_and_ratio_per_size(tmp_path: Path) -> None:
    out = tmp_path / "dp.json"
    args = ["bench", "dp-step", "--sizes", "50,80", "--repeats", "2", "--no-memory", "--json", str(out)]
    res = runner.invoke(app, [*args, "--modes", "plain,opacus-ghost,fast", "--device", "auto", "--dim", "40"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["dim"] == 40 and "dim 40" in res.output
    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto: the GPU when seen
    assert set(data["sizes"]) == {"50", "80"}
    for row in data["sizes"].values():
        assert row["plain_ms"] > 0 and row["dp_ms"] > 0
        assert row["ratio"] == pytest.approx(row["dp_ms"] / row["plain_ms"])
        assert set(row["modes"]) == {"plain", "opacus-ghost", "fast"}
    assert "One local training step" in res.output


def test_opacus_hooks_is_skipped_above_its_cap_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "dp.json"
    res = runner.invoke(
        app,
        [
            *("bench", "dp-step", "--sizes", "40,90", "--repeats", "1", "--hooks-repeats", "1"),
            *("--no-memory", "--modes", "opacus-hooks,fast", "--hooks-max-items", "60", "--json", str(out)),
        ],
    )
    assert res.exit_code == 0, res.output
    sizes = json.loads(out.read_text())["sizes"]
    assert sizes["40"]["modes"]["opacus-hooks"]["ms"] > 0
    assert "skipped" in sizes["90"]["modes"]["opacus-hooks"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "10,x"], "comma-separated integers"),
        (["--modes", "plain,turbo"], "unknown --modes turbo"),
        (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto"),
        pytest.param(
            ["--device", "cuda"],
            "sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here"),
        ),
    ],
)
def test_dp_step_refuses_bad_options_in_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedrec.simulations.cli.main import app, main; from fedrec.simulations.cli.bench import "
            "register; register(app); main()",
            "bench",
            "dp-step",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", ["plain", "fast"])
def test_step_memory_reports_a_peak_over_the_setup(mode: str) -> None:
    mem = step_memory(StepSetup(n_items=100, batch_users=8, tenant_users=50), mode, steps=1)
    assert mem["peak_rss"] >= mem["rss_before"] > 0 and mem["peak_delta"] >= 0


def test_every_mode_takes_a_step_that_changes_the_weights() -> None:
    import torch

    for mode in ("plain", "opacus-hooks", "opacus-ghost", "fast"):
        step, close = make_step(StepSetup(n_items=60, batch_users=8, tenant_users=40), mode)
        step()
        close()
    # the dp modes leave no hook behind: a fresh step per mode builds its own model
    assert torch.get_num_threads() >= 1


def test_tree_memory_counts_child_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        time.sleep(1.5)
        alone = TreeMemory.tree_rss(child.pid)
        total = TreeMemory.tree_rss(os.getpid())
        assert alone > 60 << 20 and total >= alone
    finally:
        child.kill()
        child.wait()


BUSY_ACTOR = """
import sys, time
open("/proc/self/comm", "w").write("ray::ClientAppA")  # the name Ray gives a Flower client actor
while time.process_time() < 0.5:
    pass
print("done", flush=True)
time.sleep(30)
"""


def test_tree_memory_attributes_cpu_to_client_actors_and_the_driver() -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY_ACTOR], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        mem = TreeMemory()
        mem.sample()
        roles = mem.cpu_by_role(driver_cpu_before=0.0)
        assert roles["client_actors_cpu_s"] >= 0.45  # the child's 0.5 s, to the clock tick
        assert 0.0 < roles["driver_cpu_s"] <= process_cpu_s() + 0.02  # this process is the "driver"
        assert set(roles) == {"driver_cpu_s", "client_actors_cpu_s", "ray_other_cpu_s"}
        assert mem.peak > 0
        assert len(load_average()) == 3
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


FEDREC = [
    sys.executable,
    "-c",
    "from fedrec.simulations.cli.main import app, main; from fedrec.simulations.cli.bench import register; "
    "register(app); main()",
]

#: A tiny federation run through run_simulation(ray_address=…), in its own interpreter.
JOIN_CLUSTER = """
import sys
from pathlib import Path
from fedrec.simulations.bench.suite import SimSetup, prepare_synthetic_federation, sim_run_config
from fedrec.simulations.driver.flower_runner import run_simulation
from fedrec.simulations.driver.simulate import _shutdown_ray
tmp, address = Path(sys.argv[1]), sys.argv[2]
setup = SimSetup(tenants=2, users=60, items=40, rounds=1, dp=False)
prepare_synthetic_federation(setup, tmp / "fed")
(tmp / "run").mkdir()
cfg = sim_run_config(setup, tmp / "fed", tmp / "run", "ray-cluster")
try:
    run_simulation(cfg.to_mapping(), 2, ray_address=address)
finally:
    _shutdown_ray()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_simulate_bench_reports_time_memory_and_overhead(tmp_path: Path) -> None:
    """In a subprocess, as a user runs it (Ray started in-process leaves ResourceWarnings behind)."""
    out = tmp_path / "sim.json"
    proc = subprocess.run(
        [
            *FEDREC,
            "bench",
            "simulate",
            "--tenants",
            "2",
            "--users",
            "60",
            "--items",
            "40",
            "--rounds",
            "1",
            "--no-dp",
            "--ray-cpus",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=flower_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead" in proc.stdout
    data = json.loads(out.read_text())
    assert data["completed_rounds"] == 1 and data["simulated_s"] > 0 and data["sequential_s"] > 0
    assert data["overhead"] == pytest.approx(data["simulated_s"] / data["sequential_s"])
    assert data["simulated_peak_tree_rss_mb"] > 0
    assert len(data["round_s"]) == len(data["sequential_round_s"]) == 1
    assert data["simulated_cpu"]["client_actors_cpu_s"] > 0
    assert len(data["load_average_start"]) == len(data["load_average_end"]) == 3


@pytest.mark.slow
def test_a_simulation_joins_a_running_ray_cluster_by_address(tmp_path: Path) -> None:
    """`ray start --head` (our own process group, stopped by its id), then run_simulation(ray_address=…)."""
    ray_bin = Path(sys.executable).parent / "ray"
    port = free_port()
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    env = flower_env(tmp_path)
    temp_dir = Path("/tmp") / f"ray-fedrec-test-{os.getpid()}"  # short: Ray's socket paths are length-capped
    cmd = [str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port)]
    cmd += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    cmd += [str(x) for kv in ports.items() for x in kv]
    head = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        _wait_for_port(port, head)
        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-c", JOIN_CLUSTER, str(tmp_path), f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["dataset"]["users"] > 0
        assert head.poll() is None, "the cluster outlives the run that joined it"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the group `ray start` and every process it started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        if head.stderr:
            head.stderr.close()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"ray start exited early: {err[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2.0)  # GCS listens before the raylet has registered the node
                return
        time.sleep(0.5)
    raise AssertionError(f"Ray head did not listen on {port} within {timeout:g} s")

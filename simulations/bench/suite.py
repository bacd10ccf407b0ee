"""Benchmarks behind ``fedrec bench``: the DP step, a whole simulation, serving.

Timings are medians over repeats; every ratio divides two figures measured in the same process run,
interleaved (mode A, mode B, mode A, …) so that a neighbour's load on the shared cores hits both.
Peak memory is measured separately, one fresh subprocess per configuration: the peak RSS (the
process' resident high-water mark, VmHWM) minus the resident size just before the measured work started,
i.e. what the work added on top of imports, model and data. Benchmarks are never unit tests: the
tests check that the code is right, these scripts say how fast it is.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: The item-table sizes of the issue: ml-100k's catalogue, a mid-size and a large shop.
DP_STEP_SIZES = (1_682, 20_000, 100_000)
DP_MODES = ("plain", "opacus-hooks", "opacus-ghost", "fast")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """Resident high-water mark of this process so far: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries that across fork + exec, so a child started by a big
    parent reports the parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover - not Linux


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# ------------------------------------------------------------------------------------ data
def synthetic_split(n_users: int, n_items: int, *, seed: int = 0) -> Any:
    """A UserSplit with Zipf-like item popularity and 10–200 training items per user (fast to build)."""
    from fedrec.shared_model.data import USER_FEATURES, UserSplit

    rng = np.random.default_rng(seed)
    counts = rng.integers(10, 201, size=n_users)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    items = rng.choice(n_items, size=int(counts.sum()), p=popularity).astype(np.int32)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    return UserSplit(
        n_items=n_items,
        indptr=indptr,
        train_items=items,
        train_ctx=np.stack([rng.integers(0, 24, nnz), rng.integers(0, 7, nnz)], 1).astype(np.int8),
        val_item=np.full(n_users, -1, np.int32),
        test_item=np.full(n_users, -1, np.int32),
        val_ctx=np.full((n_users, 2), -1, np.int8),
        test_ctx=np.full((n_users, 2), -1, np.int8),
        user_features=rng.integers(0, 3, size=(n_users, len(USER_FEATURES))).astype(np.int32),
    )


# ------------------------------------------------------------------------------------ dp-step
@dataclass(frozen=True)
class StepSetup:
    """One local training step as a tenant takes it (the run defaults of pyproject.toml)."""

    n_items: int
    batch_users: int = 64  # users in the step (the expected Poisson batch)
    tenant_users: int = 2_000  # users of the tenant (sets q = batch/users)
    dim: int = 32
    hidden: tuple[int, ...] = (64, 32)
    n_genres: int = 18
    seed: int = 0
    device: str = "cpu"  # where the model, the batch and the DP noise live ("cuda" on a GPU)


def make_step(setup: StepSetup, mode: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(step, close)`` for one mode on a fixed batch: forward, backward (+clipping, noise), optimizer."""
    import torch

    from fedrec.client.train import LocalTrainConfig, make_private_trainer, plan_round
    from fedrec.shared_model.model import HistoryMLP, ModelConfig
    from fedrec.shared_model.training import SamplingConfig, make_user_batch, per_user_loss

    split = synthetic_split(setup.tenant_users, setup.n_items, seed=setup.seed)
    rng = np.random.default_rng(setup.seed)
    torch.manual_seed(setup.seed)
    genres = (rng.random((setup.n_items, setup.n_genres)) < 0.1).astype(np.float32)
    cfg = ModelConfig(
        n_items=setup.n_items,
        n_genres=setup.n_genres,
        user_cardinalities=(3, 3, 3, 3),
        dim=setup.dim,
        hidden=setup.hidden,
    )
    model = HistoryMLP(cfg, genres).to(setup.device)
    batch = make_user_batch(split, np.arange(setup.batch_users), SamplingConfig(), rng).to(setup.device)
    if mode == "plain":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)

        def plain_step() -> None:
            opt.zero_grad(set_to_none=True)
            per_user_loss(model, batch).mean().backward()
            opt.step()

        return plain_step, lambda: None
    if mode == "opacus-hooks":
        return _opacus_hooks_step(model, batch, setup)
    clipping = {"opacus-ghost": "ghost", "fast": "fast"}[mode]
    local = LocalTrainConfig(batch_users=setup.batch_users, clipping=clipping)
    plan = plan_round(setup.tenant_users, local)
    trainer = make_private_trainer(model, local, plan, noise_multiplier=1.0, seed=setup.seed)

    def dp_step() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.backward(per_user_loss(trainer.module, batch))
        trainer.optimizer.step()

    return dp_step, trainer.close


def _opacus_hooks_step(
    model: Any, batch: Any, setup: StepSetup
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Opacus' classic path: per-sample gradients materialised by hooks (B × rows × d for an embedding)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedrec.shared_model.training import per_user_loss

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(TensorDataset(torch.arange(setup.tenant_users)), batch_size=setup.batch_users)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        dp_model, dp_opt, _ = PrivacyEngine(accountant="prv").make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )[:3]

    def step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        per_user_loss(dp_model, batch).mean().backward()
        dp_opt.step()

    return step, lambda: dp_model.to_standard_module()


def time_modes(
    setup: StepSetup, modes: list[str], *, repeats: int, warmup: int = 2, slow_repeats: int = 3
) -> dict[str, list[float]]:
    """Seconds per step of each mode, interleaved; ``opacus-hooks`` only runs ``slow_repeats`` times.
    On a GPU each step is timed to its end (the device is synchronised), not to its last launch."""
    import torch

    sync = torch.cuda.synchronize if setup.device.startswith("cuda") else (lambda: None)
    steps = {m: make_step(setup, m) for m in modes}
    try:
        for m in modes:
            for _ in range(warmup if m != "opacus-hooks" else 1):
                steps[m][0]()
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(repeats):
            for m in modes:
                if m == "opacus-hooks" and r >= slow_repeats:
                    continue
                sync()
                t = time.perf_counter()
                steps[m][0]()
                sync()
                times[m].append(time.perf_counter() - t)
        return times
    finally:
        for _, close in steps.values():
            close()


def step_memory(setup: StepSetup, mode: str, steps: int = 3) -> dict[str, int]:
    """Run in a fresh process: peak RSS added by ``steps`` steps over the RSS after setup."""
    step, close = make_step(setup, mode)
    before = rss_bytes()
    start_peak = maxrss_bytes()
    for _ in range(steps):
        step()
    peak = maxrss_bytes()
    close()
    return {"rss_before": before, "peak_rss": peak, "peak_delta": max(0, peak - max(before, start_peak))}


def _child_memory(setup: StepSetup, mode: str, threads: int) -> dict[str, int] | None:
    """``step_memory`` in a fresh interpreter (a peak never goes down within a process)."""
    code = (
        "import json,sys,torch; from fedrec.simulations.bench.suite import StepSetup, step_memory; "
        f"torch.set_num_threads({threads}); a=json.loads(sys.argv[1]); a['hidden']=tuple(a['hidden']); "
        f"print(json.dumps(step_memory(StepSetup(**a), {mode!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(setup))], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_dp_step(
    *,
    sizes: tuple[int, ...] = DP_STEP_SIZES,
    modes: tuple[str, ...] = DP_MODES,
    repeats: int = 15,
    hooks_repeats: int = 3,
    threads: int = 1,
    hooks_max_items: int = 100_000,
    memory: bool = True,
    batch_users: int = 64,
    device: str = "cpu",
    dim: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``dp-step`` table: per size and mode the median step time, its ratio to plain, peak memory.
    On ``cuda`` the memory column is left out: the RSS of the host process says nothing about the GPU's."""
    import torch

    torch.set_num_threads(threads)
    gpu = device.startswith("cuda")
    memory = memory and not gpu
    result: dict[str, Any] = {
        "benchmark": "dp-step",
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
        "threads": threads,
        "repeats": repeats,
        "batch_users": batch_users,
        "dim": dim,
        "memory": (
            "peak RSS added by 3 steps over the RSS after setup, fresh process per mode (VmHWM)"
            if memory
            else "not measured"
        ),
        "sizes": {},
    }
    for n in sizes:
        setup = StepSetup(n_items=n, batch_users=batch_users, device=device, dim=dim)
        run_modes = [m for m in modes if m != "opacus-hooks" or n <= hooks_max_items]
        log(f"dp-step: {n} items, modes {', '.join(run_modes)} …")
        times = time_modes(setup, run_modes, repeats=repeats, slow_repeats=hooks_repeats)
        plain = median_ms(times["plain"])
        row: dict[str, Any] = {"n_items": n, "modes": {}}
        for m in modes:
            if m not in run_modes:
                row["modes"][m] = {"skipped": f"hooks mode is skipped above {hooks_max_items} items"}
                continue
            ms = median_ms(times[m])
            entry: dict[str, Any] = {"ms": ms, "ratio": ms / plain, "runs": len(times[m])}
            if memory:
                mem = _child_memory(setup, m, threads)
                entry["peak_delta_mb"] = mem["peak_delta"] / 2**20 if mem else None
                entry["peak_rss_mb"] = mem["peak_rss"] / 2**20 if mem else None
            row["modes"][m] = entry
        row["plain_ms"] = plain
        if "fast" in times:
            row["dp_ms"] = row["modes"]["fast"]["ms"]
            row["ratio"] = row["dp_ms"] / plain
        result["sizes"][str(n)] = row
    return result


# ------------------------------------------------------------------------------------ simulate
class TreeMemory:
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet, GCS, workers),
    sampled every ``interval`` s from /proc by a daemon thread. Shared pages count once per process.

    It also keeps the CPU seconds (user + system) each process of the tree has used, as last sampled,
    so :meth:`cpu_by_role` can say where the cores went: this process (driver: ServerApp, Flower's
    in-memory SuperLink and its polling threads), the client actors, and Ray's own daemons. A process
    that lived less than one interval may be missed; one that exits between samples keeps its last
    figure (at most ``interval`` of CPU short)."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self.peak = 0
        self.cpu_s: dict[int, tuple[str, float]] = {}  # pid → (comm, user+system CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _scan() -> tuple[dict[int, list[int]], dict[int, tuple[str, int, float]]]:
        """(children by parent pid, pid → (comm, rss bytes, CPU seconds)) of every process."""
        children: dict[int, list[int]] = {}
        procs: dict[int, tuple[str, int, float]] = {}
        page = os.sysconf("SC_PAGE_SIZE")
        ticks = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    head, tail = f.read().rsplit(")", 1)
                fields = tail.split()
                ppid, pages = int(fields[1]), int(fields[21])
                cpu = (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
            procs[int(entry)] = (head.split("(", 1)[-1], pages * page, cpu)
        return children, procs

    @staticmethod
    def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    @staticmethod
    def tree_rss(root: int) -> int:
        children, procs = TreeMemory._scan()
        return sum(procs[p][1] for p in TreeMemory._tree(root, children) if p in procs)

    def sample(self) -> None:
        children, procs = self._scan()
        root = os.getpid()
        total = 0
        for pid in self._tree(root, children):
            if pid in procs:
                comm, rss, cpu = procs[pid]
                total += rss
                self.cpu_s[pid] = (comm, cpu)
        self.peak = max(self.peak, total)

    def cpu_by_role(self, driver_cpu_before: float = 0.0) -> dict[str, float]:
        """CPU seconds of the tree since ``__enter__``: driver (minus ``driver_cpu_before``), client
        actors (``ray::ClientAppActor``), other Ray processes; the driver's figure covers all its threads."""
        roles = {"driver_cpu_s": 0.0, "client_actors_cpu_s": 0.0, "ray_other_cpu_s": 0.0}
        for pid, (comm, cpu) in self.cpu_s.items():
            if pid == os.getpid():
                roles["driver_cpu_s"] += cpu - driver_cpu_before
            elif comm.startswith("ray::ClientApp"):
                roles["client_actors_cpu_s"] += cpu
            else:
                roles["ray_other_cpu_s"] += cpu
        return roles

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def process_cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    t = os.times()
    return t.user + t.system


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages of the machine (how busy the shared cores were)."""
    return [round(x, 2) for x in os.getloadavg()]


@dataclass(frozen=True)
class SimSetup:
    tenants: int = 10
    users: int = 10_000  # in total, split iid over the tenants
    items: int = 1_000
    rounds: int = 3
    dp: bool = True
    epsilon: float = 8.0
    seed: int = 0


def prepare_synthetic_federation(setup: SimSetup, fed_dir: Any) -> float:
    """Synthetic data → ``fedrec prepare``'s federation folder; returns seconds."""
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
    from fedrec.simulations.data.sources import load

    t = time.perf_counter()
    raw = load("synthetic", columns=None, seed=setup.seed, synth_users=setup.users, synth_items=setup.items)
    prepare_federation(
        prepare_dataset(raw), fed_dir, PrepareConfig(tenants=setup.tenants, partition="iid", seed=setup.seed)
    )
    return time.perf_counter() - t


def sim_run_config(setup: SimSetup, fed_dir: Any, run_dir: Any, run_name: str) -> Any:
    from fedrec.shared_model.runconfig import RunConfig

    # The recipe is pinned (not auto) so that DP and no-DP runs time the same work per round, and the
    # sequential reference (plain FedAvg, last round) matches what the simulation computes.
    base = RunConfig(
        num_server_rounds=setup.rounds,
        dp=setup.dp,
        epsilon=setup.epsilon,
        seed=setup.seed,
        local_epochs=1.0,
        lr=3e-3,
        server_opt="fedavg",
        final_model="last",
        max_update_norm=20.0,
        release_init=0.0,  # plain DP-SGD of the whole MLP, not the DP head (one trained scalar)
    )
    return RunConfig.from_mapping(
        {
            **base.to_mapping(),
            "fed-dir": str(fed_dir),
            "run-dir": str(run_dir),
            "run-name": run_name,
            "num-tenants": setup.tenants,
            "approach": "mlp",  # the DP-SGD MLP trained every round (not the one-round item release)
        }
    )


def sequential_reference(cfg: Any, tenants: int, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The simulation's client work in one process, one thread, no Flower/Ray: every round each tenant's
    ``tenant_train`` (decrypt via the per-process cache, budget, DP training, charge, ledger), the
    users-weighted mean of the updates, then each tenant's ``tenant_evaluate`` on val; a final test eval.
    ``round_s`` holds each round's seconds (training + val evaluation), comparable with the simulated
    run's ``round_s``."""
    import torch

    from fedrec.client.task import resolve_tenant, tenant_evaluate, tenant_train
    from fedrec.client.vault import clear_cache
    from fedrec.privacy.accounting import _epsilon_of
    from fedrec.server.loop import load_catalog, model_config
    from fedrec.shared_model.codec import state_weights
    from fedrec.shared_model.model import HistoryMLP

    torch.set_num_threads(1)
    # Start as cold as a fresh worker: no decrypted tenant, no memoized ε from the simulation's driver.
    clear_cache()
    _epsilon_of.cache_clear()
    catalog = load_catalog(cfg)
    mcfg = model_config(catalog, cfg)
    torch.manual_seed(cfg.seed)
    global_w = state_weights(HistoryMLP(mcfg, catalog.genres if mcfg.n_genres else None))
    paths = [resolve_tenant({"partition-id": i}, cfg) for i in range(tenants)]
    t0 = time.perf_counter()
    train_s = eval_s = 0.0
    round_s: list[float] = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        r0 = time.perf_counter()
        t = time.perf_counter()
        updates = []
        for p in paths:
            out = tenant_train(global_w, mcfg, cfg, p, rnd)
            if out.weights is not None:
                updates.append((out.weights, out.users))
        total = sum(u for _, u in updates)
        for k in updates[0][0] if updates else ():
            global_w[k] = np.sum([w[k] * (u / total) for w, u in updates], axis=0).astype(global_w[k].dtype)
        train_s += time.perf_counter() - t
        t = time.perf_counter()
        if rnd % max(1, cfg.eval_every) == 0 or rnd == cfg.num_server_rounds:
            for p in paths:
                tenant_evaluate(global_w, mcfg, cfg, p, "val")
        eval_s += time.perf_counter() - t
        round_s.append(round(time.perf_counter() - r0, 3))
        if log is not None:
            log(f"sequential: round {rnd} {round_s[-1]:.1f} s (load average {load_average()})")
    t = time.perf_counter()
    for p in paths:
        tenant_evaluate(global_w, mcfg, cfg, p, "test")
    eval_s += time.perf_counter() - t
    return {"seconds": time.perf_counter() - t0, "train_s": train_s, "eval_s": eval_s, "round_s": round_s}


def decrypt_seconds(fed_dir: Any, tenant: str = "tenant-0") -> float:
    """One uncached decryption + parse of a tenant partition (what a cache miss costs)."""
    from pathlib import Path

    from fedrec.client.vault import load_tenant

    fed = Path(fed_dir)
    t = time.perf_counter()
    load_tenant(fed / tenant, fed / "keys" / f"{tenant}.key", expected_tenant=tenant)
    return time.perf_counter() - t


def bench_simulate(
    setup: SimSetup,
    *,
    ray_cpus: int | None = None,
    ray_address: str | None = None,
    sequential: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Wall time and peak memory of a simulated run, and of the same client work run sequentially."""
    import tempfile
    import uuid
    from pathlib import Path

    from fedrec.simulations.driver.flower_runner import run_simulation
    from fedrec.simulations.driver.simulate import _shutdown_ray

    result: dict[str, Any] = {"benchmark": "simulate", "setup": asdict(setup)}
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        fed_dir, run_dir = Path(tmp) / "fed", Path(tmp) / "run"
        log(f"simulate: preparing {setup.tenants} tenants × {setup.users} users …")
        result["prepare_s"] = prepare_synthetic_federation(setup, fed_dir)
        result["decrypt_one_tenant_s"] = decrypt_seconds(fed_dir)
        cfg = sim_run_config(setup, fed_dir, run_dir, f"bench-{uuid.uuid4().hex[:8]}")
        log(f"simulate: Flower simulation, {setup.rounds} rounds …")
        run_dir.mkdir()
        result["load_average_start"] = load_average()
        driver_before = process_cpu_s()
        with TreeMemory() as mem:
            t = time.perf_counter()
            try:
                run_simulation(cfg.to_mapping(), setup.tenants, ray_cpus=ray_cpus, ray_address=ray_address)
            finally:
                _shutdown_ray()
            result["simulated_s"] = time.perf_counter() - t
        result["simulated_peak_tree_rss_mb"] = mem.peak / 2**20
        result["simulated_cpu"] = mem.cpu_by_role(driver_before)
        result["load_average_after_simulation"] = load_average()
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        result["round_s"] = [r.get("seconds") for r in rounds]
        result["completed_rounds"] = len(rounds)
        if sequential:
            log("simulate: the same client work sequentially in this process …")
            ref_cfg = sim_run_config(setup, fed_dir, Path(tmp) / "ref", f"bench-ref-{uuid.uuid4().hex[:8]}")
            before = maxrss_bytes()
            ref = sequential_reference(ref_cfg, setup.tenants, log)
            result["sequential_s"] = ref["seconds"]
            result["sequential_train_s"] = ref["train_s"]
            result["sequential_eval_s"] = ref["eval_s"]
            result["sequential_peak_rss_mb"] = maxrss_bytes() / 2**20
            result["sequential_rss_before_mb"] = before / 2**20
            result["sequential_round_s"] = ref["round_s"]
            result["overhead"] = result["simulated_s"] / ref["seconds"]
            result["load_average_end"] = load_average()
    result["cpus"] = os.cpu_count()
    return result

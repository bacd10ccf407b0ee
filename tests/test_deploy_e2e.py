"""End to end: a real deployment on 127.0.0.1 — `flower-superlink` (TLS, SuperNode authentication,
--database) + 2 `flower-supernode`s (each on an encrypted tenant folder made by `fedrec prepare`),
driven with the `fedrec deploy` commands a user runs.

Order (one module-scoped deployment; the tests run in file order and build on each other):

1. a 2-round run with DP and SecAgg+ → ``finished:completed`` (``flwr ls --format json``; ``flwr run``
   exits 0 on failure), RUN_DIR outputs, both partners' ledgers (and ``fedrec audit --ledger``);
2. negative cases against the live SuperLink: an unregistered key, a SuperNode without the CA, a
   plaintext SuperNode, plain HTTP, a plaintext ``flwr`` CLI connection — every one must be refused;
3. restart **between runs**: tenant-0's SuperNode and the SuperLink are stopped and restarted (same
   key, same state dir, same --database); tenant-1's SuperNode stays up and must reconnect by itself.
   Run 1 is still listed as completed, and a resume of the same run (round 3; DP only, to keep the
   test short) finds tenant-0's spent ε where it was — so round 3, which would cross the cap, is
   refused (``capped``) instead of being trained on a budget reset to zero.

Every process runs in its own session and is stopped by PID (its group, then any descendant left),
even when a test fails; FLWR_HOME dirs are fresh; ports are free ones. Figures (wall time, bytes,
ε) are printed and written to ``measurements.json`` in the test's temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from fedrec.privacy.ledger import read_entries, verify_chain
from fedrec.simulations.deploy.kit import (
    Deployment,
    flower_env,
    make_auth_keypair,
    node_config_string,
    parse_json_output,
    run_status,
    supernode_command,
)

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDREC = [sys.executable, "-m", "fedrec"]
ROUNDS, EPSILON, USERS, ITEMS = 2, 6.0, 240, 120
RUN_TIMEOUT = 480.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ processes, stopped by PID
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Proc:
    """A Flower process in its own session (Flower detaches its SuperExec/app processes into new
    sessions too, so :meth:`stop` also signals every descendant it finds, by PID)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._out: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, timeout: float = 20.0) -> None:
        pid = self.popen.pid
        family = _descendants(pid)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                self.popen.wait(10)
        family += [p for p in _descendants(pid) if p not in family]
        deadline = time.monotonic() + 10
        for child in family:
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        self._out.close()

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.dep = Deployment(root / "op")
        self.fed = root / "fed"
        self.port = free_port()
        self.node_ports = [free_port(), free_port()]
        self.figures: dict[str, Any] = {}
        self.run_id: int | None = None

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, cmd, env, self.root / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def fedrec(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.dep.env(), "COLUMNS": "200"}
        return subprocess.run([*FEDREC, *args], env=env, capture_output=True, text=True, timeout=timeout)

    def flwr(self, *args: str, home: Path | None = None, timeout: float = 60.0) -> dict[str, Any]:
        env = {**os.environ, **(flower_env(home) if home else self.dep.env())}
        proc = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return parse_json_output(proc.stdout) or {"success": False, "stdout": proc.stdout[-500:]}

    def start_superlink(self) -> Proc:
        proc = self.start("superlink", ["bash", str(self.dep.scripts / "superlink.sh")], {})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # ready when the Control API answers over TLS
            if self.flwr("ls", "fedrec").get("success"):
                return proc
            assert proc.popen.poll() is None, "SuperLink exited:\n" + proc.tail()
            time.sleep(1)
        raise AssertionError("SuperLink not ready within 90 s:\n" + proc.tail())

    def partner_dir(self, i: int) -> Path:
        return self.root / f"partner-{i}"

    def start_supernode(self, i: int) -> Proc:
        return self.start(f"supernode-{i}", ["bash", str(self.partner_dir(i) / "supernode.sh")], {})

    def online_nodes(self) -> int:
        nodes = self.flwr("supernode", "ls", "fedrec").get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_nodes(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} SuperNodes online within {timeout:g} s")
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("deploy"))
    try:
        yield c
    finally:
        c.stop_all()
        print(json.dumps(c.figures, indent=1))
        (c.root / "measurements.json").write_text(json.dumps(c.figures, indent=1))


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def deployed(cluster: Cluster) -> Cluster:
    """Prepare, init, partners, SuperLink, registration, SuperNodes, a 2-round DP + SecAgg+ run."""
    c = cluster
    t0 = time.perf_counter()
    _ok(
        c.fedrec(
            "prepare", "--data", "synthetic", "--synth-users", str(USERS), "--synth-items", str(ITEMS),
            "--seed", "2", "--tenants", "2", "--out", str(c.fed),
        )
    )  # fmt: skip
    _ok(
        c.fedrec(
            "deploy", "init", str(c.dep.root), "--address", f"127.0.0.1:{c.port}", "--host", "127.0.0.1",
            "--app-dir", str(APP_DIR),
        )
    )  # fmt: skip
    for i in range(2):
        t = f"tenant-{i}"
        _ok(
            c.fedrec(
                "deploy", "partner", str(c.partner_dir(i)), "--name", t, "--superlink", f"127.0.0.1:{c.port}",
                "--ca", str(c.dep.ca_cert), "--tenant-dir", str(c.fed / t), "--key-file",
                str(c.fed / "keys" / f"{t}.key"), "--state-dir", str(c.partner_dir(i) / "state"),
                "--node-port", str(c.node_ports[i]),
            )
        )  # fmt: skip
        _ok(c.fedrec("deploy", "add-partner", str(c.dep.root), t, str(c.partner_dir(i) / "auth.key.pub")))
    c.start_superlink()
    reg = _ok(subprocess.run(["bash", str(c.dep.scripts / "register.sh")], capture_output=True, text=True))
    assert reg.count('"success": true') == 2, reg
    for i in range(2):
        c.start_supernode(i)
    c.wait_nodes(2)
    t_run = time.perf_counter()
    out = _ok(
        c.fedrec(
            "deploy", "launch", str(c.dep.root), "--run-dir", str(c.root / "run"), "--catalog",
            str(c.fed / "catalog.json"), "--max-users", str(USERS), "--rounds", str(ROUNDS),
            "--run-name", "r1",
            "--epsilon", str(EPSILON), "--set", "batch-users=32", "--set", "round-timeout=300.0",
            "--set", "release-init=0.0",  # plain DP-SGD rounds (approach mlp under DP trains the DP head)
            "--set", "node-wait-timeout=60.0", "--set", "eval-every=2", "--wait",
            "--timeout", str(RUN_TIMEOUT),
            timeout=RUN_TIMEOUT + 120,
        )
    )  # fmt: skip
    c.figures["run_seconds"] = round(time.perf_counter() - t_run, 1)
    c.figures["setup_and_run_seconds"] = round(time.perf_counter() - t0, 1)
    c.run_id = int(out.split("run ", 1)[1].split()[0])
    return c


# ------------------------------------------------------------------ 1. the run
def test_two_round_dp_secagg_run_completes(deployed: Cluster) -> None:
    c = deployed
    assert c.run_id is not None
    listing = c.flwr("ls", "fedrec", "--run-id", str(c.run_id))
    run = listing["runs"][0]
    assert run["status"] == "finished:completed", run
    traffic = run["network-traffic"]
    c.figures["run1_network_bytes"] = traffic
    run_dir = c.root / "run"
    for name in ("metrics.json", "model.pt", "model.json", "config.json", "rounds.jsonl", "privacy.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["aggregated"] == 2 and r["failures"] == [], r
        assert r["secagg"]["reported"] == 2 and r["secagg"]["threshold"] == 2
        assert set(r["tenants"]) == {"tenant-0", "tenant-1"}
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["dp"] is True and "secagg" in privacy
    for t in ("tenant-0", "tenant-1"):
        info = privacy["tenants"][t]
        assert info["rounds_trained"] == 2 and 0 < info["epsilon"] <= EPSILON
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Σ of the tenants' noisy counts ñ (σ_c = 20 each, docs/TRANSCRIPT.md), never the exact count
    assert "hr@10" in metrics["full"] and abs(metrics["dataset"]["users"] - USERS) <= 6 * 20 * 2
    # Bytes: Flower's own per-run accounting at the SuperLink; inbound = what the SuperNodes sent.
    import torch

    state = torch.load(run_dir / "model.pt", weights_only=True)
    sd = state.get("state_dict", state)
    params = sum(v.numel() * v.element_size() for k, v in sd.items() if k != "genres")
    per_node_round = traffic["inbound-bytes"] / 2 / ROUNDS
    c.figures["model_parameter_bytes"] = int(params)
    c.figures["inbound_bytes_per_node_per_round"] = round(per_node_round)
    c.figures["inbound_over_model"] = round(per_node_round / params, 2)


def test_each_partner_holds_a_verifiable_ledger_that_matches_the_coordinators_copy(deployed: Cluster) -> None:
    c = deployed
    for i in range(2):
        t = f"tenant-{i}"
        own = c.partner_dir(i) / "state" / "r1" / "ledger.jsonl"
        entries, problems = read_entries(own)
        assert problems == [] and verify_chain(entries) == []
        # the noisy count (round 0), two rounds, the DP test evaluation (round 3)
        assert [e["round"] for e in entries] == [0, 1, 2, 3]
        assert all(e["tenant"] == t and e["unit"] == "user" for e in entries)
        copy, _ = read_entries(c.root / "run" / "ledger" / f"{t}.jsonl")
        assert [e["hash"] for e in copy] == [e["hash"] for e in entries]
        audit = c.fedrec("audit", "--ledger", str(own), "--head", entries[-1]["hash"])
        assert audit.returncode == 0, audit.stdout + audit.stderr
        c.figures[f"{t}_epsilon_after_run1"] = entries[-1]["epsilon"]


# ------------------------------------------------------------------ 2. refused connections
def test_unauthenticated_untrusted_and_plaintext_connections_are_refused(deployed: Cluster) -> None:
    c = deployed
    neg = c.root / "neg"
    neg.mkdir()
    stranger = neg / "stranger.key"
    stranger.write_bytes(make_auth_keypair()[0])
    stranger.chmod(0o600)
    node_cfg = node_config_string(c.fed / "tenant-0", c.fed / "keys" / "tenant-0.key", neg / "state")
    address = f"127.0.0.1:{c.port}"

    def supernode(name: str, ca: Path | None, key: Path | None, insecure: bool = False) -> Proc:
        cmd = supernode_command(
            superlink=address,
            ca_cert=ca or Path("/nonexistent"),
            auth_key=key,
            node_config=node_cfg,
            port=free_port(),
            max_wait_time=15,
        )
        if ca is None:  # no --root-certificates: the system store, which does not hold our CA
            i = cmd.index("--root-certificates")
            del cmd[i : i + 2]
        if insecure:
            cmd.append("--insecure")
        return c.start(name, cmd, flower_env(neg / f"home-{name}"))

    def refused(proc: Proc) -> bool:
        try:
            return proc.popen.wait(90) != 0  # exited with an error
        except subprocess.TimeoutExpired:
            return False  # still running after 90 s: it was not refused
        finally:
            proc.stop()

    attempts = {  # concurrently: each retries until --max-wait-time
        "unregistered key": supernode("unregistered", c.dep.ca_cert, stranger),
        "SuperNode without the CA": supernode("no-ca", None, c.partner_dir(0) / "auth.key"),
        "plaintext SuperNode": supernode("plaintext", None, None, insecure=True),
    }
    cases = {name: refused(proc) for name, proc in attempts.items()}
    try:
        httpx.get(f"http://127.0.0.1:{c.port}/", timeout=10)
        cases["plain HTTP request"] = False
    except httpx.HTTPError:
        cases["plain HTTP request"] = True
    home = neg / "plain-cli"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\naddress = "{address}"\ninsecure = true\n'
    )
    cases["plaintext flwr CLI"] = not c.flwr("ls", "plain", home=home).get("success")
    c.figures["refused_connections"] = f"{sum(cases.values())}/{len(cases)}"
    c.figures["refused_cases"] = cases
    assert all(cases.values()), cases
    assert c.online_nodes() == 2  # the two registered partners only


# ------------------------------------------------------------------ 3. restarts keep the budget
def test_restarted_supernode_and_superlink_keep_runs_ledger_and_spent_epsilon(deployed: Cluster) -> None:
    c = deployed
    node0 = next(p for p in c.procs if p.name == "supernode-0")
    link = next(p for p in c.procs if p.name == "superlink")
    ledger0 = c.partner_dir(0) / "state" / "r1" / "ledger.jsonl"
    before, _ = read_entries(ledger0)
    eps_before = before[-1]["epsilon"]
    node0.stop()
    link.stop()
    c.start_superlink()  # same --database
    assert run_status(c.dep, c.run_id or 0) == "finished:completed"  # run history survived the restart
    c.start_supernode(0)
    c.wait_nodes(2, timeout=180)  # tenant-0 restarted; tenant-1 reconnected by itself
    t0 = time.perf_counter()
    out = _ok(
        c.fedrec(
            "deploy", "launch", str(c.dep.root), "--run-dir", str(c.root / "run"), "--catalog",
            str(c.fed / "catalog.json"), "--max-users", str(USERS), "--rounds", str(ROUNDS + 1),
            "--run-name", "r1", "--epsilon", str(EPSILON), "--set", "batch-users=32", "--set", "resume=true",
            "--set", "release-init=0.0",
            "--set", "secagg=false", "--set", "round-timeout=300.0", "--set", "node-wait-timeout=60.0",
            "--wait", "--timeout", str(RUN_TIMEOUT), timeout=RUN_TIMEOUT + 120,
        )
    )  # fmt: skip
    c.figures["restart_run_seconds"] = round(time.perf_counter() - t0, 1)
    assert "finished:completed" in out
    rows = [json.loads(line) for line in (c.root / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    third = rows[-1]["tenants"]["tenant-0"]
    after, problems = read_entries(ledger0)
    c.figures["restart"] = {
        "epsilon_before_restart": eps_before,
        "epsilon_reported_after_restart": third["epsilon"],
        "round3_status": third["status"],
        "ledger_entries_before": len(before),
        "ledger_entries_after": len(after),
    }
    # The restarted SuperNode found its spent ε (not 0): round 3 would cross the cap, so it refused.
    assert third["status"] == "capped" and third["epsilon"] == pytest.approx(eps_before)
    assert problems == [] and [e["hash"] for e in after] == [e["hash"] for e in before]
    assert rows[-1]["aggregated"] == 0

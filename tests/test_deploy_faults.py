"""Real faults on a real deployment: `flower-superlink` (TLS, SuperNode authentication, --database) +
3 `flower-supernode`s, DP and SecAgg+ on (threshold 2 of 3), driven by `fedrec deploy` — the harness of
``tests/test_deploy_e2e.py`` with one more partner.

One deployment and one run (``ROUNDS`` rounds, then a ``deploy launch --resume`` of the same run) carry
every fault; ``deploy launch``'s default ``rejoin-wait`` (150 s) makes each round wait for restarted
partners, so every round starts with the three partners and the plan below is exact. Per round
(partners, stages and delays drawn from the seed printed in the output; ``FEDREC_FAULT_SEED=… pytest …``
replays them):

1–3. one SuperNode SIGKILLed (with every process under it) when it receives the k-th SecAgg+ message of
     the round (k = the stage: 1 setup, 2 share keys, 3 collect masked vectors, 4 unmask; the four
     stages are dealt over rounds 1–4 in a seeded order): 1 of 3 lost, within the threshold; in the
     same round another partner's state dir is read-only (it must refuse to train, say so and
     charge nothing; the third partner goes on; never the same partner two rounds running, so that
     "writable again, it trains in the next round" is checked);
4.   two SuperNodes SIGKILLed at the remaining stage: 2 of 3 lost, beyond the threshold;
5.   one SuperNode SIGKILLed and another SIGSTOPped at the same stage (beyond the threshold), the
     stopped one held past ``round-timeout`` and SIGCONTed once the round is closed;
6.   the SuperLink (with its SuperExec and the ServerApp) SIGKILLed at a seeded SecAgg+ message,
     restarted on the same ``--database``; ``fedrec deploy launch --resume`` continues the run; a
     state dir is read-only from the round's start until the resumed round closes.

That is 12 faults in 6 rounds. The SuperNodes heartbeat every ``HEARTBEAT`` (10 s, Flower's least,
instead of its fixed 30 s: ``tests/fast_heartbeat/sitecustomize.py`` on their ``PYTHONPATH``), so the
SuperLink reports a silent SuperNode "Node Unavailable" after 20 s instead of 60 s and a lost node costs
≤ 20 s of its round; ``round-timeout`` is 45 s, above those 20 s with room for a slow honest stage.
Killed SuperNodes are restarted (same key, same state dir) once the SuperLink lists them offline (a
restart before that is refused: the key is still "online"). After the run, per fault: rounds.jsonl
names the lost node and the effect (aggregated without it, or unchanged); every partner's ledger
verifies with ``fedrec audit --ledger``; no round is charged twice; a round charged before the fault
stays charged; the coordinator's copies equal the partners' own; no process started is left (by PID).
The fault table is printed and written to ``faults.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fedrec.privacy.ledger import read_entries, verify_chain
from tests.test_deploy_e2e import APP_DIR, Cluster, Proc, _alive, _descendants, _ok, free_port

pytestmark = pytest.mark.slow

PARTNERS, ROUNDS, EPSILON, USERS, ITEMS = 3, 6, 8.0, 180, 80
#: the SuperNodes' heartbeat interval (s): tests/fast_heartbeat/sitecustomize.py's INTERVAL; the SuperLink
#: marks a silent node offline after 2 of them (HEARTBEAT_PATIENCE)
HEARTBEAT = 10.0
FAST_HEARTBEAT = Path(__file__).resolve().parent / "fast_heartbeat"
ROUND_TIMEOUT = 45.0  # per SecAgg+ stage; > the 2 × HEARTBEAT after which a silent node is offline
RUN_TIMEOUT = 900.0
# CI replays seed 128692 (it passed end to end). FEDREC_FAULT_SEED=random draws a fresh one: seed 282067
# found a partner refused before its first charge (read-only dir in round 1) still refused in round 2.
_ASKED = os.environ.get("FEDREC_FAULT_SEED", "128692")
SEED = secrets.randbelow(1_000_000) if _ASKED == "random" else int(_ASKED)
STAGES = ["setup", "share keys", "collect masked vectors", "unmask"]
THRESHOLD = PARTNERS // 2 + 1


def tenant(i: int) -> str:
    return f"tenant-{i}"


def wait_until(what: str, check: Callable[[], Any], timeout: float, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"[seed {SEED}] {what}: not within {timeout:g} s")
        time.sleep(poll)


def received(log: Path, run_id: int, group: str) -> int:
    """How many messages of ``group`` (the round) of run ``run_id`` a SuperNode's log says it received."""
    text = log.read_text(errors="replace") if log.exists() else ""
    n, current = 0, ""
    for line in text.splitlines():
        m = re.search(r"\[RUN (\d+)(?:, ROUND ([^\]]+))?\]", line)
        if m:
            current = f"{m.group(1)}/{m.group(2) or ''}"
        elif "Receiving:" in line and current == f"{run_id}/{group}":
            n += 1
    return n


def rounds_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return rows


def row_of(run_dir: Path, rnd: int) -> dict[str, Any] | None:
    return next((r for r in reversed(rounds_rows(run_dir)) if r["round"] == rnd), None)


class FaultCluster(Cluster):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.node_ports = [free_port() for _ in range(PARTNERS)]
        self.seen_pids: set[int] = set()
        self.faults: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        with self.lock:
            proc = super().start(name, cmd, env)
            self.seen_pids.add(proc.popen.pid)
        return proc

    def note_family(self) -> None:
        for proc in list(self.procs):
            self.seen_pids.update(_descendants(proc.popen.pid))

    def start_supernode(self, i: int) -> Proc:
        """Partner ``i``'s ``supernode.sh`` (as the user runs it), its Python processes heartbeating
        every ``HEARTBEAT``."""
        path = os.pathsep.join(p for p in (str(FAST_HEARTBEAT), os.environ.get("PYTHONPATH", "")) if p)
        return self.start(
            f"supernode-{i}", ["bash", str(self.partner_dir(i) / "supernode.sh")], {"PYTHONPATH": path}
        )

    def supernode(self, i: int) -> Proc:
        return [p for p in self.procs if p.name == f"supernode-{i}"][-1]

    def superlink(self) -> Proc:
        return [p for p in self.procs if p.name == "superlink"][-1]

    def signal_family(self, proc: Proc, sig: signal.Signals) -> list[int]:
        pids = [proc.popen.pid, *_descendants(proc.popen.pid)]
        self.seen_pids.update(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def ledger(self, i: int, run_name: str) -> Path:
        return self.partner_dir(i) / "state" / run_name / "ledger.jsonl"

    def fedrec_all(self, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
        """Independent ``fedrec`` commands run side by side (each process spends seconds importing)."""
        with ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda args: self.fedrec(*args), commands))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    print(f"\nfault seed: FEDREC_FAULT_SEED={SEED}")
    c = FaultCluster(tmp_path_factory.mktemp("faults"))
    try:
        yield c
    finally:
        c.note_family()
        c.stop_all()
        left = sorted(p for p in c.seen_pids if _alive(p))
        for pid in left:  # never leave one behind, even when the check below fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        c.figures["leftover_processes"] = left
        c.figures["seed"] = SEED
        c.figures["faults"] = c.faults
        print(json.dumps(c.figures, indent=1))
        (c.root / "faults.json").write_text(json.dumps(c.figures, indent=1))
        assert left == [], f"[seed {SEED}] processes left running: {left}"


@pytest.fixture(scope="module")
def deployed(cluster: FaultCluster) -> FaultCluster:
    c = cluster
    t0 = time.perf_counter()
    for done in c.fedrec_all(
        ["prepare", "--data", "synthetic", "--synth-users", str(USERS), "--synth-items", str(ITEMS),
         "--seed", "3", "--tenants", str(PARTNERS), "--out", str(c.fed)],
        ["deploy", "init", str(c.dep.root), "--address", f"127.0.0.1:{c.port}", "--host", "127.0.0.1",
         "--app-dir", str(APP_DIR)],
    ):  # fmt: skip
        _ok(done)
    for done in c.fedrec_all(*(
        ["deploy", "partner", str(c.partner_dir(i)), "--name", tenant(i), "--superlink", f"127.0.0.1:{c.port}",
         "--ca", str(c.dep.ca_cert), "--tenant-dir", str(c.fed / tenant(i)), "--key-file",
         str(c.fed / "keys" / f"{tenant(i)}.key"), "--state-dir", str(c.partner_dir(i) / "state"),
         "--node-port", str(c.node_ports[i])]
        for i in range(PARTNERS)
    )):  # fmt: skip
        _ok(done)
    for i in range(PARTNERS):  # one at a time: each rewrites the deployment's partner list
        _ok(
            c.fedrec(
                "deploy", "add-partner", str(c.dep.root), tenant(i), str(c.partner_dir(i) / "auth.key.pub")
            )
        )
    c.start_superlink()
    reg = _ok(subprocess.run(["bash", str(c.dep.scripts / "register.sh")], capture_output=True, text=True))
    assert reg.count('"success": true') == PARTNERS, reg
    for i in range(PARTNERS):
        c.start_supernode(i)
    c.wait_nodes(PARTNERS, timeout=180)
    c.figures["setup_seconds"] = round(time.perf_counter() - t0, 1)
    return c


def launch(c: FaultCluster, run_dir: Path, run_name: str, *extra: str) -> int:
    out = _ok(
        c.fedrec(
            "deploy", "launch", str(c.dep.root), "--run-dir", str(run_dir), "--catalog",
            str(c.fed / "catalog.json"), "--max-users", str(USERS), "--rounds", str(ROUNDS),
            "--run-name", run_name, "--epsilon", str(EPSILON), "--set", "batch-users=32",
            "--set", f"round-timeout={ROUND_TIMEOUT}", "--set", "node-wait-timeout=180.0",
            "--set", "min-tenants=1",
            "--set", "release-init=0.0",  # plain DP-SGD rounds (approach mlp under DP trains the DP head)
            "--set", f"eval-every={ROUNDS}", *extra,
        )
    )  # fmt: skip
    return int(re.search(r"run (\d+) submitted", out).group(1))  # type: ignore[union-attr]


def run_status(c: FaultCluster, run_id: int) -> str:
    runs = c.flwr("ls", "fedrec", "--run-id", str(run_id)).get("runs") or [{}]
    return str(runs[0].get("status", ""))


def node_id(c: FaultCluster, i: int) -> int:
    """Partner ``i``'s SuperNode id, from its log (the same across restarts: bound to its auth key)."""
    for proc in [p for p in c.procs if p.name == f"supernode-{i}"]:
        m = re.search(r"SuperNode ID: (\d+)", proc.log.read_text(errors="replace"))
        if m:
            return int(m.group(1))
    raise AssertionError(f"no SuperNode ID in {tenant(i)}'s log")


def node_online(c: FaultCluster, nid: int) -> bool | None:
    """Whether the SuperLink lists node ``nid`` online (None when the listing failed)."""
    got = c.flwr("supernode", "ls", "fedrec")
    if not got.get("success", True) or "nodes" not in got:
        return None
    return any(str(n.get("node-id")) == str(nid) and n.get("status") == "online" for n in got["nodes"])


def restart_when_offline(c: FaultCluster, i: int, nid: int) -> threading.Thread:
    """Restart partner ``i``'s killed SuperNode (same key, same state dir) once the SuperLink lists it
    offline — what a supervisor with ``RestartSec`` ≥ 2 heartbeats does. Not asked before 15 s: its
    last heartbeat was ≤ 4.5 s before the kill (they come every 0.7–0.9 × (``HEARTBEAT`` − 5 s)) and the
    SuperLink waits 2 × ``HEARTBEAT`` after it (each ``flwr`` call costs a second of CPU that the
    surviving partners' ClientApps need)."""

    def go() -> None:
        deadline = time.monotonic() + 300
        time.sleep(2 * HEARTBEAT - 5)
        while time.monotonic() < deadline and node_online(c, nid) is not False:
            time.sleep(2)
        c.start_supernode(i)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def make_read_only(folder: Path) -> str:
    """Make ``folder`` read-only for real: mode 0500 (enough unless root), else ``chattr +i`` (root on
    ext4 and similar); "" when neither stops a write here."""
    folder.chmod(0o500)
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"x")
    except OSError:
        return "chmod 0500"
    probe.unlink()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0:
        try:
            probe.write_bytes(b"x")
        except OSError:
            return "chattr +i"
        probe.unlink()
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
    folder.chmod(0o700)
    return ""


def undo_read_only(folder: Path, how: str) -> None:
    if how == "chattr +i":
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o700)


def ledger_rounds(c: FaultCluster, i: int, run_name: str) -> list[int]:
    return [int(e["round"]) for e in read_entries(c.ledger(i, run_name))[0]]


def eps_at(entries: list[dict[str, Any]], rnd: int) -> float:
    """A partner's cumulative ε after every entry of a round ≤ ``rnd`` (0 before any)."""
    got = [float(e["epsilon"]) for e in entries if int(e["round"]) <= rnd]
    return round(got[-1], 3) if got else 0.0


# ------------------------------------------------------------------ the plan
def plan(rng: random.Random) -> list[dict[str, Any]]:
    """Round → faults: partners killed / stopped, the SecAgg+ message k (1..4) that triggers it, a
    partner whose state dir is read-only for the round."""
    order = rng.sample(range(1, 5), 4)  # the stage of each SuperNode kill, one per stage
    steps: list[dict[str, Any]] = []
    for r, k in enumerate(order[:3], start=1):  # within the threshold: 1 of 3 lost
        victim = rng.randrange(PARTNERS)
        others = [i for i in range(PARTNERS) if i != victim]
        read_only = rng.choice(others)
        if steps and read_only == steps[-1]["read_only"]:
            # never read-only two rounds running: "writable again, it trains in the next round" must be
            # checkable (seed 282067 drew tenant-0 in rounds 1 and 2; its round-2 refusal was this plan's)
            read_only = next(i for i in others if i != read_only)
        steps.append({"round": r, "kill": [victim], "stop": [], "at": k, "read_only": read_only})
    # beyond the threshold: 2 of 3 lost at the same stage (both killed; then one killed, one stopped)
    steps.append({"round": 4, "kill": rng.sample(range(PARTNERS), 2), "stop": [], "at": order[3]})
    pair = rng.sample(range(PARTNERS), 2)
    steps.append({"round": 5, "kill": [pair[0]], "stop": [pair[1]], "at": rng.randint(1, 3)})
    # the SuperLink killed mid-round while a state dir is read-only (it stays so in the resumed round)
    steps.append(
        {"round": 6, "superlink": True, "at": rng.randint(1, 4), "read_only": rng.randrange(PARTNERS)}
    )
    for s in steps:
        s["delay"] = round(rng.uniform(0.0, 0.5), 2)
    return steps


def took_part(c: FaultCluster, i: int, rnd: int, runs: tuple[int, ...]) -> bool:
    """Whether partner ``i``'s SuperNode (any of its restarts) received a message of round ``rnd``."""
    logs = [p.log for p in c.procs if p.name == f"supernode-{i}"]
    return any(received(log, run, str(rnd)) >= 1 for log in logs for run in runs)


def hit(
    c: FaultCluster, run_id: int, rnd: int, targets: list[tuple[int, signal.Signals]], k: int, delay: float
):
    """Signal each target partner's SuperNode family when it receives its k-th message of ``rnd``."""
    pending = dict(targets)
    pids: dict[int, list[int]] = {}
    deadline = time.monotonic() + 600
    while pending:
        for i, sig in list(pending.items()):
            node = c.supernode(i)
            if received(node.log, run_id, str(rnd)) >= k:
                time.sleep(delay)
                pids[i] = c.signal_family(node, sig)
                del pending[i]
        assert time.monotonic() < deadline, f"[seed {SEED}] round {rnd}: message {k} never reached {pending}"
        time.sleep(0.1)
    return pids


def test_faults_during_a_run_lose_nothing_and_charge_nothing_twice(deployed: FaultCluster) -> None:
    c = deployed
    rng = random.Random(SEED)
    steps = plan(rng)
    for s in steps:
        print(f"[seed {SEED}] plan {json.dumps(s)}")
    run_dir, run_name = c.root / "run", "faults"
    nids = {i: node_id(c, i) for i in range(PARTNERS)}
    t0 = time.perf_counter()
    run_id = launch(c, run_dir, run_name)
    restarts: list[threading.Thread] = []
    charged_before: dict[int, dict[str, list[int]]] = {}
    facts: dict[int, dict[str, Any]] = {}
    resumed_id = 0

    for s in steps:
        rnd, k = s["round"], s.get("at", 1)
        current = resumed_id or run_id
        # the round has started for every partner (rejoin-wait: all three are back)
        wait_until(f"round {rnd} starts", lambda r=rnd, cur=current: any(
            received(c.supernode(i).log, cur, str(r)) >= 1 for i in range(PARTNERS)
        ), 900, 0.2)  # fmt: skip
        charged_before[rnd] = {tenant(i): ledger_rounds(c, i, run_name) for i in range(PARTNERS)}
        ro, ro_how, ro_bytes = s.get("read_only"), "", b""
        if ro is not None:
            folder = c.ledger(ro, run_name).parent
            folder.mkdir(parents=True, exist_ok=True)  # round 1: nothing written there yet
            ro_bytes = c.ledger(ro, run_name).read_bytes() if c.ledger(ro, run_name).exists() else b""
            ro_how = make_read_only(folder)
        fact: dict[str, Any] = {"read_only_how": ro_how}
        facts[rnd] = fact
        if s.get("superlink"):
            watch = c.supernode(0)
            wait_until(
                f"round {rnd} message {k}",
                lambda r=rnd, w=watch, k=k: received(w.log, run_id, str(r)) >= k,
                600,
                0.1,
            )
            time.sleep(s["delay"])
            link = c.superlink()
            c.signal_family(link, signal.SIGKILL)
            link.popen.wait(30)
            fact["rows_at_kill"] = [r["round"] for r in rounds_rows(run_dir)]
            fact["charged_at_kill"] = {tenant(i): ledger_rounds(c, i, run_name) for i in range(PARTNERS)}
            c.start_superlink()
            # launched at once: the resumed ServerApp waits for the SuperNodes to reconnect by themselves
            resumed_id = launch(c, run_dir, run_name, "--resume")
            fact["resumed_run"] = resumed_id
        targets = [(i, signal.SIGKILL) for i in s.get("kill", [])] + [
            (i, signal.SIGSTOP) for i in s.get("stop", [])
        ]
        if targets:
            pids = hit(c, current, rnd, targets, k, s["delay"])
            t_stop = time.monotonic()
            for i in s["kill"]:
                c.supernode(i).popen.wait(30)
                restarts.append(restart_when_offline(c, i, nids[i]))
        wait_until(f"round {rnd} closes", lambda r=rnd: row_of(run_dir, r), 900, 0.5)
        if ro is not None:
            undo_read_only(c.ledger(ro, run_name).parent, ro_how)
            after = c.ledger(ro, run_name).read_bytes() if c.ledger(ro, run_name).exists() else b""
            fact["read_only_ledger_unchanged"] = after == ro_bytes
        for i in s.get("stop", []):
            wait_until(
                "held past round-timeout", lambda t=t_stop: time.monotonic() - t > ROUND_TIMEOUT + 2, 120, 0.5
            )
            fact["held_s"] = round(time.monotonic() - t_stop, 1)
            for pid in pids[i]:
                if _alive(pid):
                    os.kill(pid, signal.SIGCONT)

    asked = [0.0]

    def finished() -> str:
        # the ServerApp writes privacy.json last: ask the SuperLink (a `flwr` process) every 3 s from
        # then on, and every 20 s before (a run that fails writes none)
        if not (run_dir / "privacy.json").exists() and time.monotonic() - asked[0] < 20:
            return ""
        asked[0] = time.monotonic()
        st = run_status(c, resumed_id)
        return st if st.startswith("finished:") else ""

    status = wait_until("the resumed run finishes", finished, timeout=RUN_TIMEOUT, poll=1)
    for t in restarts:
        t.join(5)
    c.note_family()
    c.figures["run_seconds"] = round(time.perf_counter() - t0, 1)
    rows = rounds_rows(run_dir)
    c.figures["rounds"] = [
        {
            k: r.get(k)
            for k in (
                "round",
                "aggregated",
                "failures",
                "unchanged",
                "resumed_from",
                "waited_for_rejoin",
                "seconds",
            )
        }
        | {"tenants": {t: (i["status"], i.get("aggregated")) for t, i in r["tenants"].items()}}
        for r in rows
    ]
    where = f"[seed {SEED}] rows {json.dumps(c.figures['rounds'])}"
    assert status == "finished:completed", f"{status} {where}"
    by_round = {r["round"]: r for r in rows}  # the resumed run's row replaces a killed run's one
    assert sorted(by_round) == list(range(1, ROUNDS + 1)), where

    # ledgers: verify, no round twice, coordinator copy == partner's own, charged rounds stay charged
    entries: dict[str, list[dict[str, Any]]] = {}
    own_entries = {i: read_entries(c.ledger(i, run_name)) for i in range(PARTNERS)}
    audits = c.fedrec_all(*(
        ["audit", "--ledger", str(c.ledger(i, run_name)), "--head", own_entries[i][0][-1]["hash"]]
        for i in range(PARTNERS)
    ))  # fmt: skip
    for i in range(PARTNERS):
        got, problems = own_entries[i]
        assert problems == [] and verify_chain(got) == [], f"[seed {SEED}] {tenant(i)}: {problems}"
        rounds = [int(e["round"]) for e in got]
        assert len(rounds) == len(set(rounds)), f"[seed {SEED}] {tenant(i)} charged twice: {rounds}"
        audit = audits[i]
        assert audit.returncode == 0, f"[seed {SEED}] " + audit.stdout + audit.stderr
        copy, _ = read_entries(run_dir / "ledger" / f"{tenant(i)}.jsonl")
        assert [e["hash"] for e in copy] == [e["hash"] for e in got], (
            f"[seed {SEED}] coordinator's copy of {tenant(i)} differs: {[e['round'] for e in copy]} vs {rounds}"
        )
        for rnd, before in charged_before.items():
            assert set(before[tenant(i)]) <= set(rounds), (
                f"[seed {SEED}] {tenant(i)} lost a charge after {rnd}"
            )
        entries[tenant(i)] = got
    c.figures["charged_rounds"] = {t: [int(e["round"]) for e in es] for t, es in entries.items()}

    link_log = "\n".join(p.log.read_text(errors="replace") for p in c.procs if p.name == "superlink")
    for s in steps:
        rnd = s["round"]
        row, fact = by_round[rnd], facts[rnd]
        eps = {t: (eps_at(es, rnd - 1), eps_at(es, rnd)) for t, es in entries.items()}
        base = {"round": rnd, "seed": SEED, "stage": STAGES[s.get("at", 1) - 1] if "at" in s else "",
                "rounds_completed": len(by_round), "epsilon_before_after": eps}  # fmt: skip
        lost = {f.get("node") for f in row.get("failures", []) if f.get("node") is not None}
        if s.get("kill") or s.get("stop"):
            for i in s["kill"] + s["stop"]:
                assert lost & {nids[i]}, f"round {rnd}: {tenant(i)} not named {where}"
            survivors = PARTNERS - len(lost)
            beyond = survivors < THRESHOLD
            if beyond:
                assert row["aggregated"] == 0 and row.get("unchanged"), f"round {rnd} {where}"
            else:
                assert not row.get("unchanged") or all(
                    i["status"] != "ok" for i in row["tenants"].values()
                ), f"round {rnd} {where}"
            for i in s["kill"] + s["stop"]:
                info = row["tenants"].get(tenant(i), {})
                # its update is in the sum only when it was lost at unmask, after sending it
                lost_at = [f["reason"] for f in row["failures"] if f.get("node") == nids[i]]
                if not any("unmask" in why for why in lost_at):
                    assert not info.get("aggregated"), f"round {rnd} {where}"
            # the next round works for every partner it touched (restarted / resumed)
            nxt, nxt_step = by_round.get(rnd + 1), next((x for x in steps if x["round"] == rnd + 1), {})
            if nxt is not None:
                for i in s["kill"] + s["stop"]:
                    assert took_part(c, i, rnd + 1, (run_id, resumed_id)), f"{tenant(i)} not back {where}"
                    hit_again = i in nxt_step.get("kill", []) + nxt_step.get("stop", [])
                    # it answered the next round (a halted round records no tenant status: then it
                    # must at least not be among the nodes that round lost)
                    nxt_lost = {f.get("node") for f in nxt.get("failures", [])}
                    ok = tenant(i) in nxt["tenants"] or (not nxt["tenants"] and nids[i] not in nxt_lost)
                    assert hit_again or ok, f"{tenant(i)} not back {where}"
            kinds = [f"SIGKILL {tenant(i)}" for i in s["kill"]] + [f"SIGSTOP {tenant(i)}" for i in s["stop"]]
            c.faults.append(base | {
                "kind": " + ".join(kinds) + (" (beyond threshold)" if beyond else " (within threshold)"),
                "lost": {
                    tenant(i): [f["reason"][:80] for f in row["failures"] if f.get("node") == nids[i]]
                    for i in s["kill"] + s["stop"]
                },
                "outcome": "unchanged" if row.get("unchanged") else f"aggregated {row['aggregated']}",
                "held_s": fact.get("held_s"), "injected": len(s["kill"]) + len(s["stop"]),
            })  # fmt: skip
        if s.get("stop"):
            fact["late_replies_refused_by_superlink"] = link_log.count("Failed to store Message reply")
            c.faults[-1]["late_replies_refused_by_superlink"] = fact["late_replies_refused_by_superlink"]
        if s.get("superlink"):
            done = max(fact["rows_at_kill"], default=0)
            assert done == rnd - 1, where
            assert row.get("resumed_from") == done, where
            for t, rounds in fact["charged_at_kill"].items():
                if rnd in rounds:  # charged for the round the kill interrupted: never again
                    assert row["tenants"][t]["status"] == "already-charged", where
            killed = run_status(c, run_id)
            assert killed != "finished:completed", where
            c.faults.append(base | {
                "kind": "SIGKILL SuperLink (+ SuperExec, ServerApp), restart, deploy launch --resume",
                "killed_run_status": killed, "injected": 1,
                "outcome": ", ".join(f"{t} {i['status']}" for t, i in sorted(row["tenants"].items())),
            })  # fmt: skip
        if s.get("read_only") is not None:
            ro = s["read_only"]
            info = row["tenants"].get(tenant(ro), {})
            assert fact["read_only_how"], "no way to make a directory read-only here"
            assert info.get("status") == "refused" and "cannot charge" in info.get("message", ""), where
            assert not info.get("aggregated") and fact["read_only_ledger_unchanged"], where
            assert rnd not in [int(e["round"]) for e in entries[tenant(ro)]], where
            nxt, nxt_step = by_round.get(rnd + 1), next((x for x in steps if x["round"] == rnd + 1), {})
            hit_next = nxt_step.get("kill", []) + nxt_step.get("stop", []) + [nxt_step.get("read_only")]
            if nxt is not None and ro not in hit_next:
                # writable again: it trains in the next round (unless a fault of that round hits it)
                if nxt["tenants"]:
                    assert nxt["tenants"].get(tenant(ro), {}).get("status") in ("ok", "capped"), where
                else:  # a halted round records no tenant status: it must not be among its lost nodes
                    assert nids[ro] not in {f.get("node") for f in nxt.get("failures", [])}, where
            if nxt is None:  # the last round: writable again, it charged the DP test evaluation
                assert ROUNDS + 1 in [int(e["round"]) for e in entries[tenant(ro)]], where
            c.faults.append(base | {
                "kind": f"state dir read-only ({fact['read_only_how']}), {tenant(ro)}", "injected": 1,
                "outcome": f"{tenant(ro)} refused: {info.get('message', '')[:90]}; "
                + ", ".join(f"{t} {i['status']}" for t, i in sorted(row["tenants"].items()) if t != tenant(ro)),
            })  # fmt: skip
    for f in c.faults:
        print(f"[seed {SEED}] fault {json.dumps(f)}")
    injected = sum(f["injected"] for f in c.faults)
    c.figures["faults_injected"] = injected
    print(f"[seed {SEED}] {injected} faults injected")
    assert injected >= 12, c.faults

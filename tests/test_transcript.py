"""The transcript inventory (``fedrec.privacy.transcript``) against real messages on neighbouring federations.

Two federations differ by ONE user of one tenant (add/remove adjacency). Each runs the real ServerApp
round loop over the real ClientApp (in-process ``LoopbackGrid``, mods included) on every path: plain
DP-SGD with the DP test evaluation, SecAgg+ DP-SGD, the DP item release under SecAgg+, and ``auto``
(the user-count query, then its choice). Every reply the server received is checked field by field:

* every field is in the inventory, none ``removed`` (loss, seconds), none ``exact`` in a DP run;
* every ``public`` field (and every public field of every ledger entry) is identical between the two
  federations, given the same values of the protected draws — the noisy count is *coupled* (the
  neighbour's draw is shifted by the one user, the textbook coupling of the Gaussian mechanism), so a
  public field that leaked n would differ;
* every ``protected`` value is covered by a ledger entry of its mechanism (count, round, evaluation).

One shared set of runs (module fixture) keeps this cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType

import fedrec.client.task as task
from fedrec.client.app import app
from fedrec.client.vault import clear_cache
from fedrec.privacy import mechanisms as mech
from fedrec.privacy import transcript as tr
from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import RawDataset, load
from fedrec.simulations.driver.loopback import LoopbackGrid

TENANTS = 2
#: path name → run config (all with DP; eval-privacy dp is the RunConfig default)
PATHS: dict[str, dict[str, Any]] = {
    "mlp": dict(approach="mlp", num_server_rounds=2),
    "mlp-secagg": dict(approach="mlp", num_server_rounds=1, secagg=True),
    "release-secagg": dict(approach="dp_popularity", secagg=True),
    "auto": dict(approach="auto"),
}


def _without_user(raw: RawDataset, user: str) -> RawDataset:
    inter = raw.interactions[raw.interactions["user"] != user].reset_index(drop=True)
    users = raw.users.drop(index=user) if raw.users is not None else None
    return RawDataset(interactions=inter, items=raw.items, users=users, source=raw.source)


def _tenant_users(fed: Path) -> dict[str, int]:
    return {
        t: json.loads((fed / t / "manifest.json").read_text())["counts"]["users"]
        for t in (f"tenant-{i}" for i in range(TENANTS))
    }


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(federation without the user, federation with it, the tenant that differs)."""
    raw = load("synthetic", synth_users=160, synth_items=60, seed=5)
    root = tmp_path_factory.mktemp("neighbours")
    feds = []
    for name, data in (("small", _without_user(raw, "1")), ("large", raw)):
        fed = root / name
        prepare_federation(
            prepare_dataset(data), fed, PrepareConfig(tenants=TENANTS, partition="by:gender", seed=5)
        )
        feds.append(fed)
    small, large = _tenant_users(feds[0]), _tenant_users(feds[1])
    diff = [t for t in small if small[t] != large[t]]
    assert len(diff) == 1 and large[diff[0]] == small[diff[0]] + 1, (small, large)
    return feds[0], feds[1], diff[0]


def _cfg(fed: Path, run_dir: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(
        fed_dir=str(fed),
        run_dir=str(run_dir),
        run_name=run_dir.name,
        num_tenants=TENANTS,
        batch_users=16,
        epsilon=4.0,
        round_timeout=120.0,
        max_update_norm=50.0,
    )
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def transcripts(
    neighbours: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[list[Message], list[Message], Path, Path]]]:
    """Every path run on both federations, the count draws coupled: {path: (replies, replies', dirs)}."""
    small, large, differing = neighbours
    n_small = _tenant_users(small)[differing]
    real = mech.noisy_count
    runs: dict[str, tuple[list[Message], list[Message], Path, Path]] = {}
    root = tmp_path_factory.mktemp("transcripts")
    with pytest.MonkeyPatch.context() as mp:
        for path, kw in PATHS.items():
            received, dirs = [], []
            for fed, shift in ((small, 0), (large, 1)):
                clear_cache()
                seed = 1000 + len(runs)  # the same draw z in both federations …

                def coupled(n: int, rng: Any = None, shift: int = shift, seed: int = seed) -> int:
                    # … minus the one user in the larger one: ñ is identical (a coupling, not a mock of
                    # the mechanism: the real draw, only its randomness is shared).
                    return real(n - (shift if n == n_small + 1 else 0), np.random.default_rng(seed))

                mp.setattr(task.mech, "noisy_count", coupled)
                run_dir = root / f"{path}-{fed.name}"
                cfg = _cfg(fed, run_dir, **kw)
                grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
                run_federation(grid, cfg, log=lambda _: None)
                received.append(by_node(grid))
                dirs.append(run_dir)
            runs[path] = (received[0], received[1], dirs[0], dirs[1])
    yield runs


def by_node(grid: LoopbackGrid) -> list[Message]:
    """The replies in a comparable order: by partition id, then as that node sent them (the order in
    which SecAgg+ stages collect replies across nodes is not deterministic)."""
    part = {nid: int(str(ctx.node_config["partition-id"])) for nid, ctx in grid.contexts.items()}
    order = sorted(range(len(grid.received)), key=lambda i: (part[grid.received[i].metadata.src_node_id], i))
    return [grid.received[i] for i in order]


def kind_of(msg: Message) -> str:
    mtype = msg.metadata.message_type
    if mtype == MessageType.EVALUATE:
        return tr.EVALUATE
    if mtype == MessageType.QUERY:
        return tr.QUERY
    return tr.SECAGG if "secaggplus_configs" in msg.content.config_records else tr.TRAIN


def fields_of(msg: Message) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for name, rec in msg.content.items():
        for key in rec:
            out[(str(name), str(key))] = rec[key]
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return a == pytest.approx(b, rel=1e-12, abs=0.0)
    return bool(a == b)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_public_fields_are_identical_between_neighbouring_federations(
    transcripts: dict[str, tuple[list[Message], list[Message], Path, Path]], path: str
) -> None:
    small, large, _, _ = transcripts[path]
    assert len(small) == len(large) > 0
    kinds = set()
    for a, b in zip(small, large, strict=True):
        assert not a.has_error() and not b.has_error(), (a.error, b.error)
        kind = kind_of(a)
        kinds.add(kind)
        assert kind_of(b) == kind
        assert tr.problems(kind, a.content, exact_allowed=False) == []
        fa, fb = fields_of(a), fields_of(b)
        assert fa.keys() == fb.keys(), "the shape of a reply is public"
        for (record, key), value in fa.items():
            row = tr.lookup(kind, record, key)
            assert row is not None and row.treatment in (tr.PUBLIC, tr.PROTECTED), (kind, record, key)
            if key == "ledger-entries":
                ea, eb = json.loads(str(value)), json.loads(str(fb[(record, key)]))
                assert len(ea) == len(eb)
                for x, y in zip(ea, eb, strict=True):
                    assert x.keys() == y.keys()
                    for k in x:
                        led = tr.lookup(tr.LEDGER, "", k)
                        assert led is not None
                        if led.treatment == tr.PUBLIC and not led.varies:
                            assert _same(x[k], y[k]), (path, "ledger", k, x[k], y[k])
            elif row.treatment == tr.PUBLIC and not row.varies:
                assert _same(value, fb[(record, key)]), (path, kind, record, key, value, fb[(record, key)])
    expected = {  # approach mlp under DP with its head open asks ñ first, as auto does (its head rule)
        "mlp": {tr.QUERY, tr.TRAIN, tr.EVALUATE},
        "mlp-secagg": {tr.QUERY, tr.SECAGG, tr.EVALUATE},
        "release-secagg": {tr.SECAGG, tr.EVALUATE},
        "auto": {tr.QUERY, tr.TRAIN, tr.EVALUATE},
    }[path]
    assert kinds == expected


@pytest.mark.slow
def test_every_protected_value_is_covered_by_a_ledger_entry(
    transcripts: dict[str, tuple[list[Message], list[Message], Path, Path]],
) -> None:
    for path, (replies, _, run_dir, _) in transcripts.items():
        ledgers = {
            p.stem: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((run_dir / "ledger").glob("*.jsonl"))
        }
        assert len(ledgers) == TENANTS, path
        noisy = {}
        for tenant, entries in ledgers.items():
            mechanisms = [e.get("mechanism", "dp-sgd") for e in entries]
            assert mechanisms[0] == mech.COUNT_MECHANISM and entries[0]["round"] == 0, (path, mechanisms)
            assert mechanisms[-1] == mech.EVAL_MECHANISM, (path, mechanisms)
            assert len(mechanisms) >= 3, "count, at least one round or release, the evaluation"
            assert {e["relation"] for e in entries} == {mech.RELATION}
            assert len({e["users"] for e in entries}) == 1, "ñ drawn once, reused"
            noisy[tenant] = entries[0]["users"]
        for msg in replies:
            f = fields_of(msg)
            tenant = next((str(v) for (_, k), v in f.items() if k == "tenant"), None)
            for (_, key), value in f.items():
                if key in ("users", "num-examples", "num_examples"):
                    assert value in (noisy.get(str(tenant)), 0, 1) or (
                        tenant is None and value in (*noisy.values(), 0, 1)
                    ), (path, key, value)
        privacy = json.loads((run_dir / "privacy.json").read_text())
        assert privacy["adjacency"] == mech.RELATION
        assert privacy["evaluation"].startswith("dp:")
        for tenant, info in privacy["tenants"].items():
            assert info["users"] == noisy[tenant]
            assert info["epsilon"] == pytest.approx(ledgers[tenant][-1]["epsilon"])
            assert info["epsilon"] <= 4.0 + 1e-9
        rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert all(r["val"] == {} and "val_withheld" in r for r in rows), "no exact validation under dp"


@pytest.mark.slow
def test_the_audit_replays_the_count_and_evaluation_entries_and_states_the_adjacency(
    transcripts: dict[str, tuple[list[Message], list[Message], Path, Path]], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fedrec.simulations.cli import audit as cli_audit
    from fedrec.simulations.cli.main import app as cli

    if not any(c.name == "audit" for c in cli.registered_commands):
        cli_audit.register(cli)
    run_dir = transcripts["mlp"][2]
    res = CliRunner().invoke(cli, ["audit", str(run_dir), "--out", str(tmp_path / "audit")])
    assert res.exit_code == 0, res.output
    assert f"adjacency: {mech.RELATION}" in res.output and "audit passed" in res.output
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["adjacency"] == mech.RELATION


def _exact_run(fed: Path, run_dir: Path) -> tuple[list[Message], Path]:
    cfg = _cfg(fed, run_dir, approach="mlp", num_server_rounds=1, eval_privacy="exact")
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    run_federation(grid, cfg, log=lambda _: None)
    return list(grid.received), run_dir


@pytest.mark.slow
def test_exact_evaluation_is_allowed_only_when_asked_and_labelled_not_covered(
    neighbours: tuple[Path, Path, str], tmp_path: Path
) -> None:
    replies, run_dir = _exact_run(neighbours[0], tmp_path / "exact")
    evals = [m for m in replies if kind_of(m) == tr.EVALUATE]
    assert evals and all(tr.problems(tr.EVALUATE, m.content, exact_allowed=True) == [] for m in evals)
    with pytest.raises(tr.TranscriptError, match=r"full\.recommended: exact \(not covered by ε\)"):
        tr.check_reply(tr.EVALUATE, evals[0].content, exact_allowed=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert "NOT covered by ε" in metrics["evaluation"] and "NOT covered by ε" in privacy["evaluation"]
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert "hr@10" in rows[0]["val"], "exact validation every round (research)"
    # a train reply with a removed or unknown field is refused before it leaves
    train = next(m for m in replies if kind_of(m) == tr.TRAIN)
    train.content.metric_records["metrics"]["loss"] = 0.5
    with pytest.raises(tr.TranscriptError, match="loss: removed"):
        tr.check_reply(tr.TRAIN, train.content, exact_allowed=True)
    del train.content.metric_records["metrics"]["loss"]
    train.content.config_records["status"]["n-exact"] = 7
    with pytest.raises(tr.TranscriptError, match="not in the transcript inventory"):
        tr.check_reply(tr.TRAIN, train.content, exact_allowed=True)


def test_the_inventory_is_one_table_with_known_treatments() -> None:
    assert {f.treatment for f in tr.INVENTORY} <= set(tr.TREATMENTS)
    keys = [(f.kind, f.record, f.key) for f in tr.INVENTORY]
    assert len(keys) == len(set(keys)), "one row per field"
    assert all(f.why for f in tr.INVENTORY)
    train = tr.by_treatment(tr.TRAIN)
    assert {"metrics.loss", "metrics.seconds"} <= set(train[tr.REMOVED])
    assert {"metrics.users", "metrics.num-examples", "arrays.*"} <= set(train[tr.PROTECTED])
    assert tr.lookup(tr.LEDGER, "", "users").treatment == tr.PROTECTED  # type: ignore[union-attr]


def test_the_noisy_count_costs_what_the_docs_say() -> None:
    from fedrec.privacy.accounting import epsilon

    eps = epsilon(history=[mech.count_segment()], delta=1e-5, accountant="prv")
    assert 0.15 < eps < 0.19  # docs/TRANSCRIPT.md: ε ≈ 0.17 at δ = 1e-5
    draws = [mech.noisy_count(500) for _ in range(400)]
    assert abs(np.mean(draws) - 500) < 4 and 15 < np.std(draws) < 25

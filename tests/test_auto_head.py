"""Issue 16 item 3: ``--approach mlp`` under DP defaults to the DP head, ``auto`` trains that head
where ``choose()`` would release DP popularity, and the EASE-table head where it would release DP-EASE
under SecAgg+ from 5 000 users (in-process grid, synthetic data)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedrec.client.app import app
from fedrec.client.task import tenant_config
from fedrec.privacy.ledger import read_entries
from fedrec.server.loop import run_federation
from fedrec.server.release import EASE_HEAD_MIN_USERS, EASE_HEAD_REASON, HEAD_REASON, resolve_approach
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.runconfig import AUTO_DP, AUTO_EASE_HEAD, AUTO_HEAD, RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid
from fedrec.simulations.reports.audit import check_run, load_run

TENANTS = 2
EPSILON = 6.0


def _head(cfg: RunConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in AUTO_HEAD}


# ---------------------------------------------------------------- part 1: the RunConfig defaults
def test_approach_mlp_under_dp_resolves_to_the_head_recipe() -> None:
    assert _head(RunConfig(approach="mlp")) == AUTO_HEAD
    assert RunConfig(approach="mlp").planned_rounds() == AUTO_DP["num_server_rounds"] + 1  # + the release
    # flwr run . reads pyproject's defaults: the same auto values, so it gets the same head
    conf = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert _head(RunConfig.from_mapping(conf["tool"]["flwr"]["app"]["config"])) == AUTO_HEAD


def test_an_explicit_setting_wins_over_the_head_recipe() -> None:
    cfg = RunConfig(approach="mlp", lr=0.1, max_grad_norm=0.2, dp_train="mix,mlp")
    assert (cfg.lr, cfg.max_grad_norm, cfg.dp_train) == (0.1, 0.2, "mix,mlp")
    assert cfg.release_init == 0.9 and cfg.release_init_items == "genres" and cfg.prior_negatives
    eigen = RunConfig(approach="mlp", release_init_items="genres+eigen")  # needs a Gram part: ρ stays 0.5
    assert eigen.release_init_pop == 0.5 and eigen.release_init == 0.9
    # an explicit release-init shapes the release-init model itself: the other keys keep their plain values
    given = RunConfig(approach="mlp", release_init=0.5)
    assert (given.release_init_items, given.release_init_pop, given.dot_mix) == ("eigen", 0.5, -1.0)
    assert (given.lr, given.max_grad_norm, given.prior_negatives) == (AUTO_DP["lr"], 1.0, False)


def test_release_init_0_is_off_and_no_dp_and_cohort_are_unchanged() -> None:
    for cfg in (
        RunConfig(approach="mlp", release_init=0.0),
        RunConfig(approach="mlp", dp=False),
        RunConfig(approach="mlp", dp_mode="cohort"),
        RunConfig(approach="auto"),
        RunConfig(approach="dp_popularity"),
    ):
        assert cfg.release_init == 0.0 and cfg.release_init_items == "eigen" and cfg.dot_mix == -1.0
        assert cfg.dp_train == "" and not cfg.prior_negatives and cfg.max_grad_norm == 1.0
    assert RunConfig(approach="mlp", release_init=0.0).lr == AUTO_DP["lr"]
    assert RunConfig(approach="mlp", dp=False).lr == 0.01  # AUTO_NO_DP
    assert RunConfig(approach="mlp", dp_mode="cohort").lr == 1.0  # AUTO_COHORT


def test_the_run_config_carries_the_auto_settings_so_auto_can_become_the_head() -> None:
    auto = RunConfig(approach="auto", epsilon=3.0, lr=0.2)
    assert RunConfig.from_mapping(auto.to_mapping()) == auto
    assert auto.to_mapping()["release-init"] == -1.0 and auto.resolved_mapping()["release-init"] == 0.0
    head = auto.with_approach("mlp")
    assert head.approach == "mlp" and head.epsilon == 3.0 and head.lr == 0.2, "given settings are kept"
    assert head.release_init == 0.9 and head.max_grad_norm == 0.05 and head.dp_train == "mix"
    assert auto.with_approach("dp_popularity").release_init == 0.0
    with pytest.raises(FedrecError, match="only approach auto"):
        head.with_approach("mlp")


# ---------------------------------------------------------------- part 2: resolve_approach
def test_auto_picks_the_head_where_it_would_release_dp_popularity() -> None:
    cfg = RunConfig(approach="auto", epsilon=8.0)
    users = {"tenant-0": 200, "tenant-1": 200}
    choice = resolve_approach(cfg, users, 1000, item_features=True)
    assert choice.approach == "mlp" and choice.noise_mode == "local"
    assert "DP popularity is the better floor" in choice.reason and HEAD_REASON in choice.reason
    # under SecAgg+ too (the frontier measured it above DP popularity with distributed noise)
    secagg = resolve_approach(cfg, users, 1000, item_features=True, shares=2)
    assert (secagg.approach, secagg.head, secagg.noise_mode) == ("mlp", "", "distributed")
    # no public genres or cohort mode: the head was not measured there
    for kwargs, cfg_, why in (
        ({"item_features": False}, cfg, "no public genres"),
        (
            {"item_features": True, "shares": 2},
            RunConfig(approach="auto", dp_mode="cohort"),
            "dp-mode cohort",
        ),
    ):
        kept = resolve_approach(cfg_, users, 1000, **kwargs)  # type: ignore[arg-type]
        assert kept.approach == "dp_popularity" and why in kept.reason


def test_the_genres_head_never_replaces_dp_ease_or_two_stage() -> None:
    cfg = RunConfig(approach="auto", epsilon=8.0)
    users = {f"tenant-{i}": 800 for i in range(5)}  # DP-EASE's side of choose(), below the EASE head's
    assert resolve_approach(cfg, users, 1000, item_features=True).approach == "dp_ease"
    assert resolve_approach(cfg, users, 40_000, item_features=True).approach == "dp_two_stage"
    assert resolve_approach(
        RunConfig(approach="auto", dp=False), users, 1000, item_features=True
    ).approach == ("mlp")


def test_auto_picks_the_ease_head_where_it_would_release_dp_ease() -> None:
    cfg = RunConfig(approach="auto", epsilon=8.0)
    big = {f"tenant-{i}": 1200 for i in range(5)}  # 6 000 users
    choice = resolve_approach(cfg, big, 1000, shares=3)
    assert (choice.approach, choice.head, choice.noise_mode) == ("mlp", "ease", "distributed")
    assert "≥ 1000" in choice.reason and EASE_HEAD_REASON in choice.reason
    assert type(choice).from_json(choice.to_json()).head == "ease", "a resumed run keeps the head"
    local = resolve_approach(cfg, big, 1000)  # each tenant adds its own noise: the head all the same
    assert (local.approach, local.head, local.noise_mode) == ("mlp", "ease", "local")
    # too few users, or a catalogue above the gram limit: DP-EASE / two stages, and why
    few = resolve_approach(cfg, {f"tenant-{i}": 900 for i in range(5)}, 1000, shares=3)
    assert few.approach == "dp_ease" and not few.head and f"< {EASE_HEAD_MIN_USERS}" in few.reason
    assert resolve_approach(cfg, big, 40_000, shares=3).approach == "dp_two_stage"


def test_approach_mlp_gets_the_ease_head_where_auto_would_pick_it() -> None:
    # bare `--approach mlp` under DP: the head is picked by auto's rule, where the run left it open
    big = {f"tenant-{i}": 1200 for i in range(5)}  # 6 000 users, DP-EASE's side of choose()
    mlp = RunConfig(approach="mlp", epsilon=8.0)
    assert mlp.head_open()
    choice = resolve_approach(mlp, big, 1000, shares=3)
    assert (choice.approach, choice.head, choice.noise_mode) == ("mlp", "ease", "distributed")
    assert choice.reason.startswith("asked for: the MLP under DP") and EASE_HEAD_REASON in choice.reason
    local = resolve_approach(mlp, big, 1000)
    assert (local.head, local.noise_mode) == ("ease", "local")
    cohort = resolve_approach(RunConfig(approach="mlp", dp_mode="cohort"), big, 1000, shares=3)
    assert cohort.head == "ease", "the EASE-table head is cohort rounds: an open cohort run gets it too"
    # where auto would not train the EASE-table head, approach mlp keeps its own default (the DP head)
    few = {f"tenant-{i}": 900 for i in range(5)}
    for cfg, users, n_items in ((mlp, few, 1000), (mlp, big, 40_000)):
        kept = resolve_approach(cfg, users, n_items, shares=3)
        assert (kept.approach, kept.head) == ("mlp", "") and "the DP MLP head" in kept.reason
    # a run that names the head's settings, or no DP, keeps what it names
    for fixed in (
        RunConfig(approach="mlp", release_init=0.9),
        RunConfig(approach="mlp", release_init_items="genres"),
        RunConfig(approach="mlp", release_init=0.0),
        RunConfig(approach="mlp", dp=False),
    ):
        assert not fixed.head_open()
        assert resolve_approach(fixed, big, 1000, shares=3).head == ""
    assert not RunConfig(approach="auto").head_open() and not RunConfig(approach="dp_ease").head_open()
    # a given setting the head's cohort rounds refuse (lr): no head, and why, instead of a failed run
    for approach, kept_as in (("mlp", "mlp"), ("auto", "dp_ease")):
        odd = resolve_approach(RunConfig(approach=approach, lr=0.2), big, 1000, shares=3)
        assert (odd.approach, odd.head) == (kept_as, "")
    assert "do not fit the head: lr is the local Adam step" in odd.reason, "auto says why (the last case)"


def test_approach_mlp_takes_the_ease_head_only_where_left_open() -> None:
    head = RunConfig(approach="mlp", epsilon=3.0, dim=64).with_approach("mlp", "ease")
    assert {name: getattr(head, name) for name in AUTO_EASE_HEAD} == AUTO_EASE_HEAD
    assert head.epsilon == 3.0 and head.dim == 64, "given settings are kept"
    with pytest.raises(FedrecError, match="head is fixed by this run config"):
        RunConfig(approach="mlp", release_init=0.5).with_approach("mlp", "ease")
    # the tenant: its own open config takes the head the message names; a fixed one refuses it
    conf = {"approach": "mlp", "head": "ease"}
    mine = tenant_config(RunConfig(approach="mlp", epsilon=3.0), conf)
    assert (mine.dp_mode, mine.release_init, mine.release_init_items, mine.epsilon) == (
        "cohort",
        0.95,
        "ease",
        3.0,
    )
    assert tenant_config(RunConfig(approach="mlp"), {"approach": "mlp"}) == RunConfig(approach="mlp")
    with pytest.raises(FedrecError, match="fixes approach mlp's head .* nothing was trained or charged"):
        tenant_config(RunConfig(approach="mlp", release_init=0.9), conf)


def test_the_ease_head_recipe_fills_only_what_was_left_auto() -> None:
    head = RunConfig(approach="auto").with_approach("mlp", "ease")
    assert {name: getattr(head, name) for name in AUTO_EASE_HEAD} == AUTO_EASE_HEAD
    assert (head.dim, head.dot_mix, head.dp_train, head.server_opt) == (256, 300.0, "mix,mlp", "fedadam")
    assert head.dp_rows == 100 and "item_rows" in head.train_modules()
    mine = RunConfig(approach="auto", num_server_rounds=2, dim=64, dp_mode="cohort", cohort_rate=0.5)
    mine = mine.with_approach("mlp", "ease")
    assert (mine.num_server_rounds, mine.dim, mine.cohort_rate, mine.dp_mode) == (2, 64, 0.5, "cohort")
    assert RunConfig(approach="auto").with_approach("mlp").dim == 32, "the other heads keep dim 32"
    with pytest.raises(FedrecError, match="unknown head"):
        RunConfig(approach="auto").with_approach("dp_ease", "ease")
    # a tenant resolves the head the message names; an unknown one is refused before anything runs
    tenant = tenant_config(RunConfig(approach="auto"), {"approach": "mlp", "head": "ease"})
    assert tenant == head
    with pytest.raises(FedrecError, match="refusing the round: .* unknown head 'svd'"):
        tenant_config(RunConfig(approach="auto"), {"approach": "mlp", "head": "svd"})


# ---------------------------------------------------------------- a real run through the loop
@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare_dataset(load("synthetic", synth_users=160, synth_items=60, seed=3))
    out = tmp_path_factory.mktemp("autohead") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=3, k_anonymity=2))
    return out


def _auto_cfg(fed: Path, run: Path, **kw: object) -> RunConfig:
    return RunConfig(
        fed_dir=str(fed), run_dir=str(run), run_name=run.name, num_tenants=TENANTS, approach="auto",
        epsilon=EPSILON, num_server_rounds=1, batch_users=32, accountant="rdp", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _check_head_run(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    config = json.loads((run / "config.json").read_text())["run_config"]
    for approach in (metrics["approach"], privacy["approach"]):
        assert approach["name"] == "mlp" and HEAD_REASON in approach["reason"]
    assert (
        privacy["release_init"]["share_of_epsilon"] == 0.9
        and privacy["release_init"]["item_table"] == "genres"
    )
    assert config["approach"] == "mlp" and config["release-init"] == 0.9 and config["max-grad-norm"] == 0.05
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["release_init"]["source"] == "genres"
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        # round 0: the noisy count (auto asks for it); 1: the head's release; 2: DP-SGD; 3: DP test sums
        assert not problems and [e["round"] for e in entries] == [0, 1, 2, 3]
        assert entries[1]["purpose"] == "mlp-init" and entries[1]["release_share"] == 0.9
        assert entries[2]["max_grad_norm"] == 0.05, "DP-SGD ran with the head's clipping bound"
        assert all(e["epsilon"] <= EPSILON + 1e-9 for e in entries)
        assert privacy["tenants"][f"tenant-{t}"]["epsilon"] <= EPSILON + 1e-9
    report = check_run(load_run(run))
    assert not report.failed(), [(c.name, c.tenant, c.findings) for c in report.failed()]


def test_auto_trains_the_head_through_the_loop_and_audits(fed: Path, tmp_path: Path) -> None:
    run = tmp_path / "auto"
    cfg = _auto_cfg(fed, run)
    lines: list[str] = []
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    run_federation(grid, cfg, log=lines.append)
    assert any("approach mlp (" in ln and "DP MLP head" in ln for ln in lines), lines
    _check_head_run(run)


def test_a_resumed_auto_run_keeps_the_head(fed: Path, tmp_path: Path) -> None:
    class Killed(BaseException):
        pass

    def kill_in_round_2(_nid: int, msg: Message) -> str | None:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.group_id == "2":
            raise Killed
        return None

    run = tmp_path / "cut"
    cfg = _auto_cfg(fed, run)
    with pytest.raises(Killed):
        run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS, drop=kill_in_round_2), cfg, log=print)
    assert json.loads((run / "checkpoint" / "approach.json").read_text())["name"] == "mlp"
    resumed = RunConfig.from_mapping({**cfg.to_mapping(), "resume": True})
    lines: list[str] = []
    run_federation(LoopbackGrid(app, resumed.to_mapping(), TENANTS), resumed, log=lines.append)
    assert any("approach mlp (" in ln and "resuming after round 1" in ln for ln in lines), lines
    _check_head_run(run)


def test_a_tenant_with_an_explicit_approach_refuses_a_message_naming_another(fed: Path) -> None:
    cfg = RunConfig(fed_dir=str(fed), num_tenants=TENANTS, run_name="explicit", approach="dp_popularity")
    grid = LoopbackGrid(app, cfg.to_mapping(), TENANTS)
    nid = sorted(grid.get_node_ids())[0]
    config = ConfigRecord(
        {"phase": "item-release", "round": 1, "pop-share": 1.0, "ledger-head": "", "approach": "mlp"}
    )
    msg = Message(
        content=RecordDict({"config": config}), message_type=MessageType.TRAIN, dst_node_id=nid, group_id="1"
    )
    (reply,) = grid.send_and_receive([msg], timeout=120)
    assert reply.has_error()
    reason = reply.error.reason or ""
    assert "names approach dp_popularity, the server's message mlp" in reason and "nothing was" in reason
    state = fed / "tenant-0" / "state" / "explicit"
    assert not (state / "ledger.jsonl").exists(), "nothing charged: not even the noisy count"


def test_the_default_head_runs_under_secagg_and_audits(fed: Path, tmp_path: Path) -> None:
    # `--approach mlp --secagg` (a deployment's default) now trains the head: round 1's release with the
    # noise split over the SecAgg+ threshold, then local-steps DP-SGD rounds masked, each tenant's own noise
    run = tmp_path / "secagg"
    cfg = RunConfig(
        fed_dir=str(fed), run_dir=str(run), run_name="secagg-head", num_tenants=TENANTS, approach="mlp",
        secagg=True, epsilon=EPSILON, num_server_rounds=1, batch_users=32, accountant="rdp",
    )  # fmt: skip
    assert cfg.release_init == 0.9 and cfg.dp_train == "mix"
    run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lambda _: None)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rows] == [TENANTS, TENANTS]
    assert rows[0]["release_init"]["noise_shares"] == TENANTS and "secagg" in rows[1]
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["approach"]["name"] == "mlp" and "DP MLP head" in privacy["approach"]["reason"]
    assert all(t["epsilon"] <= EPSILON + 1e-9 for t in privacy["tenants"].values())
    report = check_run(load_run(run))
    assert not report.failed(), [(c.name, c.tenant, c.findings) for c in report.failed()]


@pytest.fixture(scope="module")
def big_fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ≥ EASE_HEAD_MIN_USERS users (the tenants' noisy counts decide) on a small catalogue
    data = prepare_dataset(load("synthetic", synth_users=EASE_HEAD_MIN_USERS + 600, synth_items=40, seed=5))
    out = tmp_path_factory.mktemp("autoease") / "fed"
    prepare_federation(data, out, PrepareConfig(tenants=TENANTS, partition="iid", seed=5, k_anonymity=2))
    return out


@pytest.mark.parametrize("approach", ["auto", "mlp"])
def test_auto_trains_the_ease_head_under_secagg_through_the_loop_and_audits(
    big_fed: Path, tmp_path: Path, approach: str
) -> None:
    # approach mlp with its head left open trains the same head as auto: the same checks hold for both
    run = tmp_path / f"{approach}-ease"
    cfg = RunConfig(
        fed_dir=str(big_fed), run_dir=str(run), run_name=run.name, num_tenants=TENANTS, approach=approach,
        secagg=True, epsilon=EPSILON, num_server_rounds=1, accountant="rdp", dim=16,  # dim: for time
    )  # fmt: skip
    lines: list[str] = []
    run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lines.append)
    assert any("approach mlp (" in ln and "EASE-table head" in ln for ln in lines), lines
    assert json.loads((run / "checkpoint" / "approach.json").read_text())["head"] == "ease"
    privacy = json.loads((run / "privacy.json").read_text())
    config = json.loads((run / "config.json").read_text())["run_config"]
    assert privacy["approach"]["head"] == "ease" and EASE_HEAD_REASON in privacy["approach"]["reason"]
    assert (
        privacy["release_init"]["item_table"] == "ease"
        and privacy["release_init"]["share_of_epsilon"] == 0.95
    )
    assert (config["dp-mode"], config["cohort-rate"], config["release-init-pop"]) == ("cohort", 0.2, 0.05)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert rows[0]["release_init"]["source"] == "ease" and rows[0]["release_init"]["noise_shares"] == TENANTS
    n_items = json.loads((run / "model.json").read_text())["model"]["n_items"]
    assert rows[0]["release_init"]["trained_rows"] == min(100, n_items), "auto's head trains the top rows"
    assert "secagg" in rows[1] and rows[1]["aggregated"] == TENANTS
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        assert not problems and entries[1]["purpose"] == "mlp-init" and entries[1]["release_share"] == 0.95
        assert all(e["epsilon"] <= EPSILON + 1e-9 for e in entries)
    report = check_run(load_run(run))
    assert not report.failed(), [(c.name, c.tenant, c.findings) for c in report.failed()]

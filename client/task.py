"""What a tenant does in a round, as plain functions (the ClientApp handlers only wrap these).

* :func:`resolve_tenant` — where this node's tenant folder, key and state dir are: ``node_config``
  (``tenant-dir``, ``key-file``, ``state-dir`` on a real SuperNode) or ``partition-id`` → ``fed-dir``
  (simulation). The rest of the code path is the same.
* :func:`tenant_train` — decrypt the partition in memory, check the budget **before** training, train
  with user-level DP-SGD, charge the budget and append the ledger entry **before** the update is
  released, return only shared parameters and whitelisted figures.
* :func:`secure_update` — under SecAgg+: the delta to mask and its weight, after the same checks the
  server runs on a visible update (a failing update is replaced by zeros with weight 0 and reported);
* :func:`ledger_since` — the ledger entries after the head the server recorded (budget figures only);
* :func:`tenant_release` — the one-shot user-level DP item release (``fedrec.privacy.gram``: DP popularity
  and/or the noisy item–item Gram) for the ``dp_ease``/``dp_popularity`` approaches: budget checked,
  charged and logged before the release leaves the tenant, exactly like a DP-SGD round;
* :func:`tenant_evaluate` — running sums of the ranking metrics (the server divides once).

Privacy notes: with DP on, the Poisson sampling and the noise are seeded from ``os.urandom`` — a seed
derived from the (public) run config would let the coordinator recompute and subtract the noise.
Opacus' ``secure_mode`` is unavailable (torchcsprng does not support torch 2.x); the ledger says so.
The item release draws its noise from numpy's PCG64 seeded with 128 bits of ``secrets`` — fresh per
release, but not a cryptographically secure generator either (the same caveat, same ledger field).
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.client.train import (
    LocalTrainConfig,
    RoundStats,
    StepPlan,
    plan_cohort,
    plan_round,
    share_noise_multiplier,
    train_round,
)
from fedrec.client.vault import TenantData, load_tenant_cached
from fedrec.privacy import gram
from fedrec.privacy import mechanisms as mech
from fedrec.privacy.accounting import calibrate_noise, check_delta, epsilon
from fedrec.privacy.budget import TenantBudget
from fedrec.privacy.errors import BudgetError
from fedrec.privacy.ledger import GENESIS, Ledger
from fedrec.shared_model.codec import Weights, load_weights, parameter_weights, update_problem
from fedrec.shared_model.data import Catalog
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.item_model import ItemModelConfig, ItemReleaseModel
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.runconfig import APPROACHES, HEADS, RunConfig
from fedrec.shared_model.training import ModelScorer, SamplingConfig

PLAN_FILE = "dp_plan.json"
#: Users scored per evaluation batch. 512 × 2 000 items made 262 MB temporaries and spent half the CPU
#: in page faults (the 100-tenant benchmark, docs/BENCHMARKS.md); 64 gives identical sums (≤ 7e-15) at
#: 0.66–0.75 s instead of 1.06–1.71 s of CPU per 1 000-user tenant.
EVAL_BATCH_USERS = 64
LEDGER_FILE = "ledger.jsonl"


@dataclass(frozen=True)
class TenantPaths:
    tenant_id: str
    tenant_dir: Path
    key_file: Path
    state_dir: Path


def resolve_tenant(node_config: Mapping[str, Any], cfg: RunConfig) -> TenantPaths:
    """Locate this node's tenant: node_config on a SuperNode, partition-id → fed-dir in simulation."""
    if "tenant-dir" in node_config:
        missing = [k for k in ("key-file", "state-dir") if k not in node_config]
        if missing:
            raise FedrecError(f"node-config has tenant-dir but lacks {', '.join(missing)}")
        tenant_dir = Path(str(node_config["tenant-dir"]))
        return TenantPaths(
            tenant_id=tenant_dir.name,
            tenant_dir=tenant_dir,
            key_file=Path(str(node_config["key-file"])),
            state_dir=Path(str(node_config["state-dir"])) / cfg.run_name,
        )
    if "partition-id" not in node_config:
        raise FedrecError(
            "node-config needs tenant-dir, key-file and state-dir (or partition-id in simulation)"
        )
    if not cfg.fed_dir:
        raise FedrecError("run-config fed-dir is required in simulation (the folder `fedrec prepare` wrote)")
    tenant = f"tenant-{int(node_config['partition-id'])}"
    fed = Path(cfg.fed_dir)
    return TenantPaths(
        tenant_id=tenant,
        tenant_dir=fed / tenant,
        key_file=fed / "keys" / f"{tenant}.key",
        state_dir=fed / tenant / "state" / cfg.run_name,
    )


def tenant_config(cfg: RunConfig, conf: Mapping[str, Any]) -> RunConfig:
    """The run config this tenant trains a train/release message under: its own, with approach ``auto``
    resolved to the approach the message names (``RunConfig.with_approach``: approach mlp under DP gets
    the DP head, or the EASE-table head where the message names head "ease", planned from this tenant's
    own settings). Only the approach's NAME (and head) comes from the server; the cap, δ, accountant,
    release share and noise shares stay the tenant's own. A tenant whose run config names an approach
    refuses a message naming another, before anything is trained or charged; one whose run config names
    approach mlp takes the head the message names only where it left the head open
    (``RunConfig.head_open``). A message that names none is read with the tenant's config as it is."""
    named, head = str(conf.get("approach", "")), str(conf.get("head", ""))
    if not named or (named == cfg.approach and not head):
        return cfg
    if named not in APPROACHES or named == "auto":
        raise FedrecError(f"refusing the round: the server's message names an unknown approach {named!r}")
    if head not in HEADS or (head and named != "mlp"):
        raise FedrecError(
            f"refusing the round: the server's message names an unknown head {head!r} for approach {named}"
        )
    if named == cfg.approach:  # approach mlp, and the server picked its head as auto would
        if not cfg.head_open():
            raise FedrecError(
                f"refusing the round: the server's message names head {head!r}, but this tenant's run "
                "config fixes approach mlp's head (release-init or release-init-items given); nothing was "
                "trained or charged for it"
            )
        return cfg.with_approach(named, head)
    if cfg.approach != "auto":
        raise FedrecError(
            f"refusing the round: this tenant's run config names approach {cfg.approach}, the server's "
            f"message {named}; nothing was trained or charged"
        )
    return cfg.with_approach(named, head)


def local_config(cfg: RunConfig) -> LocalTrainConfig:
    cohort = cfg.dp_mode == "cohort"
    return LocalTrainConfig(
        dp=cfg.dp,
        local_epochs=cfg.local_epochs,
        batch_users=cfg.batch_users,
        lr=1.0 if cohort else cfg.lr,  # cohort: the update is exactly −(noisy sum)/(expected cohort)
        optimizer="sgd" if cohort else "adam",
        max_grad_norm=cfg.max_grad_norm,
        sampling=SamplingConfig(max_history=cfg.max_history, targets=cfg.targets, negatives=cfg.negatives),
        device="cuda"
        if torch.cuda.is_available()
        else "cpu",  # GPU where available (the model moves back to CPU to reply)
    )


def _public_seed(cfg: RunConfig, tenant: str, round_: int) -> int:
    """Reproducible seed for non-private runs (never used for DP noise or sampling)."""
    return (cfg.seed * 1_000_003 + zlib.crc32(tenant.encode()) * 101 + round_) % (2**63)


def noise_plan(paths: TenantPaths, budget: TenantBudget, plan: StepPlan, cfg: RunConfig) -> float:
    """σ calibrated once for the whole run (rounds × steps at rate q under the cap), then persisted.

    A restarted node reuses the stored σ, so the plan — and the ledger — stay consistent.
    """
    path = paths.state_dir / PLAN_FILE
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["sample_rate"] == plan.sample_rate and stored["steps"] == plan.steps:
            return float(stored["noise_multiplier"])
    # Rounds already charged, not counting the noisy count (round 0); the initialising release
    # (release-init) is a charged round too, so it counts among the planned ones.
    trained = [r for r in budget.rounds if 1 <= r <= cfg.planned_rounds()]
    rounds_left = max(1, cfg.planned_rounds() - len(trained))
    sigma = calibrate_noise(
        target_epsilon=budget.cap,
        delta=cfg.delta,
        sample_rate=plan.sample_rate,
        steps=plan.steps * rounds_left,
        accountant=cfg.accountant,  # type: ignore[arg-type]
        history_before=[*budget.history, *reserved(cfg)],
    )
    try:
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "noise_multiplier": sigma,
                    "sample_rate": plan.sample_rate,
                    "steps": plan.steps,
                    "planned_rounds": cfg.planned_rounds(),
                    "init_rounds": [1] if cfg.release_init > 0 else [],  # the release-init round (q = 1)
                    "cap": budget.cap,
                    "delta": cfg.delta,
                    "accountant": cfg.accountant,
                }
            ),
            encoding="utf-8",
        )
        os.replace(tmp, path)
    except OSError:
        # The state dir cannot be written (read-only mount, immutable, full): the plan is not kept,
        # and tenant_train refuses the round before training, so nothing is charged under it.
        pass
    return sigma


@dataclass
class TrainOutcome:
    """What a tenant releases after a round (nothing per user)."""

    tenant_id: str
    status: str  # "ok" | "capped" | "already-charged" (a re-sent round: no update, no new charge)
    # | "refused" (its state dir cannot be written, so the round could not be charged: no training)
    users: int
    weights: Weights | None = None  # shared parameters (None when capped)
    epsilon: float | None = None  # cumulative ε after this round (None without DP)
    cap: float | None = None
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    stats: RoundStats | None = None
    ledger_entry: dict[str, Any] | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # dp-mode cohort: the weight of this update in the server's mean, the expected cohort ⌊q·ñ⌋ (the
    # update is −noisy sum / ⌊q·ñ⌋, so the weighted mean is Σ noisy sums / Σ expected cohorts); None:
    # the user count ``users`` is the weight
    weight: int | None = None


def state_dir_problem(state_dir: Path) -> str | None:
    """Why the budget and ledger in ``state_dir`` cannot be written now (None: they can).

    Tried, not guessed from permission bits (root ignores them; a read-only mount or an immutable
    directory does not): a file is created and removed beside the budget, and the ledger is opened
    for appending, as a charge does."""
    probe = state_dir / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        ledger = state_dir / LEDGER_FILE
        if ledger.exists():
            with open(ledger, "ab"):
                pass
    except OSError as e:
        return f"state dir {state_dir} is not writable: {e.strerror or e}"
    return None


def load_data(paths: TenantPaths) -> TenantData:
    return load_tenant_cached(paths.tenant_dir, paths.key_file, expected_tenant=paths.tenant_id)


def reserved(cfg: RunConfig) -> list[tuple[float, float, int]]:
    """Segments the tenant will charge besides training (the DP evaluation), reserved in calibration."""
    return mech.reserved_segments(dp=cfg.dp, eval_privacy=cfg.eval_privacy)


def tenant_budget(cfg: RunConfig, paths: TenantPaths, n_users: int) -> TenantBudget:
    """This tenant's budget for the run (after checking δ < 1/users); state in its state dir.

    The refusal names δ only, never the user count (the message goes to the coordinator).
    """
    try:
        check_delta(delta=cfg.delta, n_users=n_users)
    except BudgetError:
        raise BudgetError(
            f"delta {cfg.delta!r} is not < 1/users for tenant {paths.tenant_id}: choose a smaller δ"
        ) from None
    return TenantBudget(
        paths.state_dir,
        tenant_id=paths.tenant_id,
        cap=cfg.cap_for(paths.tenant_id),
        delta=cfg.delta,
        accountant=cfg.accountant,
    )


def dp_entry(
    cfg: RunConfig,
    paths: TenantPaths,
    cap: float,
    *,
    round_: int,
    users: int,
    sigma: float,
    q: float,
    steps: int,
    eps: float,
    max_grad_norm: float,
    mechanism: str | None = None,
    count_sigma: float = mech.COUNT_SIGMA,
) -> dict[str, Any]:
    """The ledger entry of a Poisson-sampled Gaussian charge — the noisy count (round 0), a DP-SGD
    round, the DP evaluation — in the field order every ledger has (``mechanism`` absent: DP-SGD)."""
    entry: dict[str, Any] = {
        "round": round_,
        "tenant": paths.tenant_id,
        "unit": "user",
        "users": users,
        "sample_rate": q,
        "noise_multiplier": sigma,
        "max_grad_norm": max_grad_norm,
        "steps": steps,
        "delta": cfg.delta,
        "accountant": cfg.accountant,
        "epsilon": eps,
        "cap": cap,
        "poisson": True,
        "secure_mode": False,  # Opacus secure_mode is unavailable (stated in the README)
        "status": "ok",
    }
    if mechanism is not None:
        entry["mechanism"] = mechanism
    entry["relation"] = mech.RELATION
    entry["count_noise_multiplier"] = count_sigma
    return entry


def tenant_count(cfg: RunConfig, paths: TenantPaths, n: int) -> int:
    """This tenant's noisy user count ñ (``fedrec.privacy.mechanisms``): drawn, charged (round 0) and
    logged once per run, then reused; the exact ``n`` without DP (nothing is protected then)."""
    if not cfg.dp:
        return n
    ledger = Ledger(paths.state_dir / LEDGER_FILE)
    if ledger.path.exists():
        for entry in ledger.entries():
            if entry.get("mechanism") == mech.COUNT_MECHANISM:
                return int(entry["users"])
    budget = tenant_budget(cfg, paths, n)
    sigma, q, steps = mech.count_segment()
    if mech.COUNT_ROUND in budget.rounds:  # charged, then crashed before the entry: the draw never left
        eps = budget.spent()
    else:
        eps = budget.charge(round=mech.COUNT_ROUND, noise_multiplier=sigma, sample_rate=q, steps=steps)
    noisy = mech.noisy_count(n)
    ledger.append(
        dp_entry(
            cfg,
            paths,
            budget.cap,
            round_=mech.COUNT_ROUND,
            users=noisy,
            sigma=sigma,
            q=q,
            steps=steps,
            eps=eps,
            max_grad_norm=1.0,  # sensitivity of a count under add/remove (q = 1: every user is counted)
            mechanism=mech.COUNT_MECHANISM,
            count_sigma=sigma,
        )
    )
    return noisy


def refuse_unwritable(cfg: RunConfig, paths: TenantPaths, n_users: int, what: str) -> TrainOutcome | None:
    """With DP, a refusal (nothing trained, charged or counted) when the state dir cannot be written,
    checked before anything is charged — the noisy count ñ of round 0 included: its charge could not be
    written either, so the refusal reports 0 users rather than an uncharged count."""
    if not cfg.dp:
        return None
    try:
        paths.state_dir.mkdir(parents=True, exist_ok=True)  # a first round: not there yet
        unwritable = state_dir_problem(paths.state_dir)
    except OSError as e:
        unwritable = f"state dir {paths.state_dir} cannot be created: {e.strerror or e}"
    if not unwritable:
        return None
    budget = tenant_budget(cfg, paths, n_users)
    return TrainOutcome(
        paths.tenant_id, "refused", 0, epsilon=budget.spent(), cap=budget.cap,
        message=f"cannot charge {what} to the ledger ({unwritable}); refusing to train",
    )  # fmt: skip


def alone_epsilon(paths: TenantPaths, cfg: RunConfig, segment: tuple[float, float, int]) -> float:
    """ε of this tenant's ledger plus ``segment`` if the server saw each of its noise shares alone: every
    entry at its own ``local_noise_multiplier`` (σ/√shares where the noise was split, else σ)."""
    path = paths.state_dir / LEDGER_FILE
    history = [
        (
            float(e.get("local_noise_multiplier", e["noise_multiplier"])),
            float(e["sample_rate"]),
            int(e["steps"]),
        )
        for e in (Ledger(path).entries() if path.exists() else [])
    ]
    return epsilon(history=[*history, segment], delta=cfg.delta, accountant=cfg.accountant)  # type: ignore[arg-type]


def cohort_fields(
    paths: TenantPaths, cfg: RunConfig, *, sigma: float, shares: int, q: float
) -> dict[str, Any]:
    """Ledger fields of a cohort round (dp-mode cohort) besides the segment: the noise mode, the shares
    this tenant split σ into (1 in the clear), its own σ/√shares and the ε if its share were seen alone."""
    local = share_noise_multiplier(sigma, shares)
    return {
        "dp_mode": "cohort",
        "noise_mode": "distributed" if shares > 1 else "local",
        "shares": int(shares),
        "local_noise_multiplier": float(local),
        "epsilon_if_alone": float(alone_epsilon(paths, cfg, (local, q, 1))),
    }


def tenant_train(
    weights: Weights,
    model_cfg: ModelConfig,
    cfg: RunConfig,
    paths: TenantPaths,
    round_: int,
    *,
    shares: int = 1,
) -> TrainOutcome:
    """One round of local training for this tenant (see module docstring for the order of steps).

    ``shares`` (dp-mode cohort only): the tenant adds noise σ/√shares, so that ``shares`` tenants' noisy
    sums add up to one sum with noise σ. It is decided by the tenant (client/app.py: 1 in the clear,
    the SecAgg+ threshold under SecAgg+), never by the server's message; ε is charged at σ (the sum's
    noise) and the ledger records the ε if this tenant's share were seen alone.
    """
    split = load_data(paths).split
    refused = refuse_unwritable(cfg, paths, split.n_users, f"round {round_}")
    if refused is not None:
        return refused
    n = tenant_count(cfg, paths, split.n_users)  # ñ with DP: everything below is planned from it
    local = local_config(cfg)
    cohort = cfg.dp and cfg.dp_mode == "cohort"
    if shares != 1 and not cohort:
        raise FedrecError("only dp-mode cohort splits the DP-SGD noise into shares (docs/FEDERATION.md)")
    try:
        plan = plan_cohort(n, cfg.cohort_rate) if cohort else plan_round(n, local)
    except ValueError as err:
        raise FedrecError(f"tenant {paths.tenant_id}: {err}") from None
    model = HistoryMLP(model_cfg)
    load_weights(model, weights)
    if not cfg.dp:
        stats = train_round(
            model, split, local, noise_multiplier=0.0, seed=_public_seed(cfg, paths.tenant_id, round_)
        )
        return TrainOutcome(
            paths.tenant_id,
            "ok",
            n,
            parameter_weights(model),
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            stats=stats,
        )

    budget = tenant_budget(cfg, paths, split.n_users)
    sigma = noise_plan(paths, budget, plan, cfg)
    q, steps = plan.sample_rate, plan.steps

    def refuse(message: str, status: str = "capped") -> TrainOutcome:
        return TrainOutcome(
            paths.tenant_id,
            status,
            n,
            epsilon=budget.spent(),
            cap=budget.cap,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            message=message,
        )

    closed = evaluated_round(paths)
    if closed is not None and round_ >= closed:
        # The DP evaluation is the run's last charged segment (reserved in σ's calibration): a run
        # extended past it (a resume with more rounds) trains no more on this budget.
        return refuse(f"the DP evaluation of round {closed} closed this run's budget: no training after it")
    if round_ in budget.rounds:
        # A re-sent round (e.g. after a crash) was charged already: never charge twice, never re-release.
        return refuse(f"round {round_} was already charged", "already-charged")
    if not budget.can_train(noise_multiplier=sigma, sample_rate=q, steps=steps):
        after = budget.preview(noise_multiplier=sigma, sample_rate=q, steps=steps)
        return refuse(f"training round {round_} would reach ε={after:.3f} > cap {budget.cap:g}")
    unwritable = state_dir_problem(paths.state_dir)
    if unwritable:  # it could not charge the round: refuse before training, release nothing
        return refuse(
            f"cannot charge round {round_} to the ledger ({unwritable}); refusing to train", "refused"
        )
    extra = cohort_fields(paths, cfg, sigma=sigma, shares=shares, q=q) if cohort else {}
    noise = share_noise_multiplier(sigma, shares)  # σ in the clear; σ/√shares under SecAgg+ (cohort)
    stats = train_round(model, split, local, noise_multiplier=noise, seed=secrets.randbits(63), plan=plan)
    # Charge and log BEFORE the update leaves the tenant.
    eps = budget.charge(round=round_, noise_multiplier=sigma, sample_rate=q, steps=steps)
    entry = Ledger(paths.state_dir / LEDGER_FILE).append(
        {
            **dp_entry(
                cfg,
                paths,
                budget.cap,
                round_=round_,
                users=n,
                sigma=sigma,
                q=q,
                steps=steps,
                eps=eps,
                max_grad_norm=local.max_grad_norm,
            ),
            **extra,
        }
    )
    return TrainOutcome(
        paths.tenant_id,
        "ok",
        n,
        parameter_weights(model),
        epsilon=eps,
        cap=budget.cap,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        stats=stats,
        ledger_entry=entry,
        weight=plan.expected_batch if cohort else None,
    )


def release_message(
    indptr: np.ndarray,
    items: np.ndarray,
    n_items: int,
    noise: gram.ReleaseNoise,
    rng: np.random.Generator,
    selection: np.ndarray | None = None,
) -> Weights:
    """What a tenant publishes for its item release, exactly as sent: unit rows from the CSR history
    (``indptr``/``items``), the exact sums plus this tenant's noise share drawn from ``rng``, packed
    (``popularity`` float32; ``gram`` the packed upper triangle). ``selection`` (``dp_two_stage``
    stage 2): the rows are restricted to those items, unit norm over the selection, and the Gram is
    over them only.

    The one function between a tenant's data and its release message: :func:`tenant_release` calls it
    after charging the budget, and ``fedrec audit --empirical`` calls it in its trials (the audit's
    ``--release-mechanism`` hook takes any function with this signature).
    """
    x = (
        gram.unit_rows(indptr, items, n_items)
        if selection is None
        else gram.selected_rows(indptr, items, n_items, selection)
    )
    rel = gram.release(x, noise, rng)
    out: Weights = {}
    if rel.popularity is not None:
        out["popularity"] = rel.popularity.astype(np.float32)
    if rel.gram is not None:
        out["gram"] = gram.pack_gram(rel.gram)
    return out


def tenant_release(
    cfg: RunConfig,
    paths: TenantPaths,
    round_: int,
    *,
    pop_share: float,
    shares: int = 1,
    stage: int = 0,
    selection: np.ndarray | None = None,
    epsilon_share: float = 1.0,
) -> TrainOutcome:
    """This tenant's item release (module docstring); ``weights`` holds what is published.

    ``pop_share`` = 1: the DP popularity vector only; 0: the Gram only (DP-EASE). ``shares`` > 1: the
    distributed-noise mode of SecAgg+ — this tenant adds 1/shares of the noise variance, and the
    ledger records both the ε of the sum and the ε if its share were seen alone. ``stage`` 1/2: the
    two releases of ``dp_two_stage`` (``fedrec.privacy.gram``, "Two stages"): stage 1 is the popularity
    release at σ/√select-share (select-share from the run config, never from the server's message),
    stage 2 the Gram over ``selection`` at the σ that spends the rest of the cap. Without DP the exact
    sums are released (no noise, no charge): only for ``--no-dp`` runs. ``epsilon_share`` < 1: the
    release that initialises the MLP (``release-init``), calibrated alone to that share of the cap
    (the tenant's own run config decides it); the ledger entry states the share.
    """
    data = load_data(paths)
    split = data.split
    n_items = split.n_items
    if stage not in (0, 1, 2) or (stage == 1 and pop_share != 1.0) or (stage == 2 and pop_share != 0.0):
        raise FedrecError(f"release stage {stage!r} with pop-share {pop_share!r} is not a known release")
    if (stage == 2) != (selection is not None):
        raise FedrecError("a stage-2 release needs the item selection, and only it takes one")
    if stage and epsilon_share < 1:
        raise FedrecError("a dp_two_stage release spends the whole cap; it never initialises an MLP")
    try:
        columns = n_items if selection is None else len(gram.check_selection(selection, n_items))
    except BudgetError as err:
        raise FedrecError(f"refusing the stage-2 release: {err}") from None
    if pop_share < 1 and columns > cfg.gram_limit:
        raise FedrecError(
            f"the item–item Gram of {columns} items is too large to release (gram-limit {cfg.gram_limit}); "
            "use the dp_two_stage, dp_popularity or mlp approach"
        )
    refused = refuse_unwritable(cfg, paths, split.n_users, "the release")
    if refused is not None:
        return refused
    n = tenant_count(cfg, paths, split.n_users)  # ñ with DP (reported, and in the ledger)
    if not cfg.dp:
        exact = release_message(
            split.indptr,
            split.train_items,
            n_items,
            gram.ReleaseNoise(sigma=0.0, pop_share=pop_share),
            np.random.default_rng(0),
            selection,
        )
        return TrainOutcome(paths.tenant_id, "ok", n, exact, steps=1, sample_rate=1.0)

    budget = tenant_budget(cfg, paths, split.n_users)
    if round_ in budget.rounds:  # re-sent (a crash after charging): never charge twice, never re-release
        return TrainOutcome(
            paths.tenant_id,
            "already-charged",
            n,
            epsilon=budget.spent(),
            cap=budget.cap,
            message=f"the release of round {round_} was already charged",
        )
    sigma = gram.calibrate_release_sigma(
        target_epsilon=budget.cap * epsilon_share,
        delta=cfg.delta,
        accountant=cfg.accountant,  # type: ignore[arg-type]
        history_before=[*budget.history, *reserved(cfg)],
    )
    if stage == 1:
        sigma = gram.stage_one_sigma(sigma, cfg.select_share)
    if not budget.can_train(noise_multiplier=sigma, sample_rate=1.0, steps=1):
        return TrainOutcome(
            paths.tenant_id,
            "capped",
            n,
            epsilon=budget.spent(),
            cap=budget.cap,
            noise_multiplier=sigma,
            sample_rate=1.0,
            steps=1,
            message=f"no budget left for the release (cap {budget.cap:g})",
        )
    unwritable = state_dir_problem(paths.state_dir)
    if unwritable:
        return TrainOutcome(
            paths.tenant_id,
            "refused",
            n,
            epsilon=budget.spent(),
            cap=budget.cap,
            noise_multiplier=sigma,
            sample_rate=1.0,
            steps=1,
            message=f"cannot charge the release to the ledger ({unwritable})",
        )
    noise = gram.ReleaseNoise(sigma=sigma, pop_share=pop_share, shares=shares)
    fields = gram.release_ledger_fields(
        tenant=paths.tenant_id,
        users=n,
        sigma=sigma,
        shares=shares,
        pop_share=pop_share,
        delta=cfg.delta,
        accountant=cfg.accountant,  # type: ignore[arg-type]
        cap=budget.cap,
        history_before=budget.history,
        mechanism={0: gram.MECHANISM, 1: gram.MECHANISM_SELECT, 2: gram.MECHANISM_SELECTED_GRAM}[stage],
    )
    if stage:
        fields["stage"] = stage
    if stage == 2:
        fields["selected_items"] = columns
    # Charge and log BEFORE anything is computed that could leave the tenant.
    eps = budget.charge(round=round_, noise_multiplier=sigma, sample_rate=1.0, steps=1)
    entry = Ledger(paths.state_dir / LEDGER_FILE).append(
        {
            **fields,
            "round": round_,
            "epsilon": eps,
            "max_grad_norm": gram.sensitivity(pop_share),  # each user's contribution has L2 norm exactly 1
            "poisson": True,  # q = 1: every user is in the one release (the accountant's q = 1 case)
            "status": "ok",
            "relation": mech.RELATION,
            "count_noise_multiplier": mech.COUNT_SIGMA,
            **({"purpose": "mlp-init", "release_share": epsilon_share} if epsilon_share < 1 else {}),
        }
    )
    rng = np.random.default_rng(secrets.randbits(128))
    message = release_message(split.indptr, split.train_items, n_items, noise, rng, selection)
    return TrainOutcome(
        paths.tenant_id,
        "ok",
        n,
        message,
        epsilon=eps,
        cap=budget.cap,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        ledger_entry=entry,
    )


def ledger_since(paths: TenantPaths, head: str) -> list[dict[str, Any]]:
    """The entries of this tenant's ledger after ``head`` (all of them when ``head`` is unknown).

    The server sends the head it recorded; a tenant that was charged for a round whose reply never
    arrived (a crash, a killed server) hands over that entry with the next reply, so the server's copy
    catches up instead of breaking the chain.
    """
    path = paths.state_dir / LEDGER_FILE
    entries = Ledger(path).entries() if path.exists() else []
    if head and head != GENESIS:
        for i, entry in enumerate(entries):
            if entry.get("hash") == head:
                return entries[i + 1 :]
    return entries


@dataclass(frozen=True)
class SecureUpdate:
    """What a tenant hands to SecAgg+ for masking: a delta and its weight (users), or zeros and why."""

    delta: Weights
    weight: int
    problem: str | None


def secure_update(
    update: Weights | None,
    reference: Weights,
    *,
    users: int,
    max_users: int,
    max_norm: float,
    clipping_range: float,
    max_weight: float,
) -> SecureUpdate:
    """Check the local ``update`` as the server would, then return Δ = update − reference for masking.

    ``reference`` holds the global shared parameters this round started from. SecAgg+ multiplies Δ by
    weight/max_weight and clips every coordinate into ±clipping_range before quantizing — silently.
    Nothing is clipped when ‖Δ‖₂ ≤ clipping_range and weight ≤ max_weight (|Δ_i| ≤ ‖Δ‖₂); an update
    that would be is refused here instead (zeros, weight 0: it adds nothing to the sum, and the tenant
    reports why in clear text next to its budget figures). ``update`` None (capped): zeros, weight 0.
    """
    zeros = {k: np.zeros_like(v) for k, v in reference.items()}
    if update is None:
        return SecureUpdate(zeros, 0, None)
    problem = update_problem(update, reference, users, max_users=max_users, max_norm=max_norm)
    if problem is None and users > max_weight:
        problem = f"user count {users} exceeds SecAgg+ max weight {max_weight:g} (would be clamped)"
    if problem is None:
        delta = {k: (update[k] - reference[k]).astype(np.float32) for k in reference}
        peak = max(float(np.abs(d).max()) for d in delta.values()) * users / max_weight
        if peak <= clipping_range:
            return SecureUpdate(delta, users, None)
        problem = f"update would be clamped to ±{clipping_range:g} by SecAgg+ (peak {peak:.4g})"
    return SecureUpdate(zeros, 0, problem)


def tenant_evaluate(
    weights: Weights, model_cfg: ModelConfig, cfg: RunConfig, paths: TenantPaths, which: str
) -> dict[str, Any]:
    """Mergeable ranking sums of the global model on this tenant's ``which`` ∈ {val, test} items."""
    if which not in ("val", "test"):
        raise FedrecError(f"evaluation split must be 'val' or 'test', got {which!r}")
    data = load_data(paths)
    model = HistoryMLP(model_cfg)
    load_weights(model, weights)
    scorer = ModelScorer(model, local_config(cfg).sampling)
    # Genres for intra-list diversity come from the model's own (public) buffer.
    catalog = Catalog.from_genres(model.genres[: model_cfg.n_items].numpy())
    result = evaluate(scorer, data.split, catalog, which=which, seed=cfg.seed, batch_size=EVAL_BATCH_USERS)
    return result.to_record()


def tenant_evaluate_items(
    weights: Weights,
    item_cfg: ItemModelConfig,
    genres: np.ndarray,
    cfg: RunConfig,
    paths: TenantPaths,
    which: str,
) -> dict[str, Any]:
    """:func:`tenant_evaluate` for a model fitted from the item release (``fedrec.shared_model.item_model``)."""
    if which not in ("val", "test"):
        raise FedrecError(f"evaluation split must be 'val' or 'test', got {which!r}")
    data = load_data(paths)
    model = ItemReleaseModel.from_weights(item_cfg, dict(weights))
    scorer = ModelScorer(model, local_config(cfg).sampling)
    catalog = Catalog.from_genres(genres)
    result = evaluate(scorer, data.split, catalog, which=which, seed=cfg.seed, batch_size=EVAL_BATCH_USERS)
    return result.to_record()


EVAL_RELEASE_FILE = "eval_release.json"


def evaluated_round(paths: TenantPaths) -> int | None:
    """The round at which this tenant charged its DP evaluation in this run (None: not yet)."""
    kept = paths.state_dir / EVAL_RELEASE_FILE
    if not kept.is_file():
        return None
    return int(json.loads(kept.read_text(encoding="utf-8"))["round"])


def private_eval(
    record: dict[str, Any], cfg: RunConfig, paths: TenantPaths, round_: int, model_digest: str
) -> tuple[str, dict[str, Any], str]:
    """``eval-privacy dp``: charge, log, then noise this tenant's evaluation sums (``fedrec.privacy.mechanisms``).

    Returns (status, record to send, message). The charge is the reserved segment (σ_e, q = 1, one
    step) at ``round_`` (after every training round); a re-sent evaluation is never charged twice and
    releases nothing new — asked again for the same round and the same model (a resumed server), it
    re-sends the very record it released (kept in its state dir: post-processing, no further cost; also
    at a later round when the model is unchanged, e.g. a run extended past its evaluation); a
    tenant without budget left releases nothing either.
    """
    split = load_data(paths).split
    n = tenant_count(cfg, paths, split.n_users)
    budget = tenant_budget(cfg, paths, split.n_users)
    sigma, q, steps = mech.eval_segment()
    kept = paths.state_dir / EVAL_RELEASE_FILE
    if kept.is_file():
        prior = json.loads(kept.read_text(encoding="utf-8"))
        # The same model was evaluated and released already (a resumed server, or a run extended
        # past its evaluation in which no tenant trained again): re-send that very record.
        if prior["model"] == model_digest:
            return "ok", dict(prior["record"]), "the evaluation already released for this model"
    if round_ in budget.rounds or (budget.rounds and round_ < budget.rounds[-1]):
        return "already-charged", {}, f"evaluation round {round_} was already charged"
    if not budget.can_train(noise_multiplier=sigma, sample_rate=q, steps=steps):
        return "capped", {}, f"no budget left for the DP evaluation (cap {budget.cap:g})"
    eps = budget.charge(round=round_, noise_multiplier=sigma, sample_rate=q, steps=steps)
    noisy, sens = mech.noisy_eval_record(record)
    Ledger(paths.state_dir / LEDGER_FILE).append(
        dp_entry(
            cfg,
            paths,
            budget.cap,
            round_=round_,
            users=n,
            sigma=sigma,
            q=q,
            steps=steps,
            eps=eps,
            max_grad_norm=sens,  # L2 sensitivity of the released sums: √d
            mechanism=mech.EVAL_MECHANISM,
        )
    )
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(json.dumps({"round": round_, "model": model_digest, "record": noisy}), encoding="utf-8")
    os.replace(tmp, kept)
    return "ok", noisy, ""

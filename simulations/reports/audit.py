"""``fedrec audit``: load a RUN_DIR, run every check, optionally attack a replica, write the report.

1. :func:`load_run` reads ``privacy.json``, ``rounds.jsonl``, ``config.json`` and ``ledger/*.jsonl``
   (one clear error for a missing or corrupt file);
2. :func:`check_run` runs ``fedrec.privacy.audit.check_ledger`` per tenant with what the server recorded
   (per-round heads, statuses, the final head) and the run's plan, plus the run-wide checks, and
   replays ε with Opacus PRV/RDP and dp_accounting PLD/RDP;
3. :func:`empirical_audit` (``--empirical``) retrains one tenant-sized replica with canaries:
   ``m`` synthetic users, each with its own distinctive items (items no other user has), each
   included with probability ½; the run's σ, q, steps and rounds from the tenant's ledger (its
   ``run_config`` for a ``--no-dp`` run), ``fedrec.client.train.train_round`` as in the real run; then the
   membership score of each canary is the mean logit the final model gives its held-out canary
   items given the other half as history, and ``fedrec.privacy.empirical`` turns the scores into an ε lower
   bound. The replica trains that tenant alone (no averaging with other tenants): the strongest
   position for the attacker, the same mechanism for the accountant.

The tenant's real data is not needed (and the coordinator does not have it): the replica uses the
built-in synthetic generator at the tenant's size and the run's catalogue size.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.privacy.audit import (
    Check,
    Finding,
    Replay,
    RunPlan,
    ServerRecord,
    check_ledger,
    read_ledger,
    replay_ledger,
)
from fedrec.privacy.empirical import (
    OneRunResult,
    epsilon_lower_bound_clopper_pearson,
    one_run_audit,
    threshold_confusion,
)
from fedrec.privacy.errors import PrivacyError
from fedrec.privacy.mechanisms import is_side_entry
from fedrec.shared_model.runconfig import RELEASE_APPROACHES
from fedrec.simulations.reports.dpsgd_audit import GradientAuditResult
from fedrec.simulations.reports.errors import AuditError
from fedrec.simulations.reports.release_audit import ReleaseAuditResult

Log = Callable[[str], None]


# ---------------------------------------------------------------- the run's files


@dataclass
class RunFiles:
    run_dir: Path
    privacy: dict[str, Any]
    rounds: list[dict[str, Any]]
    run_config: dict[str, Any]
    ledgers: dict[str, Path]  # tenant → ledger/<tenant>.jsonl (may not exist)
    model: dict[str, Any] | None  # model.json's "model" section

    @property
    def dp(self) -> bool:
        return bool(self.privacy.get("dp", True))

    @property
    def tenants(self) -> list[str]:
        named = set(self.privacy.get("tenants", {})) | set(self.ledgers)
        for row in self.rounds:
            named |= set(row.get("tenants", {}))
        return sorted(named)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(f"{path.parent} is not a federated run directory: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AuditError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise AuditError(f"{path} is not valid JSON ({what}): line {err.lineno}: {err.msg}") from None


def load_run(run_dir: Path) -> RunFiles:
    """Read what ``fedrec simulate`` wrote; :class:`AuditError` for anything missing or corrupt."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise AuditError(f"RUN_DIR {run_dir} does not exist")
    if not run_dir.is_dir():
        raise AuditError(f"RUN_DIR {run_dir} is not a directory")
    privacy = _read_json(run_dir / "privacy.json", "the run's privacy summary")
    if not isinstance(privacy, dict) or not isinstance(privacy.get("tenants"), dict):
        raise AuditError(f"{run_dir / 'privacy.json'} has no 'tenants' object; is this a federated run?")
    config = _read_json(run_dir / "config.json", "the run's configuration")
    run_config = config.get("run_config") if isinstance(config, dict) else None
    if not isinstance(run_config, dict):
        raise AuditError(f"{run_dir / 'config.json'} has no 'run_config' object")
    rounds_path = run_dir / "rounds.jsonl"
    if not rounds_path.is_file():
        raise AuditError(f"{run_dir} is not a federated run directory: rounds.jsonl is missing")
    rounds: list[dict[str, Any]] = []
    for n, line in enumerate(rounds_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AuditError(f"{rounds_path} line {n} is not valid JSON: {err.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise AuditError(f"{rounds_path} line {n} is not a round record (no integer 'round')")
        rounds.append(row)
    ledger_dir = run_dir / "ledger"
    ledgers = {p.stem: p for p in sorted(ledger_dir.glob("*.jsonl"))} if ledger_dir.is_dir() else {}
    for t in privacy["tenants"]:
        ledgers.setdefault(str(t), ledger_dir / f"{t}.jsonl")
    model = None
    if (run_dir / "model.json").is_file():
        model_json = _read_json(run_dir / "model.json", "the model's architecture")
        model = model_json.get("model") if isinstance(model_json, dict) else None
    return RunFiles(run_dir, privacy, rounds, run_config, ledgers, model)


def server_record(run: RunFiles, tenant: str) -> ServerRecord:
    """What the coordinator wrote about ``tenant``: per-round heads and statuses, final figures."""
    heads: dict[int, str] = {}
    status: dict[int, str] = {}
    for row in run.rounds:
        info = row.get("tenants", {}).get(tenant)
        if isinstance(info, dict):
            if isinstance(info.get("ledger_head"), str):
                heads[int(row["round"])] = info["ledger_head"]
            status[int(row["round"])] = str(info.get("status"))
    t = run.privacy["tenants"].get(tenant, {})
    return ServerRecord(
        final_head=t.get("ledger_head"),
        epsilon=t.get("epsilon"),
        users=t.get("users"),
        rounds_trained=t.get("rounds_trained"),
        round_heads=heads,
        round_status=status,
    )


def run_plan(run: RunFiles, tenant: str) -> RunPlan:
    rc = run.run_config
    caps = {}
    for part in filter(None, (p.strip() for p in str(rc.get("caps", "")).split(","))):
        name, _, value = part.partition("=")
        caps[name.strip()] = float(value)
    cap = caps.get(tenant, rc.get("epsilon"))
    if _released(run):
        # One item release (fedrec.privacy.gram): q = 1, one step, every user's contribution of L2 norm 1.
        return RunPlan(
            delta=run.privacy.get("delta", rc.get("delta")),
            accountant=run.privacy.get("accountant", rc.get("accountant")),
            cap=float(cap) if cap is not None else None,
            max_grad_norm=1.0,
            planned_rounds=2 if (run.privacy.get("approach") or {}).get("name") == "dp_two_stage" else 1,
            sample_rate=1.0,
            steps=1,
        )
    rounds = rc.get("num-server-rounds")
    initing = "release_init" in run.privacy  # round 1 was the item release initialising the MLP
    return RunPlan(
        delta=run.privacy.get("delta", rc.get("delta")),
        accountant=run.privacy.get("accountant", rc.get("accountant")),
        cap=float(cap) if cap is not None else None,
        local_epochs=rc.get("local-epochs"),
        batch_users=rc.get("batch-users"),
        max_grad_norm=rc.get("max-grad-norm"),
        planned_rounds=rounds + 1 if initing and rounds is not None else rounds,
        init_rounds=(1,) if initing else (),
        # dp-mode cohort: one step per round at the cohort rate (run configs before it have no key)
        cohort_rate=float(rc["cohort-rate"]) if rc.get("dp-mode") == "cohort" else None,
    )


def _released(run: RunFiles) -> bool:
    """Whether the run was one DP item release (approach dp_ease / dp_popularity) instead of DP-SGD."""
    approach = run.privacy.get("approach") or {}
    return isinstance(approach, dict) and approach.get("name") in RELEASE_APPROACHES


# ---------------------------------------------------------------- checks


@dataclass
class TenantAudit:
    tenant: str
    checks: list[Check]
    replay: Replay | None
    cap: float | None
    users: int | None
    entries: int


@dataclass
class CheckReport:
    run_dir: Path
    dp: bool
    run_checks: list[Check]
    tenants: dict[str, TenantAudit]
    seconds: float

    def all_checks(self) -> list[Check]:
        return [*self.run_checks, *(c for t in self.tenants.values() for c in t.checks)]

    def failed(self) -> list[Check]:
        return [c for c in self.all_checks() if not c.passed]


def _run_checks(run: RunFiles) -> list[Check]:
    """Run-wide claims the report rests on: unit, accountant, δ, Poisson sampling."""
    p = run.privacy
    out: list[Check] = []

    def check(name: str, ok: bool, message: str) -> None:
        findings = () if ok else (Finding(name, None, None, None, message),)
        out.append(Check(name, None, findings))

    check("run_unit_user", p.get("unit") == "user", f"privacy.json states unit {p.get('unit')!r}, not 'user'")
    if run.dp:
        acc, cfg_acc = p.get("accountant"), run.run_config.get("accountant")
        check(
            "run_accountant",
            acc in ("prv", "rdp") and acc == cfg_acc,
            f"privacy.json accountant {acc!r} vs run_config {cfg_acc!r}",
        )
        check(
            "run_delta",
            p.get("delta") == run.run_config.get("delta"),
            f"privacy.json δ {p.get('delta')!r} vs run_config {run.run_config.get('delta')!r}",
        )
        check("run_poisson", p.get("poisson") is True, "privacy.json does not record Poisson sampling")
    return out


def check_run(run: RunFiles, *, log: Log = lambda _: None) -> CheckReport:
    """Every check on every tenant, and the replayed ε (see the module docstring)."""
    t0 = time.perf_counter()
    tenants: dict[str, TenantAudit] = {}
    for tenant in run.tenants:
        path = run.ledgers.get(tenant)
        led = read_ledger(path) if path is not None else None
        entries = led.entries if led else []
        record = server_record(run, tenant)
        if not run.dp:
            if entries:
                finding = Finding("no_dp_no_ledger", tenant, 1, None, "a --no-dp run has ledger entries")
                checks = [Check("no_dp_no_ledger", tenant, (finding,))]
            else:
                checks = [Check("no_dp_no_ledger", tenant, (), "no DP: nothing is claimed or charged")]
            tenants[tenant] = TenantAudit(tenant, checks, None, None, record.users, len(entries))
            continue
        log(f"{tenant}: {len(entries)} ledger entries; replaying ε with 4 accountants …")
        try:
            replay: Replay | None = replay_ledger(entries)
        except PrivacyError:
            replay = None  # malformed beyond accounting: the schema checks say why
        plan = run_plan(run, tenant)
        checks = check_ledger(
            tenant,
            entries,
            lines=led.lines if led else None,
            read_problems=led.problems if led else (),
            plan=plan,
            record=record,
            replay=replay,
        )
        tenants[tenant] = TenantAudit(tenant, checks, replay, plan.cap, record.users, len(entries))
    return CheckReport(run.run_dir, run.dp, _run_checks(run), tenants, time.perf_counter() - t0)


# ---------------------------------------------------------------- the empirical audit


@dataclass(frozen=True)
class EmpiricalConfig:
    """The canary experiment (defaults sized for a few minutes on 2 CPU cores)."""

    canaries: int = 250  # m per replica; each included with probability ½ (0: no data canaries)
    runs: int = 4  # independent replicas (each with fresh canaries); pooled into one bound
    canary_items: int = 16  # distinctive items per canary (half history, half scored)
    confidence: float = 0.95  # of the lower bound
    tenant: str | None = None  # which tenant's mechanism to replicate (default: the first)
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.canaries < 4 and self.canaries != 0) or self.runs < 1 or self.canary_items < 2:
            raise AuditError(
                f"need 0 or ≥ 4 canaries, ≥ 1 run and ≥ 2 items per canary, got {self.canaries}, {self.runs}, "
                f"{self.canary_items}"
            )
        if not 0 < self.confidence < 1:
            raise AuditError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass
class EmpiricalResult:
    tenant: str
    dp: bool
    claimed_epsilon: float | None  # the tenant's final recorded ε (None without DP)
    delta: float
    mechanism: dict[str, Any]  # σ per round, q, steps, rounds, users, batch
    one_run: OneRunResult
    clopper_pearson_lb: float
    scores: list[float]
    included: list[bool]
    seconds: float

    @property
    def epsilon_lb(self) -> float:
        return self.one_run.epsilon_lb

    def check(self) -> Check:
        """Fails when the lower bound exceeds the claim: the DP claim is then empirically false."""
        if self.claimed_epsilon is None or self.epsilon_lb <= self.claimed_epsilon:
            return Check("empirical_lower_bound", self.tenant, (), f"ε_lb {self.epsilon_lb:.3f}")
        msg = (
            f"the canary attack shows ε ≥ {self.epsilon_lb:.3f} at {self.one_run.confidence:.0%} confidence, "
            f"above the claimed ε {self.claimed_epsilon:.3f}"
        )
        return Check(
            "empirical_lower_bound",
            self.tenant,
            (Finding("empirical_lower_bound", self.tenant, None, None, msg),),
        )


def _mechanism(run: RunFiles, tenant: str) -> dict[str, Any]:
    """σ per round, q, steps per round and users of ``tenant`` as the run used them."""
    from fedrec.client.train import LocalTrainConfig, plan_round

    rc = run.run_config
    if run.dp:
        led = read_ledger(run.ledgers[tenant])
        # The DP-SGD rounds only: the round-0 noisy count and the DP evaluation are other mechanisms.
        entries = [e for e in led.entries if isinstance(e, dict) and not is_side_entry(e)]
        if not entries:
            raise AuditError(f"tenant {tenant} has no training round in its ledger: nothing to replicate")
        users = int(entries[-1]["users"])
        return {
            "users": users,
            "sample_rate": float(entries[-1]["sample_rate"]),
            "steps": int(entries[-1]["steps"]),
            "sigmas": [float(e["noise_multiplier"]) for e in entries],
            "max_grad_norm": float(entries[-1]["max_grad_norm"]),
            "source": f"ledger/{tenant}.jsonl",
        }
    users = run.privacy["tenants"].get(tenant, {}).get("users")
    if not isinstance(users, int) or users < 1:
        raise AuditError(f"privacy.json does not record the users of tenant {tenant}")
    local = LocalTrainConfig(
        dp=False, local_epochs=float(rc["local-epochs"]), batch_users=int(rc["batch-users"])
    )
    plan = plan_round(users, local)
    return {
        "users": users,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "sigmas": [0.0] * int(rc["num-server-rounds"]),
        "max_grad_norm": float(rc["max-grad-norm"]),
        "source": "config.json (no DP)",
    }


def _replica_split(
    n_users: int, n_items: int, m: int, k: int, seed: int, rng: np.random.Generator
) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """Synthetic tenant + m canaries (disjoint item sets appended to the catalogue), ~half included.

    Returns (split with the included canaries last, catalog, canary items (m, k), included (m,)).
    """
    from fedrec.shared_model.data import UserSplit
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.sources import synthetic

    data = prepare_dataset(synthetic(users=n_users, items=max(10, n_items), seed=seed))
    base = data.split
    n0 = base.n_items
    canary_items = (n0 + np.arange(m * k, dtype=np.int32)).reshape(m, k)  # (m, k), no other user has them
    included = rng.random(m) < 0.5
    members = canary_items[included]  # (m_in, k)
    n_in = len(members)
    indptr = np.concatenate([base.indptr, base.indptr[-1] + k * np.arange(1, n_in + 1)])
    split = UserSplit(
        n_items=n0 + m * k,
        indptr=indptr.astype(np.int64),
        train_items=np.concatenate([base.train_items, members.reshape(-1)]).astype(np.int32),
        train_ctx=np.concatenate([base.train_ctx, np.zeros((n_in * k, 2), np.int8)]),
        val_item=np.concatenate([base.val_item, np.full(n_in, -1, np.int32)]),
        test_item=np.concatenate([base.test_item, np.full(n_in, -1, np.int32)]),
        val_ctx=np.concatenate([base.val_ctx, np.full((n_in, 2), -1, np.int8)]),
        test_ctx=np.concatenate([base.test_ctx, np.full((n_in, 2), -1, np.int8)]),
        user_features=np.concatenate(
            [base.user_features, np.zeros((n_in, base.user_features.shape[1]), np.int32)]
        ),
    )
    return split, data.catalog, canary_items, included


def _batch_for_rate(n_users: int, q: float) -> int:
    """The batch-users B with 1/ceil(n/B) = q for n users (so the replica keeps the run's rate)."""
    per = round(1.0 / q)
    b = math.ceil(n_users / per)
    if abs(1.0 / math.ceil(n_users / b) - q) > 1e-12:
        raise AuditError(f"cannot reproduce sample rate {q:g} with {n_users} users")
    return b


def _one_replica(
    run: RunFiles, mech: dict[str, Any], cfg: EmpiricalConfig, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train one replica with canaries; returns (scores (m,), included (m,))."""
    import torch

    from fedrec.client.train import LocalTrainConfig, train_round
    from fedrec.shared_model.model import HistoryMLP, ModelConfig
    from fedrec.shared_model.training import SamplingConfig

    rc = run.run_config
    rng = np.random.default_rng([cfg.seed, index])
    n_items = int((run.model or {}).get("n_items", 1000))
    m, k = cfg.canaries, cfg.canary_items
    q, steps = float(mech["sample_rate"]), int(mech["steps"])
    per = round(1.0 / q)
    # The base tenant is sized so that base + included canaries has the run's users when possible, and
    # then trimmed until 1/ceil(n/B) = q holds exactly for some B.
    base_users = max(per, int(mech["users"]) - m // 2)
    split, catalog, items, included = _replica_split(base_users, n_items, m, k, cfg.seed + index, rng)
    for _ in range(per + 1):
        try:
            batch = _batch_for_rate(split.n_users, q)
            break
        except AuditError:
            split = split.subset(np.arange(1, split.n_users))  # drop one base user (canaries stay last)
    else:  # pragma: no cover - ceil arithmetic always finds one within `per` users
        raise AuditError(f"cannot reproduce sample rate {q:g}")
    local = LocalTrainConfig(
        dp=run.dp,
        local_epochs=float(rc.get("local-epochs", 1.0)),
        batch_users=batch,
        lr=float(rc.get("lr", 3e-3)),
        max_grad_norm=float(mech["max_grad_norm"]),
        sampling=SamplingConfig(
            max_history=int(rc.get("max-history", 50)),
            targets=int(rc.get("targets", 20)),
            negatives=int(rc.get("negatives", 4)),
        ),
    )
    hidden = tuple(int(x) for x in str(rc.get("hidden", "64,32")).split(",") if x.strip())
    mcfg = ModelConfig(
        n_items=split.n_items,
        n_genres=catalog.genres.shape[1],
        user_cardinalities=catalog.cardinalities(),
        dim=int(rc.get("dim", 32)),
        hidden=hidden,
    )
    genres = np.zeros((split.n_items, catalog.genres.shape[1]), np.float32)
    genres[: catalog.n_items] = catalog.genres
    torch.manual_seed(int(rng.integers(2**31)))
    model = HistoryMLP(mcfg, genres)
    initial = HistoryMLP(mcfg, genres)
    initial.load_state_dict(model.state_dict())  # the run's initial weights are public (seeded)
    for sigma in mech["sigmas"]:
        stats = train_round(model, split, local, noise_multiplier=sigma, seed=int(rng.integers(2**62)))
        assert stats.steps == steps, f"replica took {stats.steps} steps, the run {steps}"
    half = k // 2
    hist = torch.from_numpy(items[:, :half].astype(np.int64))  # (m, k/2)
    cand = torch.from_numpy(items[:, half:].astype(np.int64))  # (m, k - k/2)
    feats = torch.zeros((m, len(mcfg.user_cardinalities)), dtype=torch.int64)
    ctx = torch.full((m, 2), -1, dtype=torch.int64)
    initial.eval()
    with torch.no_grad():
        # What training did to each canary's held-out items: final minus initial logit, (m, k - k/2)
        lift = model(hist, cand, feats, ctx) - initial(hist, cand, feats, ctx)
        scores = lift.mean(1).double().numpy()  # (m,)
    # Standardise within the replica: each replica moves all canary items by its own common shift,
    # and pooling replicas must compare canaries by their lift relative to their own replica.
    spread = float(scores.std()) or 1.0
    return (scores - float(np.median(scores))) / spread, included


def empirical_audit(run: RunFiles, cfg: EmpiricalConfig, *, log: Log = lambda _: None) -> EmpiricalResult:
    """The canary experiment of the module docstring; pooled over ``cfg.runs`` replicas."""
    t0 = time.perf_counter()
    tenant = cfg.tenant or (run.tenants[0] if run.tenants else None)
    if tenant is None or tenant not in run.tenants:
        raise AuditError(f"tenant {cfg.tenant!r} is not in this run (tenants: {', '.join(run.tenants)})")
    if _released(run):
        raise AuditError(
            "the canary experiment replays DP-SGD training; this run was one DP item release "
            f"({run.privacy['approach']['name']}), whose ledger checks and ε replay are the audit"
        )
    mech = _mechanism(run, tenant)
    delta = float(run.privacy.get("delta") or run.run_config.get("delta") or 1e-5)
    scores, included = [], []
    for i in range(cfg.runs):
        log(
            f"empirical: replica {i + 1}/{cfg.runs} of {tenant} with {cfg.canaries} canaries "
            f"({len(mech['sigmas'])} rounds × {mech['steps']} steps, q={mech['sample_rate']:.4g}, "
            f"σ={mech['sigmas'][0]:.4g}) …"
        )
        s, inc = _one_replica(run, mech, cfg, i)
        scores.append(s)
        included.append(inc)
    all_s, all_inc = np.concatenate(scores), np.concatenate(included)
    one = one_run_audit(all_s, all_inc, delta=delta, confidence=cfg.confidence)
    tp, fp, tn, fn = threshold_confusion(all_s, all_inc, float(np.median(all_s)))
    cp = epsilon_lower_bound_clopper_pearson(
        tp=tp, fp=fp, tn=tn, fn=fn, delta=delta, confidence=cfg.confidence
    )
    claimed = run.privacy["tenants"].get(tenant, {}).get("epsilon") if run.dp else None
    return EmpiricalResult(
        tenant=tenant,
        dp=run.dp,
        claimed_epsilon=float(claimed) if claimed is not None else None,
        delta=delta,
        mechanism={**mech, "canaries": cfg.canaries, "runs": cfg.runs, "canary_items": cfg.canary_items},
        one_run=one,
        clopper_pearson_lb=cp,
        scores=[float(x) for x in all_s],
        included=[bool(x) for x in all_inc],
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- all of it


@dataclass
class AuditOutcome:
    checks: CheckReport
    empirical: EmpiricalResult | None
    report_dir: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    environment: dict[str, str] = field(default_factory=dict)
    release: ReleaseAuditResult | None = None  # --empirical on a release run
    gradient: GradientAuditResult | None = None  # --empirical on a DP-SGD run: white-box gradient canaries

    def failed(self) -> list[Check]:
        out = self.checks.failed()
        if self.gradient is not None:
            out += [c for c in self.gradient.checks() if not c.passed]
        if self.empirical is not None and not self.empirical.check().passed:
            out.append(self.empirical.check())
        if self.release is not None:
            out += [c for c in self.release.checks() if not c.passed]
        return out

    @property
    def passed(self) -> bool:
        return not self.failed()

"""The coordinator's work, as a plain function over a Flower ``Grid``.

Per round: broadcast the global weights (with the ledger head held for each tenant) → each tenant
trains (or refuses: capped, already charged) → plain: validate each update and aggregate the accepted
ones (fedavg | median | trimmed); SecAgg+: the tenants check and mask, the server unmasks only the
weighted mean delta and checks it (``fedrec.server.secagg``) → federated validation from running sums →
``rounds.jsonl`` line (statuses, rejections with reasons, failures, the simulated-fault plan), ledger
copies, then the checkpoint that ``resume`` continues from. At the end: test metrics from sums (never
an average of averages), ``privacy.json``, ``model.pt``/``model.json``, plots.

Approaches ``dp_ease``/``dp_popularity`` (or ``auto`` resolving to one of them, ``fedrec.server.release``):
the run is ONE round in which every tenant publishes its DP item release (charged and logged first,
like a training round); the server sums the releases (in the clear, or under SecAgg+ with the noise
split into shares) and fits the model from the sum. Validation, test, checkpoint, ledgers and
``model.pt`` follow the same path as the MLP's.

The server never sees a user id or an interaction; what it learns per tenant is listed, field by field,
in ``fedrec.privacy.transcript``: the DP update (not under SecAgg+), the noisy user count ñ, budget
figures and ledger entries, and evaluation sums — Gaussian-noised and charged for the final test only
(``eval-privacy dp``), or exact every round and labelled NOT covered by ε (``eval-privacy exact``).
It uses ñ only (FedAvg and SecAgg+ weights, ``auto``, the release fit, reports); the manifests'
exact counts, which a simulation's server can read, serve only as a sanity bound with 6 σ_c slack.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrec.privacy import gram
from fedrec.privacy.ledger import read_entries, verify_chain
from fedrec.privacy.mechanisms import COUNT_SIGMA, COUNT_SLACK, EVAL_SIGMA, RELATION, RELATION_TEXT
from fedrec.server.aggregation import ServerOptimizer, aggregate, fedavg
from fedrec.server.release import (
    ApproachChoice,
    fit_release,
    pop_share,
    release_problem,
    release_rounds,
    release_shapes,
    resolve_approach,
    shares_for,
    sum_noise,
    tier_size,
    two_stage_size,
)
from fedrec.server.release_init import (
    init_model_config,
    init_problem,
    init_shapes,
    init_tables_from_release,
    public_item_text,
    row_selection,
)
from fedrec.server.secagg import SecureAggregator, reply_node, shares_and_threshold
from fedrec.shared_model.artifacts import save_model, write_json_atomic
from fedrec.shared_model.codec import (
    Weights,
    arrays_of,
    as_float,
    as_int,
    config_of,
    metrics_of,
    state_weights,
    to_record,
    update_problem,
)
from fedrec.shared_model.data import Catalog
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.evaluate import EvalResult
from fedrec.shared_model.item_model import ItemModelConfig, ItemReleaseModel, Ranker
from fedrec.shared_model.model import HistoryMLP, ModelConfig, fold_item_rows
from fedrec.shared_model.runconfig import RELEASE_APPROACHES, RunConfig
from fedrec.shared_model.training import SamplingConfig

Log = Callable[[str], None]
RESUME_FILE = "resume.pt"
ITEM_RELEASE_PHASE = "item-release"  # the train-config phase of the release (fedrec.client.app.ITEM_RELEASE)
__all__ = ["fedavg", "run_federation", "validate_update"]


# ------------------------------------------------------------------ inputs
def load_catalog(cfg: RunConfig) -> Catalog:
    path = Path(cfg.catalog) if cfg.catalog else Path(cfg.fed_dir) / "catalog.json"
    if not path.is_file():
        raise FedrecError(f"catalogue {path} not found (set run-config catalog or fed-dir)")
    return Catalog.from_json(json.loads(path.read_text(encoding="utf-8")))


def federation_tenants(cfg: RunConfig) -> list[str]:
    path = Path(cfg.fed_dir) / "federation.json" if cfg.fed_dir else None
    if path is None or not path.is_file():
        return []
    return [str(t) for t in json.loads(path.read_text(encoding="utf-8")).get("tenants", [])]


def model_config(catalog: Catalog, cfg: RunConfig) -> ModelConfig:
    return ModelConfig(
        n_items=catalog.n_items,
        n_genres=len(catalog.genre_names),
        user_cardinalities=catalog.cardinalities(),
        dim=cfg.dim,
        hidden=cfg.hidden_sizes(),
    )


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes[:expected] if expected else nodes
        if time.monotonic() > deadline:
            raise FedrecError(
                f"only {len(nodes)} of {expected} tenant node(s) connected within {timeout:g} s"
            )
        time.sleep(0.5)


def wait_for_rejoin(grid: Grid, nodes: list[int], timeout: float) -> list[int]:
    """Before a round, wait up to ``timeout`` s for every node of the run to be connected (a partner
    whose SuperNode restarted after a crash, or that stalled and resumed, takes part again instead of
    being lost for one more round); the nodes still missing, which the round then goes on without."""
    deadline = time.monotonic() + timeout
    while True:
        missing = sorted(set(nodes) - set(grid.get_node_ids()))
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.5)


# ------------------------------------------------------------------ validation
def validate_update(
    weights: Weights,
    reference: Weights,
    users: int,
    max_users: int | None = None,
    *,
    max_norm: float | None = None,
) -> str | None:
    """Why an update must be rejected, or None: exact keys, shapes and dtypes; finite; the L2 norm of
    ``weights − reference`` within ``max_norm``; 0 < users ≤ ``max_users`` (the tenant's manifest)."""
    return update_problem(weights, reference, users, max_users=max_users, max_norm=max_norm)


def manifest_users(cfg: RunConfig) -> dict[str, int]:
    """Upper bounds on each tenant's reported count, from the manifests a simulation's server can read;
    empty where the server has none (a deployment). With DP the reports are the noisy count ñ, so the
    bound is the manifest count + 6 σ_c; it is used only to refuse absurd counts, never as a weight."""
    out: dict[str, int] = {}
    slack = COUNT_SLACK if cfg.dp else 0
    for tenant in federation_tenants(cfg):
        path = Path(cfg.fed_dir) / tenant / "manifest.json"
        if path.is_file():
            counts = json.loads(path.read_text(encoding="utf-8")).get("counts", {})
            out[tenant] = int(counts.get("users", 0)) + slack
    return out


def query_users(grid: Grid, nodes: list[int], timeout: float) -> dict[str, int]:
    """Each tenant's (noisy, with DP) user count ñ, asked by a QUERY message."""
    msgs = [
        Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=nid, group_id="users")
        for nid in nodes
    ]
    out: dict[str, int] = {}
    for rep in grid.send_and_receive(msgs, timeout=timeout):
        if not rep.has_error():
            st = config_of(rep.content, "status")
            out[str(st["tenant"])] = as_int(st["users"])
    return out


# ------------------------------------------------------------------ messaging
def _messages(
    nodes: Iterable[int], kind: str, weights: Weights, config: dict[str, Any], group: str
) -> list[Message]:
    out = []
    for nid in nodes:
        content = RecordDict({"arrays": to_record(weights), "config": ConfigRecord(config)})
        out.append(Message(content=content, message_type=kind, dst_node_id=nid, group_id=group))
    return out


@dataclass
class TenantStatus:
    users: int = 0
    rounds_trained: int = 0
    epsilon: float | None = None
    cap: float | None = None
    status: str = "ok"
    ledger_head: str = "0" * 64
    history: list[tuple[int, float]] = field(default_factory=list)  # (round, ε)


def federated_eval(
    grid: Grid,
    nodes: list[int],
    weights: Weights,
    model_json: str,
    which: str,
    timeout: float,
    group: str,
    *,
    extra: Callable[[int], dict[str, Any]] | None = None,
    on_status: Callable[[int, Mapping[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Merge the tenants' running sums and divide once.

    ``extra(node)`` adds per-node config (the round and ledger head of a DP evaluation); ``on_status``
    sees each reply's status record (its ledger entries); a reply without sums (a tenant that refused:
    capped, already charged) is reported as an error line.
    """
    sent: list[Message] = []
    for nid in nodes:
        config = {"which": which, "model-config": model_json, **(extra(nid) if extra else {})}
        sent.extend(_messages([nid], MessageType.EVALUATE, weights, config, group))
    replies = grid.send_and_receive(sent, timeout=timeout)
    total: EvalResult | None = None
    errors = []
    for rep in replies:
        nid = reply_node(rep, sent)
        if rep.has_error():
            errors.append(f"node {nid}: {_short(rep.error.reason or '')}")
            continue
        st = config_of(rep.content, "status")
        if on_status is not None:
            on_status(nid, st)
        if "sums" not in rep.content.metric_records:
            errors.append(f"{st.get('tenant')!s}: {st.get('status')!s} {st.get('message', '')!s}".strip())
            continue
        part = EvalResult.from_record(dict(metrics_of(rep.content, "sums")))
        total = part if total is None else total + part
    if total is None:
        return {}, errors
    return total.to_metrics(), errors


def _short(reason: str, limit: int = 300) -> str:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    last = [ln for ln in text.splitlines() if ln.strip()]
    return (last[-1] if last else text)[:limit]


# ------------------------------------------------------------------ the run
class _Round:
    """The bookkeeping of one round: the rounds.jsonl row, accepted updates, per-tenant state."""

    def __init__(self, fed: _Federation, rnd: int) -> None:
        self.fed, self.rnd = fed, rnd
        self.row: dict[str, Any] = {"round": rnd, "tenants": {}, "failures": []}
        self.accepted: list[tuple[Weights, int]] = []
        self.contributors: list[str] = []

    def failure(self, nid: int | None, reason: str) -> None:
        item: dict[str, Any] = {"reason": _short(reason)}
        if nid is not None:
            item["node"] = nid
            if nid in self.fed.node_tenant:
                item["tenant"] = self.fed.node_tenant[nid]
        self.row["failures"].append(item)

    def report(self, nid: int, st: Mapping[str, Any], met: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Record a tenant's clear-text status, budget figures and ledger entries."""
        fed = self.fed
        tenant = str(st["tenant"])
        sent_head = fed.sent_heads.get(nid, "")
        fed.node_tenant[nid] = tenant
        ts = fed.status.setdefault(tenant, TenantStatus())
        ts.users = as_int(met["users"])
        eps, cap = as_float(met["epsilon"]), as_float(met["cap"])
        if eps >= 0:
            ts.epsilon = eps
        ts.cap = cap if cap >= 0 else ts.cap
        info: dict[str, Any] = {"status": str(st["status"]), "users": ts.users, "epsilon": ts.epsilon}
        problem = fed.record_ledger(tenant, ts, json.loads(str(st["ledger-entries"]) or "[]"), sent_head)
        if problem:
            info["ledger_problem"] = problem
        info["ledger_head"] = ts.ledger_head
        if str(st["message"]):
            info["message"] = str(st["message"])
        if str(st["status"]) == "capped":
            ts.status = "capped"
        if ts.epsilon is not None:
            ts.history.append((self.rnd, ts.epsilon))
        self.row["tenants"][tenant] = info
        return tenant, info

    def reject(self, info: dict[str, Any], reason: str) -> None:
        info["status"] = "rejected"
        info["reason"] = reason
        info["aggregated"] = False


class _Federation:
    """State of a run across rounds (restored from RUN_DIR on resume)."""

    def __init__(self, grid: Grid, cfg: RunConfig, out: Path, log: Log) -> None:
        self.grid, self.cfg, self.out, self.log = grid, cfg, out, log
        self.catalog = load_catalog(cfg)
        self.tenants = federation_tenants(cfg)
        self.max_users = manifest_users(cfg)
        self.mcfg = model_config(self.catalog, cfg)
        if cfg.release_init > 0:
            self.mcfg = init_model_config(
                self.mcfg,
                dot_mix=cfg.dot_mix if cfg.dot_mix >= 0 else None,
                trainable=cfg.train_modules(),
                prior_negatives=cfg.prior_negatives,
                candidate_table=cfg.release_init_items == "ease",
                item_rows=min(cfg.dp_rows, self.catalog.n_items),
            )
        # public title embeddings for release-init-items text (None otherwise); read before round 1 so a
        # missing titles file or model package stops the run before any tenant is charged
        self.item_text = public_item_text(cfg, self.catalog)
        self.model_json = json.dumps(self.mcfg.to_json())
        torch.manual_seed(cfg.seed)
        self.model: Ranker = HistoryMLP(self.mcfg, self.catalog.genres if self.mcfg.n_genres else None)
        self.global_w = state_weights(self.model)
        self.param_keys = [k for k, _ in self.model.named_parameters()]
        self.status: dict[str, TenantStatus] = {}
        self.node_tenant: dict[int, str] = {}  # learned from replies (node ids change across restarts)
        self.sent_heads: dict[int, str] = {}  # the ledger head sent to each node this round
        self.method, self.cut = cfg.aggregation_method()
        self.nodes: list[int] = []
        self.secure: SecureAggregator | None = None
        self.choice: ApproachChoice | None = None
        self.release_secure: SecureAggregator | None = None
        self.release_shares = 1
        self.server_opt = ServerOptimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum)
        # The best round on federated validation so far: (round, val NDCG@10, global weights).
        self.best: tuple[int, float, Weights] | None = None

    def note_validation(self, rnd: int, val: Mapping[str, Any]) -> bool:
        """Remember this round's model if its validation NDCG@10 is the best so far (ties: earlier)."""
        score = val.get("ndcg@10")
        if score is None or not np.isfinite(score):
            return False
        if self.best is None or float(score) > self.best[1]:
            self.best = (rnd, float(score), {k: v.copy() for k, v in self.global_w.items()})
            return True
        return False

    def set_item_model(self, model: ItemReleaseModel) -> None:
        """The run's model is now one fitted from the item release (checkpoint, eval and save follow)."""
        self.model = model
        self.global_w = model.to_weights()
        self.model_json = json.dumps(model.cfg.to_json())
        self.param_keys = []

    def eval_weights(self) -> Weights:
        """What the tenants evaluate: the global weights (+ the public genres for an item model)."""
        if isinstance(self.model, ItemReleaseModel):
            return {**self.global_w, "genres": self.catalog.genres.astype(np.float32)}
        return self.global_w

    def test_eval(self, charge_round: int) -> tuple[dict[str, Any], list[str]]:
        """The final test evaluation; under eval-privacy dp each tenant charges it at ``charge_round``
        and hands over the ledger entry, which the server's copy records like a training round's. The
        exact sums are not charged, but their replies too bring the entries the server lacks."""
        cfg = self.cfg
        return federated_eval(
            self.grid, self.nodes, self.eval_weights(), self.model_json, "test", cfg.round_timeout, "test",
            **self.ledger_sync(None if cfg.eval_exact() else charge_round),
        )  # fmt: skip

    # ---------------------------------------------------------- ledgers
    def ledger_sync(self, charge_round: int | None = None) -> dict[str, Any]:
        """``federated_eval`` hooks with which each evaluation reply brings the tenant's ledger entries
        the server lacks: a round charged whose update was lost to a crash is recorded even when no
        training round follows (the last round). ``charge_round``: the DP evaluation's round, sent to
        the tenants and recorded in each tenant's ε history when its entry arrives."""

        def extra(nid: int) -> dict[str, Any]:
            conf: dict[str, Any] = {"ledger-head": self.head_for(nid)}
            if charge_round is not None:
                conf["round"] = charge_round
            return conf

        def on_status(nid: int, st: Mapping[str, Any]) -> None:
            problem = self.sync_ledger(nid, st)
            if problem:
                self.log(f"node {nid}: evaluation ledger entries not recorded: {problem}")
            elif charge_round is not None and json.loads(str(st.get("ledger-entries", "[]")) or "[]"):
                eps = self.status[str(st["tenant"])].epsilon
                if eps is not None:  # set by sync_ledger from the entry just recorded
                    self.status[str(st["tenant"])].history.append((charge_round, eps))

        return {"extra": extra, "on_status": on_status}

    def approach_conf(self) -> dict[str, str]:
        """The approach this run trains (and auto's head for approach mlp), named in every train and
        release message: a tenant whose run config says auto resolves its own settings for it
        (``fedrec.client.task.tenant_config``), one that names another approach refuses the message."""
        assert self.choice is not None, "the approach is resolved before round 1"
        return {"approach": self.choice.approach, "head": self.choice.head}

    def head_for(self, nid: int) -> str:
        """The ledger head the server holds for the node's tenant ("" = unknown: send everything)."""
        tenant = self.node_tenant.get(nid)
        head = self.status[tenant].ledger_head if tenant in self.status else ""
        self.sent_heads[nid] = head
        return head

    def record_ledger(
        self, tenant: str, ts: TenantStatus, entries: list[dict[str, Any]], sent_head: str
    ) -> str | None:
        """Append the tenant's new entries to the server's copy; a problem if they do not continue it.

        With no head sent (first contact, or after a restart) the tenant sends its whole ledger, which
        must extend the server's copy; the entries the copy lacks (rounds charged whose reply never
        arrived) are appended. A round charged is thus recorded even when its update was lost.
        """
        path = self.out / "ledger" / f"{tenant}.jsonl"
        copy, _ = read_entries(path)
        if not sent_head:
            have = [e.get("hash") for e in copy]
            if [e.get("hash") for e in entries[: len(have)]] != have:
                return "the tenant's ledger does not extend the server's copy; nothing appended"
            new = entries[len(have) :]
        else:
            new = entries
            if new and new[0].get("prev_hash") != ts.ledger_head:
                return "entries do not continue the chain the server recorded; nothing appended"
        if new:
            problems = verify_chain([*copy, *new])
            if problems:
                return f"ledger copy would not verify ({problems[0].message}); nothing appended"
            with open(path, "a", encoding="utf-8") as f:
                for entry in new:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            ts.ledger_head = str(new[-1]["hash"])
        return None

    def sync_ledger(self, nid: int, st: Mapping[str, Any]) -> str | None:
        """Record the ledger entries an evaluation reply brought (none: nothing to do)."""
        if "ledger-entries" not in st:
            return None
        tenant = str(st["tenant"])
        self.node_tenant[nid] = tenant
        ts = self.status.setdefault(tenant, TenantStatus())
        entries = json.loads(str(st["ledger-entries"]) or "[]")
        problem = self.record_ledger(tenant, ts, entries, self.sent_heads.get(nid, ""))
        if not problem and entries:
            ts.epsilon = max(ts.epsilon or 0.0, float(entries[-1]["epsilon"]))
        return problem

    # ---------------------------------------------------------- resume
    def restore(self) -> int:
        """Load the last complete round from RUN_DIR; returns it (0: start over, keeping the ledgers)."""
        ck = self.out / "checkpoint" / RESUME_FILE
        done = 0
        if ck.is_file():
            state = torch.load(ck, map_location="cpu", weights_only=True)
            done = int(state["round"])
            self.global_w = {k: v.numpy().copy() for k, v in state["weights"].items()}
            if "item-model" in state:
                cfg_json = json.loads(state["item-model"])
                self.set_item_model(
                    ItemReleaseModel.from_weights(ItemModelConfig.from_json(cfg_json), self.global_w)
                )
            for t, d in json.loads(state["status"]).items():
                self.status[t] = TenantStatus(**{**d, "history": [tuple(x) for x in d["history"]]})
            if "server-opt" in state:
                opt = state["server-opt"]
                self.server_opt.restore(
                    {
                        "name": opt["name"],
                        "t": int(opt["t"]),
                        "m": {k: v.numpy() for k, v in opt["m"].items()},
                        "v": {k: v.numpy() for k, v in opt["v"].items()},
                    }
                )
            if "best" in state:
                b = state["best"]
                self.best = (
                    int(b["round"]),
                    float(b["ndcg"]),
                    {k: v.numpy().copy() for k, v in b["weights"].items()},
                )
        rows_path = self.out / "rounds.jsonl"
        if rows_path.exists():
            kept = []
            for line in rows_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line torn by the kill
                if int(row["round"]) <= done:
                    kept.append(line)
            _write_lines_atomic(rows_path, kept)
        for path in sorted((self.out / "ledger").glob("*.jsonl")):
            entries, problems = read_entries(path)
            if problems:  # keep the complete lines before a torn one
                entries = entries[: problems[0].line - 1]
                _write_lines_atomic(path, [json.dumps(e, sort_keys=True) for e in entries])
            ts = self.status.setdefault(path.stem, TenantStatus())
            ts.ledger_head = str(entries[-1]["hash"]) if entries else "0" * 64
        return done

    def checkpoint(self, rnd: int) -> None:
        """Global model after round ``rnd``: ``resume.pt`` (one atomic file: the commit point for
        ``--resume``) plus ``model.pt``/``model.json`` for serving."""
        _checkpoint(self.out, self.model, self.global_w, self.catalog, self.cfg, rnd)
        ck = self.out / "checkpoint"
        state = {
            "round": rnd,
            "weights": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.global_w.items()},
            "status": json.dumps({t: asdict(s) for t, s in self.status.items()}),
        }
        if isinstance(self.model, ItemReleaseModel):
            state["item-model"] = json.dumps(self.model.cfg.to_json())
        opt = self.server_opt.state()
        state["server-opt"] = {
            "name": opt["name"],
            "t": opt["t"],
            "m": {k: torch.from_numpy(np.asarray(v)) for k, v in self.server_opt.m.items()},
            "v": {k: torch.from_numpy(np.asarray(v)) for k, v in self.server_opt.v.items()},
        }
        if self.best is not None:
            rnd_b, ndcg_b, w_b = self.best
            state["best"] = {
                "round": rnd_b,
                "ndcg": ndcg_b,
                "weights": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in w_b.items()},
            }
        tmp = ck / f".{RESUME_FILE}.tmp"
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, ck / RESUME_FILE)

    # ---------------------------------------------------------- rounds
    def clear_replies(
        self, rd: _Round, messages: list[Message], what: str
    ) -> Iterator[tuple[str, dict[str, Any], Mapping[str, Any], Weights]]:
        """Send a round's messages; yield (tenant, info, metrics, arrays) of each readable "ok" reply.

        Errors, refusals (capped, already charged), unreadable arrays and missing replies are
        recorded in the round's row here; the caller validates what it is given.
        """
        seen = set()
        for rep in self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout):
            nid = reply_node(rep, messages)  # not the SuperLink's id when it answers for a lost node
            seen.add(nid)
            if rep.has_error():
                rd.failure(nid, rep.error.reason or "")
                continue
            met = metrics_of(rep.content, "metrics")
            tenant, info = rd.report(nid, config_of(rep.content, "status"), met)
            if info["status"] != "ok":
                continue
            try:
                arrays = arrays_of(rep.content)
            except (KeyError, TypeError, ValueError) as e:
                rd.reject(info, f"unreadable {what} ({e})")
                continue
            yield tenant, info, met, arrays
        for nid in sorted(set(self.nodes) - seen):
            rd.failure(nid, f"no reply within {self.cfg.round_timeout:g} s")

    def plain_round(self, rd: _Round) -> None:
        """Every tenant's update in the clear: validate each, aggregate the accepted ones."""
        cfg, rnd = self.cfg, rd.rnd
        reference = {k: self.global_w[k] for k in self.param_keys}
        messages = []
        for nid in self.nodes:
            config = ConfigRecord(
                {
                    "round": rnd,
                    "model-config": self.model_json,
                    "ledger-head": self.head_for(nid),
                    **self.approach_conf(),
                }
            )
            content = RecordDict({"arrays": to_record(self.global_w), "config": config})
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid, group_id=str(rnd))
            )
        for tenant, info, met, weights in self.clear_replies(rd, messages, "update"):
            users = as_int(met["num-examples"])
            problem = validate_update(
                weights, reference, users, self.max_users.get(tenant), max_norm=cfg.max_update_norm
            )
            if problem:
                rd.reject(info, problem)
                continue
            info["aggregated"] = True
            rd.accepted.append((weights, users))
            rd.contributors.append(tenant)
        if len(rd.accepted) >= max(1, cfg.min_tenants):
            new = aggregate(rd.accepted, self.method, self.cut)
            self.apply(rd, {k: new[k] - reference[k] for k in self.param_keys})
        else:
            self.unchanged(rd, f"only {len(rd.accepted)} valid update(s)")

    def secure_round(self, rd: _Round) -> None:
        """SecAgg+: the server sees each tenant's status in the clear and only the sum of the deltas."""
        assert self.secure is not None
        res = self.secure.run_round(
            rd.rnd,
            self.global_w,
            self.param_keys,
            lambda nid: {
                "model-config": self.model_json,
                "ledger-head": self.head_for(nid),
                **self.approach_conf(),
            },
        )
        rd.row["secagg"] = {**self.secure.describe(), "reported": len(res.reports)}
        weights = 0
        for nid, rep in sorted(res.reports.items()):
            _tenant, info = rd.report(nid, rep, rep)
            weight = as_int(rep["num-examples"])
            if info["status"] == "rejected":
                info["reason"] = info.pop("message", "")  # refused by the tenant before masking
                info["aggregated"] = False
            elif info["status"] == "ok" and weight > 0:
                info["aggregated"] = not res.halted
                rd.contributors.append(_tenant)
                weights += weight
        for failed_node, reason in res.failures:
            rd.failure(failed_node, reason)
        if not res.halted:
            rd.row["secagg"]["recovered_dropouts"] = len(set(self.nodes) - set(res.reports))
        if res.halted or res.mean_delta is None:
            self.unchanged(rd, res.halted or "SecAgg+ returned no sum")
            return
        if weights <= 0 or len(rd.contributors) < max(1, self.cfg.min_tenants):
            self.unchanged(rd, f"only {len(rd.contributors)} tenant(s) contributed to the sum")
            return
        if self.cfg.dp and self.cfg.dp_mode == "cohort" and len(rd.contributors) < self.release_shares:
            # Each contributor added σ/√shares: fewer than `shares` noise shares in the sum carry less
            # than the σ every tenant was charged for. An honest server does not use such a sum.
            self.unchanged(
                rd,
                f"only {len(rd.contributors)} noise share(s) in the SecAgg+ sum, fewer than the "
                f"{self.release_shares} the tenants split σ into",
            )
            return
        mean = {k: v.astype(np.float32) for k, v in res.mean_delta.items()}
        zeros = {k: np.zeros_like(self.global_w[k]) for k in self.param_keys}
        problem = update_problem(mean, zeros, 1, max_norm=self.cfg.max_update_norm)
        if problem:
            rd.row["sum_rejected"] = problem
            self.unchanged(rd, f"the SecAgg+ sum fails validation: {problem}")
            return
        self.apply(rd, mean)

    def release_stage(self, rd: _Round) -> tuple[int, np.ndarray | None]:
        """(stage, selection) of this release round: (0, None) for a one-release approach; for
        dp_two_stage round 1 is the selecting popularity release, round 2 the Gram over the top
        items of the stage-1 model (restored from the checkpoint after a resume): as many as the stage-1
        model's ``select`` (the M rule, :func:`two_stage_size`), or the gram-limit."""
        assert self.choice is not None
        if self.choice.approach != "dp_two_stage":
            return 0, None
        if rd.rnd == 1:
            return 1, None
        if not isinstance(self.model, ItemReleaseModel) or self.model.cfg.kind != "dp_popularity":
            raise FedrecError("stage 2 of dp_two_stage needs the stage-1 DP popularity model")
        prior = self.model.prior.numpy().astype(np.float64)
        m = self.model.cfg.select or min(self.cfg.gram_limit, self.catalog.n_items)  # the M rule's pick
        return 2, gram.select_top(prior, m)

    def release_config(self, stage: int, selection: np.ndarray | None) -> dict[str, Any]:
        assert self.choice is not None
        conf: dict[str, Any] = {
            "phase": ITEM_RELEASE_PHASE,
            "pop-share": pop_share(self.choice.approach, stage),
            "stage": stage,
        }
        if selection is not None:
            conf["items"] = json.dumps(selection.tolist())  # public: post-processing of the stage-1 release
        return conf

    def collect_releases(
        self,
        rd: _Round,
        conf: Mapping[str, Any],
        problem_of: Callable[[Weights, int, int | None], str | None],
    ) -> tuple[dict[str, np.ndarray], list[float], int]:
        """Ask every node for its item release (``conf``: phase, pop-share, and for dp_two_stage the
        stage and selection) in the clear, refuse a reply that ``problem_of(release, users, manifest
        users)`` finds wrong, and sum the rest: (the summed release in float64, the contributors' noise
        multipliers, their (noisy) user count)."""
        messages = [
            Message(
                content=RecordDict(
                    {
                        "config": ConfigRecord(
                            {
                                **conf,
                                "round": rd.rnd,
                                "ledger-head": self.head_for(nid),
                                **self.approach_conf(),
                            }
                        )
                    }
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=nid,
                group_id=str(rd.rnd),
            )
            for nid in self.nodes
        ]
        total: dict[str, np.ndarray] = {}
        sigmas: list[float] = []
        users = 0
        for tenant, info, met, rel in self.clear_replies(rd, messages, "release"):
            n = as_int(met["num-examples"])
            problem = problem_of(rel, n, self.max_users.get(tenant))
            if problem:
                rd.reject(info, problem)
                continue
            info["aggregated"] = True
            for k, v in rel.items():
                total[k] = total[k] + v.astype(np.float64) if k in total else v.astype(np.float64)
            sigmas.append(as_float(met["noise-multiplier"]))
            users += n
            rd.contributors.append(tenant)
        return total, sigmas, users

    def release_round(self, rd: _Round) -> None:
        """Every tenant publishes its DP item release in the clear; the server checks and sums them
        (dp_two_stage: this round's stage, over the selection in stage 2)."""
        assert self.choice is not None
        stage, selection = self.release_stage(rd)
        want = release_shapes(
            self.choice.approach, stage, self.catalog.n_items, 0 if selection is None else len(selection)
        )
        total, sigmas, users = self.collect_releases(
            rd, self.release_config(stage, selection), lambda rel, n, cap: release_problem(rel, want, n, cap)
        )
        self.fit_from_release(rd, total, sigmas, users, shares=1, stage=stage, selection=selection)

    def release_init_round(self, rd: _Round) -> None:
        """Round 1 with ``release-init``: each tenant's item release (charged at its share of ε),
        summed; the global MLP's prior and frozen item table are post-processed from the sum."""
        n_items, rho = self.catalog.n_items, self.cfg.release_init_pop
        conf = {"phase": ITEM_RELEASE_PHASE, "pop-share": rho}
        halted, shares = "", 1
        if self.release_secure is not None:  # SecAgg+: each tenant adds its share of the noise
            want = init_shapes(n_items, rho)
            total, sigmas, users, halted = self.collect_secure_releases(rd, conf, want)
            shares = self.release_shares
        else:
            total, sigmas, users = self.collect_releases(
                rd, conf, lambda rel, n, cap: init_problem(rel, n_items, n, cap, rho)
            )
        if len(rd.contributors) < max(1, self.cfg.min_tenants):
            rd.row["aggregated"] = 0
            raise FedrecError(
                f"the initialising item release got {len(rd.contributors)} usable release(s) "
                f"(min-tenants {self.cfg.min_tenants}){': ' + halted if halted else ''}; a release is "
                "never repeated (each is charged once), so this run stops here — see rounds.jsonl"
            )
        sigma_sum = sum_noise(sigmas, shares) if self.cfg.dp else 0.0
        t0 = time.perf_counter()
        tables = init_tables_from_release(
            total,
            n_items=self.catalog.n_items,
            users=users,
            sigma_sum=sigma_sum,
            dim=self.mcfg.dim,
            pop_share=self.cfg.release_init_pop,
            source=self.cfg.release_init_items,
            genres=self.catalog.genres,
            text=self.item_text,
        )
        model = self.model
        assert isinstance(model, HistoryMLP)
        _load(model, self.global_w)
        model.set_item_embeddings(tables.emb)
        model.set_prior(tables.prior)
        if tables.candidate is not None:
            model.set_candidate_delta(tables.candidate)
        facts = dict(tables.facts)
        if model.cfg.item_rows:
            model.set_row_selection(row_selection(tables.prior, model.cfg.item_rows))
            facts["trained_rows"] = model.cfg.item_rows
        self.global_w = state_weights(model)
        rd.row["aggregated"] = len(rd.contributors)
        rd.row["release_init"] = {
            "share": self.cfg.release_init,
            "pop_share": self.cfg.release_init_pop,
            "users": users,
            "sum_noise_multiplier": round(sigma_sum, 6),
            "noise_shares": shares,
            **facts,
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }
        for t in rd.contributors:
            self.status[t].rounds_trained += 1

    def secure_release_round(self, rd: _Round) -> None:
        """SecAgg+: each tenant adds its share of the noise and masks its release; the server unmasks
        only the sum (the mean times the contributors' count: every release has weight 1)."""
        assert self.choice is not None
        stage, selection = self.release_stage(rd)
        want = release_shapes(
            self.choice.approach, stage, self.catalog.n_items, 0 if selection is None else len(selection)
        )
        total, sigmas, users, halted = self.collect_secure_releases(
            rd, self.release_config(stage, selection), want
        )
        if halted:
            self.fit_from_release(rd, {}, [], 0, shares=self.release_shares, why=halted)
            return
        self.fit_from_release(
            rd, total, sigmas, users, shares=self.release_shares, stage=stage, selection=selection
        )

    def collect_secure_releases(
        self, rd: _Round, conf: Mapping[str, Any], want: Mapping[str, tuple[int, ...]]
    ) -> tuple[dict[str, np.ndarray], list[float], int, str]:
        """The SecAgg+ counterpart of :meth:`collect_releases`: each tenant masks its release of the
        arrays ``want`` (its noise share added by the tenant itself; weight 1) and the server unmasks
        only their sum. Returns (the summed release in float64, the contributors' noise multipliers,
        their (noisy) user count, why SecAgg+ halted or "")."""
        assert self.release_secure is not None
        zeros = {key: np.zeros(shape, dtype=np.float32) for key, shape in want.items()}
        res = self.release_secure.run_round(
            rd.rnd,
            zeros,
            list(want),
            lambda nid: {
                **conf,
                "model-config": "{}",
                "ledger-head": self.head_for(nid),
                **self.approach_conf(),
            },
        )
        rd.row["secagg"] = {**self.release_secure.describe(), "reported": len(res.reports)}
        sigmas: list[float] = []
        users = 0
        for nid, rep in sorted(res.reports.items()):
            tenant, info = rd.report(nid, rep, rep)
            if info["status"] == "rejected":
                info["reason"] = info.pop("message", "")
                info["aggregated"] = False
            elif info["status"] == "ok" and as_int(rep["num-examples"]) > 0:
                info["aggregated"] = not res.halted
                rd.contributors.append(tenant)
                sigmas.append(as_float(rep["noise-multiplier"]))
                users += as_int(rep["users"])
        for failed_node, reason in res.failures:
            rd.failure(failed_node, reason)
        if res.halted or res.mean_delta is None:
            rd.contributors.clear()
            return {}, [], 0, res.halted or "SecAgg+ returned no sum"
        total = {k: res.mean_delta[k].astype(np.float64) * len(rd.contributors) for k in want}
        return total, sigmas, users, ""

    def fit_from_release(
        self,
        rd: _Round,
        total: dict[str, np.ndarray],
        sigmas: list[float],
        users: int,
        *,
        shares: int,
        why: str = "",
        stage: int = 0,
        selection: np.ndarray | None = None,
    ) -> None:
        """Fit the run's model from the summed release, or fail clearly when nothing was released."""
        assert self.choice is not None
        if not rd.contributors or len(rd.contributors) < max(1, self.cfg.min_tenants):
            rd.row["aggregated"] = 0
            raise FedrecError(
                f"the item release got {len(rd.contributors)} usable release(s) "
                f"(min-tenants {self.cfg.min_tenants}){': ' + why if why else ''}; a release is never "
                "repeated (each is charged once), so this run has no model — see rounds.jsonl"
            )
        # Noise of the sum: every contributor's share of σ_t (shares = 1 with local noise).
        sigma_sum = sum_noise(sigmas, shares) if self.cfg.dp else 0.0
        prior = None
        if stage == 2 and isinstance(self.model, ItemReleaseModel):
            prior = self.model.prior.numpy().astype(np.float64)  # the stage-1 DP popularity, for the rest
        select, select_why, head = 0, "", 0
        if stage == 1:
            cap = min(self.cfg.gram_limit, self.catalog.n_items)
            if self.cfg.select_rule > 0:
                select, select_why = two_stage_size(
                    total["popularity"], sigma_sum, self.cfg.select_share, cap, self.cfg.select_rule
                )
                covered, tier_why = tier_size(select, self.cfg.tier, cap)
                if covered > select:
                    head, select, select_why = select, covered, f"{select_why}; {tier_why}"
            else:
                select, select_why = cap, f"M = {cap}: the gram-limit, set explicitly (--gram-limit)"
        elif stage == 2 and isinstance(self.model, ItemReleaseModel):
            head = self.model.cfg.head  # the stage-1 model's: DP-EASE fits these, the rest are a tier
        t0 = time.perf_counter()
        model = fit_release(
            total,
            self.choice.approach,
            n_items=self.catalog.n_items,
            users=users,
            sigma_sum=sigma_sum,
            dp=self.cfg.dp,
            stage=stage,
            selection=selection,
            prior=prior,
            select=select,
            head=head,
        )
        self.set_item_model(model)
        rd.row["aggregated"] = len(rd.contributors)
        rd.row["release"] = {
            "approach": self.choice.approach,
            "model": model.cfg.to_json(),
            "users": users,
            "sum_noise_multiplier": round(sigma_sum, 6),
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }
        if stage:
            rd.row["release"]["stage"] = stage
        if selection is not None:
            rd.row["release"]["selected_items"] = len(selection)
        if select_why:
            rd.row["release"]["select"] = {"items": select, "head": head or select, "why": select_why}
        for t in rd.contributors:
            self.status[t].rounds_trained += 1

    def apply(self, rd: _Round, delta: Weights) -> None:
        """Add the server optimizer's step for the aggregated ``delta`` (fedavg, η = 1: the delta)."""
        step = self.server_opt.step({k: delta[k] for k in self.param_keys})
        for k in self.param_keys:
            self.global_w[k] = (self.global_w[k] + step[k]).astype(np.float32)
        fold_item_rows(self.global_w)  # the trained sparse rows into the item table (same model)
        rd.row["aggregated"] = len(rd.contributors)
        for t in rd.contributors:
            self.status[t].rounds_trained += 1
            if self.status[t].status != "capped":
                self.status[t].status = "ok"

    def unchanged(self, rd: _Round, why: str) -> None:
        rd.row["aggregated"] = 0
        rd.row["unchanged"] = why
        for info in rd.row["tenants"].values():
            if info.get("aggregated"):
                info["aggregated"] = False
        rd.contributors.clear()
        self.log(f"round {rd.rnd}: {why}; the global model is unchanged")


def run_federation(grid: Grid, cfg: RunConfig, *, log: Log = print) -> dict[str, Any]:
    """Run all rounds and write RUN_DIR (``cfg.run_dir``). Returns the final metrics.

    With ``cfg.resume`` the run continues after the last checkpointed round of ``cfg.run_dir``.
    """
    if not cfg.run_dir:
        raise FedrecError("run-config run-dir is required (where the server writes the run's files)")
    t0 = time.perf_counter()
    out = Path(cfg.run_dir)
    (out / "ledger").mkdir(parents=True, exist_ok=True)
    fed = _Federation(grid, cfg, out, log)
    expected = cfg.num_tenants or len(fed.tenants) or 1
    nodes = wait_for_nodes(grid, expected, cfg.node_wait_timeout)
    threshold = shares_and_threshold(len(nodes))[1] if cfg.secagg and len(nodes) >= 2 else None
    shares = shares_for(cfg, threshold)
    choice = read_choice(out) if cfg.resume else None  # a resumed run keeps the approach it started with
    if choice is None:
        users_by_tenant = fed.max_users
        if cfg.dp and (cfg.approach == "auto" or cfg.head_open()):
            # ask the tenants for ñ (never the manifests' exact counts); every DP run charges it anyway
            users_by_tenant = query_users(grid, nodes, cfg.round_timeout)
        choice = resolve_approach(
            cfg,
            users_by_tenant,
            fed.catalog.n_items,
            shares=shares,
            item_features=bool(fed.catalog.genre_names),
        )
        write_choice(out, choice)
    if choice.approach == "mlp" and (cfg.approach == "auto" or choice.head):
        # the run config with approach mlp, its auto settings resolved again (the DP head under DP, or the
        # head the choice names): what every tenant resolves too when the messages name mlp and the head
        # (fedrec.client.task.tenant_config)
        cfg = cfg.with_approach("mlp", choice.head)
        fed = _Federation(grid, cfg, out, log)
    fed.nodes, fed.release_shares, fed.choice = nodes, shares, choice
    done = fed.restore() if cfg.resume else 0
    releasing = fed.choice.approach in RELEASE_APPROACHES
    initing = cfg.release_init > 0 and not releasing  # round 1 is the release that initialises the MLP
    n_rounds = release_rounds(fed.choice.approach) if releasing else cfg.planned_rounds()
    if cfg.secagg:
        max_weight = cfg.secagg_max_weight or float(max(fed.max_users.values(), default=0))  # + slack (DP)
        if max_weight <= 0:
            raise FedrecError("secagg needs secagg-max-weight (the largest tenant's user count)")
        if releasing:
            # Weight 1 per release; every entry of a tenant's release is ≤ its user count (+ noise), so
            # ±(users + 64 noise-std margin) holds it; the tenant clips after adding noise.
            fed.release_secure = SecureAggregator(
                grid,
                fed.nodes,
                clipping_range=max_weight + 64.0,
                max_weight=1.0,
                timeout=cfg.round_timeout,
                num_rounds=n_rounds,
            )
        else:
            fed.secure = SecureAggregator(
                grid,
                fed.nodes,
                clipping_range=cfg.max_update_norm,
                max_weight=max_weight,
                timeout=cfg.round_timeout,
                num_rounds=cfg.num_server_rounds,
            )
            if initing:  # round 1's initialising release, masked like a release approach's
                fed.release_secure = SecureAggregator(
                    grid,
                    fed.nodes,
                    clipping_range=max_weight + 64.0,
                    max_weight=1.0,
                    timeout=cfg.round_timeout,
                    num_rounds=1,
                )
    log(
        f"{len(fed.nodes)} tenant node(s) connected; approach {fed.choice.approach} ({fed.choice.reason}); "
        f"{n_rounds} round(s), dp={'on' if cfg.dp else 'off'}, secagg={'on' if cfg.secagg else 'off'}"
        + (f", noise {fed.choice.noise_mode}" if releasing else f", aggregation={cfg.aggregation}")
        + (f"; resuming after round {done}" if cfg.resume else "")
    )
    rounds_path = out / "rounds.jsonl"
    for rnd in range(done + 1, n_rounds + 1):
        r0 = time.perf_counter()
        missing = wait_for_rejoin(grid, fed.nodes, cfg.rejoin_wait) if cfg.rejoin_wait > 0 else []
        rd = _Round(fed, rnd)
        if cfg.rejoin_wait > 0:
            rd.row["waited_for_rejoin"] = round(time.perf_counter() - r0, 1)
            if missing:
                rd.row["not_connected"] = missing
        if cfg.resume and rnd == done + 1:
            rd.row["resumed_from"] = done
        faults = cfg.planned_faults(fed.tenants, rnd)
        if faults:
            rd.row["faults"] = faults
        if releasing:
            fed.secure_release_round(rd) if fed.release_secure is not None else fed.release_round(rd)
        elif initing and rnd == 1:
            fed.release_init_round(rd)
        elif fed.secure is not None:
            fed.secure_round(rd)
        else:
            fed.plain_round(rd)
        row = rd.row
        if not cfg.eval_exact():
            row["val"] = {}
            row["val_withheld"] = (
                "eval-privacy dp: only the final test sums leave the tenants (noised, charged)"
            )
        elif rnd % max(1, cfg.eval_every) == 0 or rnd == n_rounds:
            val, errs = federated_eval(
                grid,
                fed.nodes,
                fed.eval_weights(),
                fed.model_json,
                "val",
                cfg.round_timeout,
                f"val-{rnd}",
                **fed.ledger_sync(),
            )
            row["val"] = val.get("full", {})
            row["failures"] += [{"reason": e, "phase": "val"} for e in errs]
            if not releasing and fed.note_validation(rnd, row["val"]):
                row["best_so_far"] = True
        row["seconds"] = round(time.perf_counter() - r0, 3)
        with open(rounds_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fed.checkpoint(rnd)
        eps_now = [t.epsilon for t in fed.status.values() if t.epsilon is not None]
        capped = sum(1 for t in fed.status.values() if t.status == "capped")
        rejected = sum(1 for i in row["tenants"].values() if i["status"] == "rejected")
        val_hr = row.get("val", {}).get("hr@10")
        log(
            f"round {rnd}/{n_rounds}: "
            + (f"val HR@10 {val_hr:.4f}  " if val_hr is not None else "")
            + (f"max ε {max(eps_now):.3f}  " if eps_now else "")
            + f"aggregated {row['aggregated']}  rejected {rejected}  capped {capped}  "
            + f"failures {len(row['failures'])}  ({row['seconds']:.1f} s)"
        )
        picked = row.get("release", {}).get("select")
        if picked:
            log(f"dp_two_stage: picked {picked['why']}")

    final: dict[str, Any] = {"rule": "last", "round": n_rounds}
    if not releasing and cfg.final_model == "best-val" and fed.best is not None:
        best_round, best_ndcg, best_w = fed.best
        fed.global_w = {k: v.copy() for k, v in best_w.items()}
        final = {"rule": "best-val", "round": best_round, "val_ndcg@10": round(best_ndcg, 6)}
        log(f"final model: round {best_round} (best validation NDCG@10 {best_ndcg:.4f})")
    test, errs = fed.test_eval(n_rounds + 1)
    if not test:
        raise FedrecError("final test evaluation got no result from any tenant: " + "; ".join(errs[:3]))
    for err in errs:
        log(f"test evaluation: {err}")
    metrics: dict[str, Any] = dict(test)
    metrics["evaluation"] = evaluation_label(cfg)
    metrics["approach"] = fed.choice.to_json()
    metrics["final_model"] = final
    metrics["dataset"] = {
        "source": "federation",
        "users": sum(t.users for t in fed.status.values()),  # Σ ñ with DP
        "users_noisy": cfg.dp,
        "items": fed.catalog.n_items,
    }
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / "metrics.json", metrics)
    report = privacy_report(cfg, fed.status, fed.choice, n_rounds)
    if fed.secure is not None:
        report["secagg"] = fed.secure.describe()
        if fed.release_secure is not None:  # release-init: round 1's release had its own clipping
            report["secagg"]["release_init"] = fed.release_secure.describe()
    elif fed.release_secure is not None:
        report["secagg"] = fed.release_secure.describe()
    write_json_atomic(out / "privacy.json", report)
    write_json_atomic(out / "config.json", {"command": "simulate", "run_config": cfg.resolved_mapping()})
    _load(fed.model, fed.global_w)
    save_model(
        out,
        fed.model,
        fed.catalog,
        _sampling(cfg),
        run_id=cfg.run_name,
        extra={"run_config": cfg.resolved_mapping()},
    )
    from fedrec.server.plots import plot_run

    plot_run(out)
    return metrics


CHOICE_FILE = "approach.json"


def write_choice(out: Path, choice: ApproachChoice) -> None:
    """The approach picked at round 0 (``checkpoint/approach.json``), before any tenant is charged for it."""
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "checkpoint" / CHOICE_FILE, choice.to_json())


def read_choice(out: Path) -> ApproachChoice | None:
    """The approach an interrupted run picked, or None (it had not picked one yet)."""
    path = out / "checkpoint" / CHOICE_FILE
    if not path.is_file():
        return None
    return ApproachChoice.from_json(json.loads(path.read_text(encoding="utf-8")))


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def privacy_report(
    cfg: RunConfig, status: dict[str, TenantStatus], choice: ApproachChoice | None = None, rounds: int = 0
) -> dict[str, Any]:
    releasing = choice is not None and choice.approach in RELEASE_APPROACHES
    if not cfg.dp:
        noise = "none"
    elif releasing and choice is not None and choice.noise_mode == "distributed":
        noise = (
            "distributed: one Gaussian item release per tenant, each adding its share of the noise "
            "under SecAgg+; the unmasked sum carries the full σ while at least the threshold of tenants "
            "is in it and none colludes with the server (else a tenant's own share still protects its "
            "users: epsilon_if_alone in its ledger)"
        )
    elif releasing:
        noise = "local: one Gaussian item release per tenant (sensitivity 1 per user), summed by the server"
    elif cfg.dp_mode == "cohort" and cfg.secagg:
        noise = (
            "distributed (dp-mode cohort): each round each tenant sends one clipped gradient sum of its "
            "Poisson cohort with noise σ·C/√shares, shares = the SecAgg+ threshold its own protocol runs; "
            "the unmasked sum carries noise σ·C while at least the threshold of tenants is in it and none "
            "colludes with the server (else epsilon_if_alone in its ledger)"
        )
    elif cfg.dp_mode == "cohort":
        noise = (
            "local (dp-mode cohort): each round each tenant sends one clipped gradient sum of its Poisson "
            "cohort with its own noise σ·C; the server applies its optimizer to Σ sums / Σ expected cohorts"
        )
    else:
        noise = "local: each tenant's DP-SGD adds its own Gaussian noise"
    return {
        "unit": "user",
        "adjacency": RELATION if cfg.dp else None,
        "adjacency_text": RELATION_TEXT if cfg.dp else None,
        "user_counts": (
            f"noisy: Gaussian σ_c = {COUNT_SIGMA:g}, charged once per tenant at round 0"
            if cfg.dp
            else "exact"
        ),
        "evaluation": evaluation_label(cfg),
        "transcript": "docs/TRANSCRIPT.md (fedrec.privacy.transcript): every field a tenant sends",
        "accountant": cfg.accountant if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None,
        "dp": cfg.dp,
        "rounds": rounds or cfg.num_server_rounds,
        "approach": choice.to_json() if choice is not None else {"name": cfg.approach},
        **({"dp_mode": cfg.dp_mode, "cohort_rate": cfg.cohort_rate} if cfg.dp and not releasing else {}),
        **(
            {
                "release_init": {
                    "share_of_epsilon": cfg.release_init,
                    "round": 1,
                    "what": "one item release per tenant (popularity + Gram, or popularity only) calibrated "
                    "alone to this share of the cap; the MLP's prior and frozen item embeddings are "
                    "post-processing of its sum (or public genre vectors); the DP-SGD rounds are "
                    "calibrated to the rest (one accountant history)",
                    "pop_share": cfg.release_init_pop,
                    "item_table": cfg.release_init_items,
                    "dot_mix": cfg.dot_mix if cfg.dot_mix >= 0 else None,
                    "dp_train": list(cfg.train_modules()) or "all but the item table",
                }
            }
            if cfg.release_init > 0 and not releasing
            else {}
        ),
        "noise": noise,
        "poisson": True,
        "secure_mode": False,
        "tenants": {
            t: {
                "epsilon": s.epsilon,
                "cap": s.cap,
                "rounds_trained": s.rounds_trained,
                "users": s.users,
                "status": s.status,
                "ledger_head": s.ledger_head,
            }
            for t, s in sorted(status.items())
        },
    }


def evaluation_label(cfg: RunConfig) -> str:
    """How the evaluation sums left the tenants, in one line (metrics.json, privacy.json, reports)."""
    if not cfg.dp:
        return "exact (no DP run)"
    if cfg.eval_privacy == "exact":
        return "exact: NOT covered by ε (simulation research; validation every round and test)"
    return (
        f"dp: final test sums only, Gaussian σ_e = {EVAL_SIGMA:g} × √d, charged in the ledger "
        "(covered by ε); no per-round validation"
    )


def _sampling(cfg: RunConfig) -> SamplingConfig:
    return SamplingConfig(max_history=cfg.max_history, targets=cfg.targets, negatives=cfg.negatives)


def _load(model: Ranker, weights: Weights) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})


def _checkpoint(
    out: Path, model: Ranker, weights: Weights, catalog: Catalog, cfg: RunConfig, rnd: int
) -> None:
    """Global model after round ``rnd``, written atomically (a crash loses at most one round)."""
    _load(model, weights)
    ck = out / "checkpoint"
    save_model(ck, model, catalog, _sampling(cfg), run_id=cfg.run_name, extra={"round": rnd})
    write_json_atomic(ck / "round.json", {"round": rnd})

"""One federated round under SecAgg+: the server learns the weighted mean of the tenants' deltas only.

Flower 1.42 runs SecAgg+ only through its legacy path (``SecAggPlusWorkflow`` needs a
``LegacyContext`` and a legacy ``Strategy``). We drive that workflow one round at a time from our own
round loop (``fedrec.server.loop``), so checkpoints, ledgers, evaluation and resume stay in one place:

* the legacy strategy below only builds each node's fit instructions (global weights, round, the
  ledger head the server holds for that tenant) and captures what ``aggregate_fit`` is handed —
  the unmasked *sum* (already divided by the summed weights) and each tenant's clear-text status;
* shares and threshold come from the number of tenants: every tenant shares with every other
  (``num_shares`` = T) and ``threshold`` = ⌊T/2⌋ + 1 — a strict majority, so the server can never
  hold both a live tenant's mask seed and its key shares; up to T − threshold tenants may drop out
  of a round after the key exchange and the sum of the others is still recovered;
* ``clipping_range`` = ``max-update-norm``: a delta that passes the tenant's own L2 check has every
  coordinate inside ±range, so quantization never clamps silently (the tenant refuses otherwise);
  ``max_weight`` = the largest tenant's user count; the timeout is ``round-timeout`` per stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SaKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedrec.server.grids import ForwardingGrid
from fedrec.shared_model.codec import Weights

QUANTIZATION_RANGE = 2**22  # Flower's default; the sum of T tenants must stay below 2**32 (T < 1024)


def shares_and_threshold(tenants: int) -> tuple[int, int]:
    """(num_shares, threshold) for ``tenants`` tenants: all-to-all sharing, strict-majority threshold."""
    if tenants < 2:
        raise ValueError(f"SecAgg+ needs at least 2 tenants, got {tenants}")
    return tenants, tenants // 2 + 1


def quantization_step(clipping_range: float) -> float:
    """The width of one quantization level for one tenant's (weighted) delta."""
    return 2 * clipping_range / QUANTIZATION_RANGE


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server."""

    mean_delta: Weights | None  # Σ w_t·Δ_t / Σ w_t, or None when the protocol halted / no weight
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # node → clear-text status
    failures: list[tuple[int, str]] = field(default_factory=list)  # (node, stage: reason)
    halted: str = ""


class _CaptureStrategy(LegacyFedAvg):
    """A legacy strategy that configures each node and captures the (already unmasked) aggregate."""

    def __init__(self, config_for: Callable[[int], dict[str, Scalar]]) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, accept_failures=True)
        self.config_for = config_for
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[BaseException | tuple[ClientProxy, FitRes]] = []
        self.aggregate: Parameters | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        clients = sorted(client_manager.all().values(), key=lambda c: int(c.node_id))
        return [(c, FitIns(parameters, self.config_for(int(c.node_id)))) for c in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAggPlusWorkflow sets every result's parameters to the unmasked aggregate.
        self.results, self.failures = results, list(failures)
        self.aggregate = results[0][1].parameters if results else None
        return None, {}


class _WatchedGrid(ForwardingGrid):
    """The run's grid, noting which node failed which SecAgg+ stage (and why) for rounds.jsonl."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.errors: list[tuple[int, str]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        stage = ""
        if sent and RECORD_KEY_CONFIGS in sent[0].content.config_records:
            stage = str(sent[0].content.config_records[RECORD_KEY_CONFIGS].get(SaKey.STAGE, ""))
        replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        answered = {reply_node(r, sent) for r in replies}
        for r in replies:
            if r.has_error():
                self.errors.append((reply_node(r, sent), f"SecAgg+ {stage}: {_reason(r.error.reason)}"))
        for m in sent:
            if m.metadata.dst_node_id not in answered:
                self.errors.append((m.metadata.dst_node_id, f"SecAgg+ {stage}: no reply within {timeout} s"))
        return replies


def reply_node(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for. An error the SuperLink makes itself (e.g. "Node Unavailable": no
    heartbeat) comes from the SuperLink's own id (1), so the node is the one the message was sent to."""
    for m in sent:
        if m.metadata.message_id and m.metadata.message_id == reply.metadata.reply_to_message_id:
            return int(m.metadata.dst_node_id)
    return int(reply.metadata.src_node_id)


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with one fix for nodes lost *before* their key shares went out.

    Flower keeps a node that failed the setup or share-keys stage in ``sampled_node_ids`` and then
    names it a dropout in the unmask stage; the survivors hold no share of its key (it never sent
    them), so every survivor's ClientApp fails with ``KeyError`` and the round is lost although the
    threshold still answers (seen with a SuperNode SIGSTOPped during setup, tests/test_deploy_faults.py).
    After share keys only the nodes whose shares were forwarded can be dropouts, and only they were
    masked against: the sampled set and every neighbourhood shrink to them.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = bool(super().share_keys_stage(grid, context, state))
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {
            nid: nb & kept for nid, nb in state.nid_to_neighbours.items() if nid in kept
        }
        return ok


class SecureAggregator:
    """Runs SecAgg+ rounds over ``nodes`` of ``grid``; one instance per run."""

    def __init__(
        self,
        grid: Grid,
        nodes: list[int],
        *,
        clipping_range: float,
        max_weight: float,
        timeout: float,
        num_rounds: int,
    ) -> None:
        self.grid = grid
        self.nodes = list(nodes)
        self.num_shares, self.threshold = shares_and_threshold(len(nodes))
        self.clipping_range = clipping_range
        self.max_weight = max_weight
        self.timeout = timeout
        self.num_rounds = num_rounds
        self.workflow = _Workflow(
            # An int ≤ 2 is rejected by Flower; 1.0 means "every sampled node", the same thing.
            num_shares=self.num_shares if self.num_shares > 2 else 1.0,
            reconstruction_threshold=self.threshold,
            clipping_range=clipping_range,
            quantization_range=QUANTIZATION_RANGE,
            max_weight=max_weight,
            timeout=timeout,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "num_shares": self.num_shares,
            "threshold": self.threshold,
            "tolerated_dropouts": self.num_shares - self.threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": QUANTIZATION_RANGE,
            "max_weight": self.max_weight,
            "timeout_s": self.timeout,
        }

    def run_round(
        self,
        rnd: int,
        global_w: Weights,
        param_keys: list[str],
        node_config: Callable[[int], dict[str, Scalar]],
    ) -> SecureRound:
        """One round: tenants train on ``global_w`` and SecAgg+ returns the weighted mean delta."""
        keys = list(global_w)

        def config_for(nid: int) -> dict[str, Scalar]:
            return {
                **node_config(nid),
                "round": rnd,
                "keys": json.dumps(keys),
                "param-keys": json.dumps(param_keys),
            }

        strategy = _CaptureStrategy(config_for)
        grid = _WatchedGrid(self.grid)
        manager = SimpleClientManager()
        for nid in self.nodes:
            manager.register(GridClientProxy(node_id=nid, grid=grid, run_id=grid.run.run_id))
        legacy = LegacyContext(
            context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=self.num_rounds),
            strategy=strategy,
            client_manager=manager,
        )
        params = ndarrays_to_parameters([np.ascontiguousarray(global_w[k]) for k in keys])
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
        from flwr.app import ConfigRecord

        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
        # Every tenant with weight 0 (capped, refused) makes Flower divide by 0: an inf we then refuse.
        with np.errstate(divide="ignore", invalid="ignore"):
            self.workflow(grid, legacy)

        out = SecureRound(mean_delta=None, failures=list(grid.errors))
        for proxy, res in strategy.results:
            out.reports[int(proxy.node_id)] = {**res.metrics, "num-examples": res.num_examples}
        if strategy.aggregate is None:
            out.halted = (
                f"SecAgg+ halted: fewer than {self.threshold} of {len(self.nodes)} tenants "
                f"completed a stage within {self.timeout:g} s (threshold {self.threshold})"
            )
            return out
        arrays = parameters_to_ndarrays(strategy.aggregate)
        if len(arrays) != len(param_keys):
            out.halted = f"SecAgg+ sum has {len(arrays)} arrays, expected {len(param_keys)}"
            return out
        out.mean_delta = {k: np.asarray(a) for k, a in zip(param_keys, arrays, strict=True)}
        return out


def _reason(failure: object) -> str:
    text = str(failure)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:300]

"""The simulation's message extractor (fedrec.simulations.driver.flower_runner) on a real in-memory LinkState."""

from __future__ import annotations

import os
import threading
from queue import Queue
from typing import Any

from fedrec.simulations.driver.flower_runner import (
    _nodes_with_undelivered_messages,
    add_messages_to_queue,
    flower_env,
)


def _link_with_nodes(n: int) -> tuple[Any, Any, dict[int, int]]:
    """(state, grid, node → partition) as Flower's run_simulation sets them up, with ``n`` nodes."""
    flower_env()
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
    run.primary_task_id = int.from_bytes(os.urandom(7), "big")
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)  # what run_simulation uses
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = _register_nodes(n, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def test_extractor_hands_every_message_to_the_actors_exactly_once() -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    state, grid, nodes = _link_with_nodes(6)
    targets = [*nodes, *list(nodes)[:2]]  # two nodes get a second message (one per node per tick)
    msgs = [
        Message(
            content=RecordDict({"config": ConfigRecord({"i": i})}),
            message_type=MessageType.TRAIN,
            dst_node_id=nid,
            group_id="1",
        )
        for i, nid in enumerate(targets)
    ]
    sent = set(grid.push_messages(msgs))
    assert len(sent) == len(targets)
    assert sorted(_nodes_with_undelivered_messages(state, nodes) or []) == sorted(nodes)

    queue: Queue[Any] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=add_messages_to_queue, args=(state, queue, nodes, stop))
    thread.start()
    got: list[Any] = [queue.get(timeout=10) for _ in targets]
    stop.set()
    thread.join()

    assert queue.empty()
    assert {m.metadata.message_id for m in got} == sent
    assert sorted(m.metadata.dst_node_id for m in got) == sorted(targets)
    assert all(m.metadata.delivered_at != "" for m in got)
    assert _nodes_with_undelivered_messages(state, nodes) == []


def test_pending_nodes_are_unknowable_without_an_in_memory_store() -> None:
    assert _nodes_with_undelivered_messages(object(), [1, 2]) is None

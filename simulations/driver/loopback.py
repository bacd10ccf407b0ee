"""An in-process Flower ``Grid`` that delivers each message straight to the project's ClientApp.

No Ray, no SuperLink: every node is a :class:`~flwr.app.Context` with ``partition-id`` (as in the
Simulation Engine) and messages are handled one after another in this thread, mods included
(``ClientApp.__call__``). The ServerApp code (``fedrec.server.loop.run_federation``) runs unchanged on it.
What this is for: fast, deterministic tests and benchmarks of the round logic (validation, robust
aggregation, SecAgg+, ledgers, resume); the real transport is exercised by the slow tests.

``received`` keeps every reply the server got, so a test can inspect exactly what reached it;
``drop`` lets a test make a node fail a given SecAgg+ stage or round (an error reply, as Flower
reports a node whose ClientApp raised or died; a reason starting with :data:`UNAVAILABLE` comes from
the SuperLink's id, as Flower reports a SuperNode that stopped sending heartbeats).
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: decides whether node ``nid`` fails ``msg`` (return a reason) or handles it (None)
DropRule = Callable[[int, Message], str | None]
#: a drop reason starting with this is answered as the SuperLink answers for a node whose heartbeat
#: stopped (a stalled or dead SuperNode): an error reply from the SuperLink's own node id
UNAVAILABLE = "Node Unavailable"


class LoopbackGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        run_config: dict[str, Any],
        num_nodes: int,
        *,
        drop: DropRule | None = None,
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id=int.from_bytes(os.urandom(6), "big"))
        # Messages the server builds take their source from the task identity (set as Flower does).
        TaskIdentity.task_id, TaskIdentity.run_id = 1, self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        base = 1000 + int.from_bytes(os.urandom(2), "big")
        self.contexts = {
            base + i: Context(
                run_id=self._run.run_id,
                node_id=base + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self.drop = drop
        self.received: list[Message] = []

    # ---------------------------------------------------------------- Grid
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            nid = msg.metadata.dst_node_id
            reason = self.drop(nid, msg) if self.drop else None
            if reason is not None:
                err = Message(Error(code=0, reason=reason), reply_to=msg)
                if reason.startswith(UNAVAILABLE):  # made by the SuperLink itself: its own node id
                    err.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(err)
                continue
            t0 = time.perf_counter()
            try:  # a copy, as if serialized: the mods edit what they receive
                reply = self.client_app(copy.deepcopy(msg), self.contexts[nid])
            except Exception as e:  # a ClientApp that raises: Flower replies with an error
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if timeout is not None and time.perf_counter() - t0 > timeout:
                continue  # too late: the server stopped waiting
            replies.append(reply)
        self.received.extend(replies)
        return replies

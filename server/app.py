"""The Flower ServerApp: parse the run config once, hand the Grid to ``fedrec.server.loop.run_federation``."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedrec.server.grids import ForwardingGrid
from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig

app = ServerApp()

#: seconds between two pulls of the replies to a round's messages in a deployment
PULL_INTERVAL = 0.5


class PromptGrid(ForwardingGrid):
    """A deployed run's grid (Flower's ``HttpGrid``), pulling the replies every ``interval`` s.

    Flower's ``send_and_receive`` sleeps a fixed 3 s between two pulls, so every exchange of a round
    (four per SecAgg+ round, plus each evaluation) ends on average 1.5 s after its last reply arrived.
    The pulls are the same calls, only closer together; the timeout and the replies are unchanged.
    """

    def __init__(self, inner: Grid, interval: float = PULL_INTERVAL) -> None:
        super().__init__(inner)
        self.interval = interval

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all are in or ``timeout`` s have passed
        (None: no limit) — Flower's contract, polled every ``interval`` s."""
        pending = set(self.inner.push_messages(messages))
        # monotonic: a wall-clock step (NTP) must neither cut the timeout short nor stretch it
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        got: list[Message] = []
        while timeout is None or time.monotonic() < end:
            replies = list(self.inner.pull_messages(pending))
            got.extend(replies)
            pending.difference_update(r.metadata.reply_to_message_id for r in replies)
            if not pending:
                break
            time.sleep(
                self.interval if timeout is None else max(0.0, min(self.interval, end - time.monotonic()))
            )
        return got


def prompt(grid: Grid) -> Grid:
    """``grid`` wrapped in :class:`PromptGrid` when it is a deployment's (a SuperLink's ``HttpGrid``);
    a simulation's grid as it is (it already pulls often, or answers in place)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)
    run_federation(prompt(grid), cfg, log=lambda line: log(INFO, "%s", line))

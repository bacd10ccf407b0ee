"""The ClientApp a deployed SuperNode loads: ``fedrec.client.app``'s handlers behind a module that is
light to import.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message, and that process imports the
ClientApp's module before it looks at the message. ``fedrec.client.app`` imports torch and Opacus
(~4 s of CPU, 10–16 s of wall time on 2 shared cores); three of the four SecAgg+ stages of a round
(setup, share keys, unmask) are answered by Flower's ``secaggplus_mod`` without ever reaching our
handlers. This module imports only Flower at load time and imports ``fedrec.client.app`` inside a
handler, so only the messages that train or evaluate pay for torch. Same handlers, same mod, same
replies: the in-process paths (simulation, tests) keep using ``fedrec.client.app.app``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrec.client.mods import secagg_when_asked

app = ClientApp(mods=[secagg_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedrec.client import app as handlers

    return handlers.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedrec.client import app as handlers

    return handlers.evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    from fedrec.client import app as handlers

    return handlers.query(msg, context)


__all__ = ["app"]

"""The ClientApp's Flower mods, in a module that imports only Flower (``fedrec.client.entry`` loads it
in every ClientApp process, before it knows whether the message needs torch)."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ protocol messages through Flower's ``secaggplus_mod``; others pass untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


__all__ = ["secagg_when_asked"]

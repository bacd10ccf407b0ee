"""The ClientApp's Flower mods, in a module light to import (``fedrec.client.entry`` loads it in every
ClientApp process, before it knows whether the message needs torch)."""

from __future__ import annotations

import logging
import os

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedrec.privacy import transcript
from fedrec.shared_model.runconfig import RunConfig

QUIET_ENV = "FEDREC_QUIET_FLOWER"  # set by `fedrec simulate` without --verbose (ray workers inherit it)
if os.environ.get(QUIET_ENV) == "1":
    # Flower's SecAgg+ mod logs each stage of each node at DEBUG; in a simulation's Ray workers those
    # lines reach the user's terminal (80 lines a run at 5 tenants). The driver quiets its own logger the
    # same way; a deployed SuperNode (no such variable) keeps Flower's logging as configured.
    logging.getLogger("flwr").setLevel(logging.WARNING)


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ protocol messages through Flower's ``secaggplus_mod``; others pass untouched.
    Every SecAgg+ reply (keys, shares, the masked vector, unmask shares) passes the transcript
    inventory before it leaves (:func:`fedrec.privacy.transcript.check_reply`)."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        reply = secaggplus_mod(msg, context, call_next)
        cfg = RunConfig.from_mapping(context.run_config)
        transcript.check_reply(transcript.SECAGG, reply.content, exact_allowed=cfg.eval_exact())
        return reply
    return call_next(msg, context)


__all__ = ["secagg_when_asked"]

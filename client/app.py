"""The Flower ClientApp: decode the message, call a plain function in ``client.task``, encode the reply.

Reply whitelist (tests inspect it): ``arrays`` holds shared parameters only; ``metrics`` holds the
scalar keys in :data:`TRAIN_METRIC_KEYS`; ``status`` holds the tenant id, its status, a message and
the new ledger entry (budget figures only, no user data).
"""

from __future__ import annotations

import json
import math

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import resolve_tenant, tenant_evaluate, tenant_train
from shared_model.codec import arrays_of, as_int, config_of, to_record
from shared_model.model import ModelConfig
from shared_model.runconfig import RunConfig

app = ClientApp()

#: Every metric a tenant may send after training (aggregate figures, nothing per user).
TRAIN_METRIC_KEYS = (
    "num-examples",
    "users",
    "epsilon",
    "cap",
    "noise-multiplier",
    "sample-rate",
    "steps",
    "loss",
    "seconds",
)


def _model_cfg(msg: Message) -> ModelConfig:
    return ModelConfig.from_json(json.loads(str(config_of(msg.content, "config")["model-config"])))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    paths = resolve_tenant(context.node_config, cfg)
    round_ = as_int(config_of(msg.content, "config")["round"])
    out = tenant_train(arrays_of(msg.content), _model_cfg(msg), cfg, paths, round_)
    stats = out.stats
    metrics: dict[str, int | float] = {
        "num-examples": out.users if out.status == "ok" else 0,
        "users": out.users,
        "epsilon": out.epsilon if out.epsilon is not None else -1.0,
        "cap": out.cap if out.cap is not None else -1.0,
        "noise-multiplier": out.noise_multiplier,
        "sample-rate": out.sample_rate,
        "steps": out.steps,
        "loss": stats.mean_loss if stats and math.isfinite(stats.mean_loss) else -1.0,
        "seconds": stats.seconds if stats else 0.0,
    }
    content = RecordDict(
        {
            "metrics": MetricRecord(dict(metrics)),
            "status": ConfigRecord(
                {
                    "tenant": out.tenant_id,
                    "status": out.status,
                    "message": out.message,
                    "ledger-entry": json.dumps(out.ledger_entry) if out.ledger_entry else "",
                }
            ),
        }
    )
    if out.weights is not None:
        content["arrays"] = to_record(out.weights)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    paths = resolve_tenant(context.node_config, cfg)
    which = str(config_of(msg.content, "config")["which"])
    sums = tenant_evaluate(arrays_of(msg.content), _model_cfg(msg), cfg, paths, which)
    content = RecordDict(
        {"sums": MetricRecord(sums), "status": ConfigRecord({"tenant": paths.tenant_id, "status": "ok"})}
    )
    return Message(content=content, reply_to=msg)


__all__ = ["TRAIN_METRIC_KEYS", "app"]

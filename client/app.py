"""The Flower ClientApp: decode the message, call a plain function in ``fedrec.client.task``, encode the reply.

One ClientApp serves both aggregation paths (see README, Architecture):

* plain (Message API): ``train`` replies with ``arrays`` (the shared parameters), ``metrics`` and
  ``status``;
* SecAgg+ (``secagg`` in the run config): Flower's ``secaggplus_mod`` drives its four stages and, in
  the one that carries the model, calls the same ``train`` handler with a legacy ``fitins`` message;
  the handler answers in the legacy ``fitres`` format (via ``flwr.compat``) with the *delta* and its
  weight, which the mod quantizes, masks and strips before anything leaves the node. The plain-text
  part of that reply is the status and budget figures only.

Item release (``phase`` = ``item-release`` in the train config, approaches ``dp_ease``/``dp_popularity``):
the same ``train`` handler calls ``fedrec.client.task.tenant_release`` instead of training; ``arrays`` then
holds the noisy popularity vector and/or the packed noisy Gram — a DP release, charged and logged
before it is sent, exactly like a DP-SGD update.

Reply whitelist: ``fedrec.privacy.transcript`` is the inventory of every field of every reply (train,
release, evaluation, query, the SecAgg+ stages, ledger entries) with its treatment; every handler
and the SecAgg+ mod wrapper call :func:`fedrec.privacy.transcript.check_reply` before a reply leaves,
and a field that is not in it is refused (the handler raises: nothing is sent). User counts leave only
as the noisy count ñ (charged at round 0); the training loss and local time are not sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedrec.client.faults import adversary_kind, corrupt, maybe_crash, maybe_drop
from fedrec.client.mods import secagg_when_asked
from fedrec.client.task import (
    TenantPaths,
    TrainOutcome,
    ledger_since,
    load_data,
    private_eval,
    resolve_tenant,
    secure_update,
    tenant_config,
    tenant_count,
    tenant_evaluate,
    tenant_evaluate_items,
    tenant_release,
    tenant_train,
)
from fedrec.privacy import transcript
from fedrec.privacy.mechanisms import COUNT_SLACK
from fedrec.shared_model.codec import Weights, arrays_of, as_int, config_of, to_record
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.item_model import ItemModelConfig
from fedrec.shared_model.model import ModelConfig
from fedrec.shared_model.runconfig import RunConfig

#: The train-config value of ``phase`` that asks for the one-shot item release instead of training.
ITEM_RELEASE = "item-release"

#: Every metric a tenant sends after training or a release (``fedrec.privacy.transcript`` says why each).
TRAIN_METRIC_KEYS = (
    "num-examples",
    "users",
    "epsilon",
    "cap",
    "noise-multiplier",
    "sample-rate",
    "steps",
)


def _checked(kind: str, msg: Message, cfg: RunConfig) -> Message:
    """The reply, after the transcript inventory allowed every field in it (else nothing is sent)."""
    transcript.check_reply(kind, msg.content, exact_allowed=cfg.eval_exact())
    return msg


app = ClientApp(mods=[secagg_when_asked])


def _model_cfg(config: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig.from_json(json.loads(str(config["model-config"])))


def _run_round(
    weights: Weights,
    model_cfg: ModelConfig,
    cfg: RunConfig,
    paths: TenantPaths,
    context: Context,
    rnd: int,
    shares: int = 1,
) -> tuple[TrainOutcome, int]:
    """Train (faults included in simulation); returns the outcome and the weight to report (the user
    count; the expected cohort in dp-mode cohort). ``shares``: decided by the caller from what the
    tenant itself knows (:func:`tenant_shares`), never read from the server's message."""
    maybe_drop(cfg, context.node_config, paths.tenant_id, rnd)
    out = tenant_train(weights, model_cfg, cfg, paths, rnd, shares=shares)
    maybe_crash(cfg, context.node_config, paths.tenant_id, rnd)  # charged, update not yet sent
    users = (out.weight if out.weight is not None else out.users) if out.status == "ok" else 0
    kind = adversary_kind(cfg, context.node_config, paths.tenant_id)
    if kind and out.weights is not None:
        out.weights, users = corrupt(kind, out.weights, weights, users)
    return out, users


def tenant_shares(context: Context) -> int:
    """Into how many shares this tenant splits its noise under SecAgg+: the reconstruction threshold
    of the protocol this node itself runs (secaggplus_mod's state), the fewest contributions any sum
    the server can unmask holds — refused unless it is a strict majority of the shares."""
    protocol = context.state.config_records[RECORD_KEY_STATE]
    threshold = int(protocol["threshold"])  # type: ignore[arg-type]
    share_num = int(protocol["share_num"])  # type: ignore[arg-type]
    if threshold < 1 or threshold * 2 <= share_num:
        raise FedrecError(
            f"SecAgg+ threshold {threshold} of {share_num} shares is not a strict majority: "
            "refusing to split the noise on it"
        )
    return threshold


def _run_release(
    conf: Mapping[str, Any], cfg: RunConfig, paths: TenantPaths, context: Context, shares: int = 1
) -> tuple[TrainOutcome, int]:
    """The item release (simulated dropouts and crashes included, as for a training round).

    ``shares`` is decided by the tenant, never taken from the server's message: 1 in the clear (the
    server sees this release alone), the SecAgg+ reconstruction threshold under SecAgg+ (the fewest
    releases any sum the server can unmask holds).
    """
    rnd = as_int(conf["round"])
    maybe_drop(cfg, context.node_config, paths.tenant_id, rnd)
    stage = as_int(conf.get("stage", 0))
    selection = np.asarray(json.loads(str(conf["items"])), dtype=np.int64) if stage == 2 else None
    # The share of ε this release may spend comes from the tenant's own run config, never the message.
    share = cfg.release_init if cfg.approach == "mlp" and cfg.release_init > 0 else 1.0
    out = tenant_release(
        cfg,
        paths,
        rnd,
        pop_share=float(conf["pop-share"]),
        shares=shares,
        stage=stage,
        selection=selection,
        epsilon_share=share,
    )
    maybe_crash(cfg, context.node_config, paths.tenant_id, rnd)  # charged, release not yet sent
    return out, (out.users if out.status == "ok" else 0)


def _figures(out: TrainOutcome, users: int) -> dict[str, int | float]:
    """``users`` / ``out.users`` are the noisy count ñ with DP (``fedrec.client.task.tenant_count``)."""
    return {
        "num-examples": users,
        "users": out.users,
        "epsilon": out.epsilon if out.epsilon is not None else -1.0,
        "cap": out.cap if out.cap is not None else -1.0,
        "noise-multiplier": out.noise_multiplier,
        "sample-rate": out.sample_rate,
        "steps": out.steps,
    }


def _status(out: TrainOutcome, paths: TenantPaths, head: str, message: str = "") -> dict[str, Any]:
    return {
        "tenant": out.tenant_id,
        "status": out.status,
        "message": message or out.message,
        "ledger-entries": json.dumps(ledger_since(paths, head)),
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return _train_masked(msg, context, cfg)  # reached only through secaggplus_mod, which masks it
    if cfg.secagg:
        raise FedrecError("this run uses SecAgg+: refusing to send an unmasked update")
    conf = config_of(msg.content, "config")
    cfg = tenant_config(cfg, conf)  # approach auto: the approach the server resolved (its name only)
    paths = resolve_tenant(context.node_config, cfg)
    if str(conf.get("phase", "")) == ITEM_RELEASE:
        out, users = _run_release(conf, cfg, paths, context)
    else:
        weights = arrays_of(msg.content)
        out, users = _run_round(weights, _model_cfg(conf), cfg, paths, context, as_int(conf["round"]))
    content = RecordDict(
        {
            "metrics": MetricRecord(dict(_figures(out, users))),
            "status": ConfigRecord(_status(out, paths, str(conf.get("ledger-head", "")))),
        }
    )
    if out.weights is not None:
        content["arrays"] = to_record(out.weights)
    return _checked(transcript.TRAIN, Message(content=content, reply_to=msg), cfg)


def _train_masked(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """The SecAgg+ 'collect masked vectors' stage: reply in the legacy FitRes format for the mod."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = fitins.config
    cfg = tenant_config(cfg, conf)  # approach auto: the approach the server resolved (its name only)
    keys = json.loads(str(conf["keys"]))
    weights = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    param_keys = json.loads(str(conf["param-keys"]))
    paths = resolve_tenant(context.node_config, cfg)
    protocol = context.state.config_records[RECORD_KEY_STATE]
    if str(conf.get("phase", "")) == ITEM_RELEASE:
        shapes = {k: weights[k].shape for k in param_keys}
        clip = float(protocol["clipping_range"])  # type: ignore[arg-type]
        return _release_masked(msg, conf, cfg, paths, context, shapes, clip)
    # dp-mode cohort: the noise is split over the threshold; the local-steps rounds never split it
    shares = tenant_shares(context) if cfg.dp and cfg.dp_mode == "cohort" else 1
    out, users = _run_round(weights, _model_cfg(conf), cfg, paths, context, int(conf["round"]), shares)
    upd = secure_update(
        out.weights,
        {k: weights[k] for k in param_keys},
        users=users,
        # users is ñ with DP: the tenant's own bound allows the count noise (6 σ_c) above n
        max_users=load_data(paths).split.n_users + (COUNT_SLACK if cfg.dp else 0),
        max_norm=cfg.max_update_norm,
        clipping_range=float(protocol["clipping_range"]),  # type: ignore[arg-type]
        max_weight=float(protocol["max_weight"]),  # type: ignore[arg-type]
    )
    status = _status(out, paths, str(conf["ledger-head"]))
    if upd.problem:
        status["status"], status["message"] = "rejected", upd.problem
    metrics: dict[str, Any] = {**_figures(out, upd.weight), **status}
    delta = [np.ascontiguousarray(upd.delta[k]) for k in param_keys]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), upd.weight, metrics)
    reply = Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    return _checked(transcript.MASKED, reply, cfg)


def _release_masked(
    msg: Message,
    conf: Mapping[str, Any],
    cfg: RunConfig,
    paths: TenantPaths,
    context: Context,
    shapes: Mapping[str, tuple[int, ...]],
    clipping_range: float,
) -> Message:
    """The item release under SecAgg+: this tenant's noise share, masked by ``secaggplus_mod``.

    The release is clipped to ±``clipping_range`` AFTER its noise is added (post-processing: no
    privacy cost, and the mod then never clamps silently); weight 1, so the server unmasks the mean
    of the contributors' releases and multiplies it back by their count.
    """
    out, _users = _run_release(conf, cfg, paths, context, shares=tenant_shares(context))
    status = _status(out, paths, str(conf["ledger-head"]))
    rel = out.weights if out.status == "ok" else None
    ok = rel is not None and {k: v.shape for k, v in rel.items()} == dict(shapes)
    if out.status == "ok" and not ok:
        status["status"], status["message"] = "rejected", "the release does not match the server's request"
    if rel is not None and ok:
        delta = [np.clip(rel[k], -clipping_range, clipping_range).astype(np.float32) for k in shapes]
    else:  # zeros, weight 0: adds nothing to the sum
        delta = [np.zeros(shape, dtype=np.float32) for shape in shapes.values()]
    weight = 1 if ok else 0
    metrics: dict[str, Any] = {**_figures(out, weight), **status}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), weight, metrics)
    reply = Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    return _checked(transcript.MASKED, reply, cfg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Ranking sums of the global model: exact (eval-privacy exact / no DP, NOT covered by ε), or under
    eval-privacy dp the final test sums only, Gaussian-noised and charged (``private_eval``)."""
    cfg = RunConfig.from_mapping(context.run_config)
    paths = resolve_tenant(context.node_config, cfg)
    conf = config_of(msg.content, "config")
    which = str(conf["which"])
    if not cfg.eval_exact() and which != "test":
        raise FedrecError(
            f"eval-privacy dp: only the final test evaluation is released (asked for {which!r})"
        )
    model_json = json.loads(str(conf["model-config"]))
    weights = arrays_of(msg.content)
    if "kind" in model_json:  # a model fitted from the item release
        genres = weights.pop("genres")
        item_cfg = ItemModelConfig.from_json(model_json)
        sums = tenant_evaluate_items(weights, item_cfg, genres, cfg, paths, which)
    else:
        sums = tenant_evaluate(weights, ModelConfig.from_json(model_json), cfg, paths, which)
    status: dict[str, Any] = {"tenant": paths.tenant_id, "status": "ok", "message": ""}
    if not cfg.eval_exact():
        digest = hashlib.sha256()
        for key in sorted(weights):
            digest.update(key.encode() + np.ascontiguousarray(weights[key]).tobytes())
        status["status"], sums, status["message"] = private_eval(
            sums, cfg, paths, as_int(conf["round"]), digest.hexdigest()
        )
        status["ledger-entries"] = json.dumps(ledger_since(paths, str(conf.get("ledger-head", ""))))
    elif "ledger-head" in conf:  # entries the server lacks (a round charged whose reply was lost)
        status["ledger-entries"] = json.dumps(ledger_since(paths, str(conf["ledger-head"])))
    content = RecordDict({"status": ConfigRecord(status)})
    if sums:
        content["sums"] = MetricRecord(sums)
    return _checked(transcript.EVALUATE, Message(content=content, reply_to=msg), cfg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This tenant's noisy user count ñ — the figure it reports with every round anyway — for ``auto``."""
    cfg = RunConfig.from_mapping(context.run_config)
    paths = resolve_tenant(context.node_config, cfg)
    users = tenant_count(cfg, paths, load_data(paths).split.n_users)
    content = RecordDict({"status": ConfigRecord({"tenant": paths.tenant_id, "users": users})})
    return _checked(transcript.QUERY, Message(content=content, reply_to=msg), cfg)


__all__ = ["ITEM_RELEASE", "TRAIN_METRIC_KEYS", "app"]

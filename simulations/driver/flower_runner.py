"""Run the project's ServerApp and ClientApp on Flower's Simulation Engine (Ray), in this process.

Why this way: ``flwr.simulation.run_simulation`` (public) gives both apps an empty run config, and
``flwr run`` leaves a background SuperLink and freezes the environment it was started with. Flower's
own ``flwr-simulation`` process calls ``_run_simulation(..., is_app=True, app_dir=...)``, which fuses
the run config from ``app_dir/pyproject.toml`` for every ClientApp; we do the same with a throw-away
app dir whose ``[tool.flwr.app.config]`` *is* the run config. This is private API: flwr is pinned to
1.42.x and a test runs it end to end. Ray is started inside the call and shut down at its end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

#: Set wherever the project starts Flower (otherwise `flwr` may install torch+CUDA at run time).
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def flower_env() -> None:
    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _nodes_with_undelivered_messages(state: Any, nodes: Any) -> list[int] | None:
    """Nodes of ``nodes`` with a message not yet handed to a client actor; None if unknowable.

    Reads the in-memory LinkState's message store under its lock (one pass over the messages).
    """
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        pending = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [nid for nid in nodes if nid in pending]


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
    """Flower's simulation extractor thread, without its quadratic polling.

    Flower 1.42 (``vce_api.add_messages_to_queue``) calls ``state.get_message_ins(node_id, limit=1)``
    for *every* node every 0.1 s, and each call scans (and re-validates) every stored message: with
    100 tenants and a round's 100 messages in flight that is 10 000 checks per tick, a driver thread
    busy all round long on a 2-core machine, holding the GIL and the LinkState lock. Here the same
    ``get_message_ins(node_id, limit=1)`` calls (same validation, same delivery marking, same
    one-message-per-node-per-tick order) are made only for the nodes that have an undelivered message.
    """
    while not f_stop.is_set():
        nodes = _nodes_with_undelivered_messages(state, nodes_mapping.keys())
        for node_id in nodes_mapping.keys() if nodes is None else nodes:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def _write_app_dir(run_config: dict[str, Any]) -> Path:
    app_dir = Path(tempfile.mkdtemp(prefix="fedrec-sim-app-"))
    lines = [
        "[project]",
        'name = "fedrec-sim"',
        'version = "1.0.0"',
        "[tool.flwr.app]",
        'publisher = "fedrec"',
        "[tool.flwr.app.components]",
        'serverapp = "fedrec.server.app:app"',
        'clientapp = "fedrec.client.app:app"',
        "[tool.flwr.app.config]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in run_config.items()),
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return app_dir


def run_simulation(
    run_config: dict[str, Any],
    num_supernodes: int,
    *,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    ray_cpus: int | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
) -> None:
    """Run one federation to completion; re-raises the ServerApp's exception on failure."""
    flower_env()
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from fedrec.client.app import app as client_app
    from fedrec.client.mods import QUIET_ENV
    from fedrec.server.app import app as server_app

    app_dir = _write_app_dir(run_config)
    flower_extractor = None
    try:
        fused = get_fused_config_from_dir(app_dir, {})
        run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
        run.primary_task_id = int.from_bytes(os.urandom(7), "big")
        run.federation_id = NOOP_FEDERATION_ID
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        ctx = Context(
            run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(fused)
        )
        init_args: dict[str, Any] = {"include_dashboard": False}
        if ray_address:
            init_args["address"] = ray_address
        elif ray_cpus:
            init_args["num_cpus"] = ray_cpus
        backend_config: dict[str, Any] = {
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": init_args,
        }
        if not verbose:
            logging.getLogger("flwr").setLevel(logging.WARNING)
            os.environ[QUIET_ENV] = "1"  # the ClientApp processes Ray starts inherit it (fedrec.client.mods)
        else:
            os.environ.pop(QUIET_ENV, None)
        flower_extractor = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue  # run_api looks the name up when it runs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # ray: RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO notice
            _run_simulation(
                num_supernodes=num_supernodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                server_app=server_app,
                client_app=client_app,
                backend_name="ray",
                backend_config=backend_config,
                server_app_context=ctx,
                app_dir=str(app_dir),
                run=run,
                is_app=True,
                verbose_logging=verbose,
            )
    finally:
        if flower_extractor is not None:
            vce_api.add_messages_to_queue = flower_extractor
        shutil.rmtree(app_dir, ignore_errors=True)

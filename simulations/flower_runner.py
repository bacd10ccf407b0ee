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
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
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
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server.app import app as server_app

    app_dir = _write_app_dir(run_config)
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
        shutil.rmtree(app_dir, ignore_errors=True)

"""The environment every test that starts Flower runs under (house rule: no runtime dependency
installation, no telemetry, no update check, and a fresh FLWR_HOME per test)."""

from __future__ import annotations

import os
from pathlib import Path


def flower_env(tmp: Path) -> dict[str, str]:
    """``os.environ`` plus Flower's three switches and ``FLWR_HOME`` under ``tmp`` (wide console)."""
    env = dict(os.environ)
    env.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(tmp / "flwr-home"),
        COLUMNS="200",
    )
    return env

"""Imported by every Python process whose ``PYTHONPATH`` names this folder — in the tests, the SuperNodes
of ``tests/test_deploy_faults.py`` and the ClientApps they start; nothing of ours is changed.

A SuperNode tells the SuperLink its heartbeat interval (``HEARTBEAT_DEFAULT_INTERVAL``, 30 s, a constant
with no command-line option) and the SuperLink lists it offline — and reports its messages "Node
Unavailable" — after ``HEARTBEAT_PATIENCE`` (2) intervals of silence: 60 s after a SIGKILL. Here the
SuperNode announces and keeps :data:`INTERVAL` (10 s, Flower's ``HEARTBEAT_MIN_INTERVAL``), so a killed
node is lost after ≤ 20 s and the fault test waits that instead of a minute per fault. Only the two
modules that send the node's heartbeat are touched; the SuperNode's own bookkeeping of its ClientApps
(``flwr.supercore.corestate``) keeps Flower's 30 s, so a ClientApp slow to start is never cut short.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

INTERVAL = 10.0  # s; flwr.common.constant.HEARTBEAT_MIN_INTERVAL, the least the SuperLink accepts
TARGETS = ("flwr.supercore.heartbeat", "flwr.supernode.fleet_http_connection")


class _FastHeartbeat(MetaPathFinder):
    """Finds the target modules as Python would, and sets their ``HEARTBEAT_DEFAULT_INTERVAL`` once
    loaded (both read it at call time: the interval announced, and the period between heartbeats)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in TARGETS:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            module.HEARTBEAT_DEFAULT_INTERVAL = INTERVAL  # type: ignore[attr-defined]

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _FastHeartbeat())

"""The Flower ServerApp: parse the run config once, hand the Grid to ``fedrec.server.loop.run_federation``."""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedrec.server.loop import run_federation
from fedrec.shared_model.runconfig import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)
    run_federation(grid, cfg, log=lambda line: log(INFO, "%s", line))

"""``fedrec serve``: registered on the main typer app by ``fedrec.simulations.cli.main`` (``register(app)``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

#: ``--candidates`` of ``serve`` and ``recommend`` (parsed by ``fedrec.shared_model.recommend.parse_candidates``).
CandidatesOpt = Annotated[
    str,
    typer.Option(
        "--candidates",
        help="MLP models: re-rank only this many candidates of a linear retrieval score (the logit "
        "linearized in the user vector) instead of every item; 0 = exact; auto (default) = from 800 items, the "
        "smallest of 200/500/1000 (≤ items/4) whose re-rank keeps ≥ 99 % of the exact top-10 on a "
        "load-time check of 128 drawn histories, else exact (up to 5 000 items) — /healthz shows the check.",
    ),
]


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""

    @app.command()
    def serve(
        model: Annotated[Path, typer.Option("--model", help="RUN_DIR holding model.pt + model.json.")],
        host: Annotated[
            str, typer.Option("--host", help="Interface to bind (loopback by default).")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
        api_keys: Annotated[
            Path | None,
            typer.Option(
                "--api-keys", help="File of bearer keys, one per line; then every /v1 call needs one."
            ),
        ] = None,
        int8: Annotated[
            bool, typer.Option("--int8", help="Dynamic int8 for the MLP layers scored per (user, item).")
        ] = False,
        reload_on_change: Annotated[
            bool,
            typer.Option(
                "--reload-on-change", help="Swap in a newer checkpoint in RUN_DIR without downtime."
            ),
        ] = False,
        threads: Annotated[
            int, typer.Option("--threads", min=1, help="torch threads (1 is fastest for small models).")
        ] = 1,
        log_level: Annotated[str, typer.Option("--log-level", help="debug|info|warning|error.")] = "info",
        workers: Annotated[
            int,
            typer.Option("--workers", min=1, help="Worker processes sharing one model loaded before fork."),
        ] = 1,
        batch_wait_ms: Annotated[
            float | None,
            typer.Option(
                "--batch-wait-ms",
                min=0.0,
                max=1.0,
                help="Most a request waits for others to share its ranking call (0 = no batching)."
                " Default: 1.0 with one worker, 0.2 with several (docs/BENCHMARKS.md).",
                show_default=False,
            ),
        ] = None,
        max_batch: Annotated[
            int, typer.Option("--max-batch", min=1, max=1024, help="Most requests per ranking call.")
        ] = 64,
        candidates: CandidatesOpt = "auto",
    ) -> None:
        """Serve top-K over HTTP (POST /v1/recommend, GET /v1/items/{id}, /healthz, /docs).

        SIGHUP reloads the checkpoint; SIGINT/SIGTERM finish in-flight requests, then stop.
        """
        from fedrec.server.serve import run
        from fedrec.shared_model.recommend import parse_candidates

        n_cand = parse_candidates(candidates)  # a bad value: one-line error before anything loads
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        run(
            model,
            host=host,
            port=port,
            api_keys_file=api_keys,
            int8=int8,
            reload_on_change=reload_on_change,
            threads=threads,
            log_level=log_level,
            workers=workers,
            batch_wait_ms=batch_wait_ms,
            max_batch=max_batch,
            candidates=n_cand,
        )

#!/usr/bin/env bash
# The README's main job: a small multi-tenant DP simulation on the built-in synthetic data, its metrics
# and per-tenant privacy spend, then a top-10 for a user (given by their history — the global model
# needs no user table). Run through `make demo`, which installs everything first.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME="${FLWR_HOME:-$PWD/runs/.flwr-home}"
BIN=.venv/bin
RUN=runs/demo

$BIN/fedrec simulate --data synthetic --tenants 3 --partition dirichlet:1.0 \
    --epsilon 8 --delta 1e-5 --out "$RUN" --overwrite

# A user who watched these five synthetic movies (original item ids of the catalogue):
$BIN/fedrec recommend --model "$RUN" --history 12,48,95,160,233 -k 10

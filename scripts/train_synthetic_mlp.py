"""Train the default MLP on a large synthetic catalogue, without per-epoch evaluation, for serving tests.

    .venv/bin/python scripts/train_synthetic_mlp.py --out RUN_DIR [--users 8000] [--items 48000] [--epochs 2]

``fedrec centralized`` evaluates every epoch over the whole catalogue (minutes per epoch at 40k items
on 2 cores); a model to measure serving speed and the candidate re-rank's overlap with the exact
ranking (scripts/measure_candidates.py, ``fedrec bench serve``) needs trained weights, not early
stopping. Same data generator, architecture, sampling and optimizer as ``fedrec centralized``; the
items nobody interacted with are dropped by the data preparation (48 000 generated → ~41 000 kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.shared_model.artifacts import save_model
from fedrec.shared_model.training import train_epoch
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.centralized import CentralizedConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--users", type=int, default=8000)
    ap.add_argument("--items", type=int, default=48000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = prepare_dataset(load("synthetic", seed=args.seed, synth_users=args.users, synth_items=args.items))
    cfg = CentralizedConfig(seed=args.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(data, dim=cfg.dim, hidden=cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(model, data.split, opt, cfg.sampling, rng, batch_size=cfg.batch_size)
        print(f"epoch {epoch}: loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    run_id = f"synthetic-{data.catalog.n_items}-items-{args.epochs}-epochs"
    save_model(args.out, model.eval(), data.catalog, cfg.sampling, run_id=run_id)
    print(f"{data.catalog.n_items} items, {data.split.n_users} users; model in {args.out}")


if __name__ == "__main__":
    main()

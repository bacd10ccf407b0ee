"""``fedrec centralized``: the non-private, non-federated reference run.

Trains :class:`HistoryMLP` on all users with early stopping on validation NDCG@10 (full ranking),
evaluates the best epoch on test next to popularity and EASE in the same harness, and writes the
RUN_DIR files of CONTRACT.md atomically.

On a given split the same happens with validation held out of TRAIN (``simulations.dataset``), and
``metrics.json`` ``full`` gains Recall@20, NDCG@20 and HitRate@20 for the model and each baseline.

Memory and time at catalogue scale: evaluation scores users in batches bounded by
``shared_model.evaluate.MAX_SCORE_CELLS`` (never users × items at once); the per-epoch validation
uses a fixed sample of at most ``val_users`` users and at most ``val_cells`` user × item scores (all
users on ml-100k; 2 000 at 40 000 items); patience is counted in gradient steps, not epochs (40 epochs
of ml-100k's 15 steps, at least 5 epochs), so a log 30× larger does not wait 30× longer for an
improvement; the EASE baseline models the ``ease_max_items`` most popular items and ranks the rest by
popularity below them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.shared_model.artifacts import save_model, write_json_atomic
from fedrec.shared_model.baselines import EASE, Popularity
from fedrec.shared_model.data import UserSplit
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.training import ModelScorer, SamplingConfig, train_epoch
from fedrec.simulations.data.dataset import PreparedData, require_evaluable
from fedrec.simulations.driver.rundir import atomic_dir


@dataclass(frozen=True)
class CentralizedConfig:
    """Training recipe of the centralized MLP (defaults tuned on ml-100k validation, see README)."""

    epochs: int = 150  # maximum epochs
    # Epochs without improvement before stopping; None: auto, see patience_epochs (40 on ml-100k, where
    # val NDCG@10 is noisy, ±0.005 per epoch, and best epochs fall at 50–125).
    patience: int | None = None
    patience_steps: int = 600  # auto patience: this many gradient steps' worth of epochs, within [5, 40]
    lr: float = 3e-3  # Adam learning rate (the seed's 1e-3 stays at popularity level on ml-100k)
    batch_size: int = 64  # users per step
    dim: int = 32  # embedding width
    hidden: tuple[int, ...] = (64, 32)  # MLP hidden layers
    # Train on histories as long as the ones scored at evaluation (SamplingConfig.max_eval_history).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_history=200))
    ease_lambda: float = 500.0  # L2 strength of the EASE baseline
    ease_max_items: int = 4000  # EASE models the top items by count (O(M³) fit); the rest by popularity
    val_users: int = 5000  # validation users per epoch (fixed seeded sample when there are more)
    val_cells: int = 80_000_000  # and at most this many user × item scores per validation (≥ 1 000 users)
    seed: int = 0
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def build_model(data: PreparedData, *, dim: int, hidden: tuple[int, ...]) -> HistoryMLP:
    cat = data.catalog
    cfg = ModelConfig(
        n_items=cat.n_items,
        n_genres=len(cat.genre_names),
        user_cardinalities=cat.cardinalities(),
        dim=dim,
        hidden=hidden,
    )
    return HistoryMLP(cfg, cat.genres if cfg.n_genres else None)


def dataset_summary(data: PreparedData) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source": data.source,
        "users": data.split.n_users,
        "items": data.catalog.n_items,
        "interactions": data.n_interactions,
    }
    if data.given is not None:
        out["split"] = {"kind": "given", **data.given}
    return out


def baseline_metrics(
    data: PreparedData, *, ease_lambda: float, seed: int, ease_max_items: int = 4000
) -> dict[str, Any]:
    """Popularity and EASE on the test protocol (same split, same harness).

    EASE models at most ``ease_max_items`` items (the most popular); ``support`` says how many, and
    that the rest of the catalogue is ranked by popularity below them.
    """
    out: dict[str, Any] = {}
    ease = EASE(lam=ease_lambda, max_items=ease_max_items, rest_by_popularity=True).fit(data.split)
    for name, scorer in (("popularity", Popularity().fit(data.split)), ("ease", ease)):
        m = evaluate(scorer, data.split, data.catalog, which="test", seed=seed).to_metrics()
        out[name] = {"full": m["full"], "sampled": m["sampled"]}
    out["ease"]["support"] = ease.support()
    return out


def validation_size(cfg: CentralizedConfig, n_items: int) -> int:
    """Users validated per epoch at most: ``val_users``, fewer where a validation pass would score more
    than ``val_cells`` user × item pairs (full ranking scores every item; at 40 000 items 5 000 users
    cost 5× an epoch of training), never below 1 000 (s.e. of NDCG@10 ≈ 0.003)."""
    return min(cfg.val_users, max(1000, cfg.val_cells // max(n_items, 1)))


def validation_split(data: PreparedData, cfg: CentralizedConfig) -> UserSplit:
    """The users validated each epoch: all with a validation item, or a fixed seeded sample of
    :func:`validation_size` of them."""
    users = np.flatnonzero(data.split.val_item >= 0)
    size = validation_size(cfg, data.catalog.n_items)
    if len(users) <= size:
        return data.split
    rng = np.random.default_rng([cfg.seed, 1])
    return data.split.subset(np.sort(rng.choice(users, size, replace=False)))


def steps_per_epoch(split: UserSplit, batch_size: int) -> int:
    """Gradient steps of one :func:`train_epoch` pass (one per batch of users with a history)."""
    return max(1, -(-int((split.train_counts() > 0).sum()) // batch_size))


def patience_epochs(cfg: CentralizedConfig, steps: int) -> int:
    """Epochs without a validation improvement before stopping: ``patience`` when given, else
    ``patience_steps`` gradient steps' worth of epochs within [5, 40] — 40 on ml-100k (15 steps an
    epoch, the recipe tuned there), 5 at 30 000 users (469 steps), where validation NDCG peaks within
    ~10 epochs and then falls as the model overfits."""
    if cfg.patience is not None:
        return cfg.patience
    return min(40, max(5, -(-cfg.patience_steps // max(steps, 1))))


def train_centralized(
    data: PreparedData,
    cfg: CentralizedConfig,
    *,
    on_epoch: Callable[[int, float, float, bool], None] | None = None,
) -> tuple[HistoryMLP, dict[str, Any]]:
    """Train with early stopping; returns the best model and a training summary."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(data, dim=cfg.dim, hidden=cfg.hidden).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_epoch, best_state = -1.0, 0, {k: v.clone() for k, v in model.state_dict().items()}
    history = []
    val_split = validation_split(data, cfg)
    patience = patience_epochs(cfg, steps_per_epoch(data.split, cfg.batch_size))
    for epoch in range(1, cfg.epochs + 1):
        loss = train_epoch(
            model, data.split, opt, cfg.sampling, rng, batch_size=cfg.batch_size, device=cfg.device
        )
        val = evaluate(ModelScorer(model, cfg.sampling, cfg.device), val_split, data.catalog, which="val")
        ndcg = float(val.to_metrics()["full"]["ndcg@10"])
        improved = ndcg > best
        if improved:
            best, best_epoch = ndcg, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, "loss": loss, "val_ndcg@10": ndcg})
        if on_epoch:
            on_epoch(epoch, loss, ndcg, improved)
        if epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, {
        "best_epoch": best_epoch,
        "best_val_ndcg@10": best,
        "epochs_run": len(history),
        "patience": patience,
        "val_users": int((val_split.val_item >= 0).sum()),
        "history": history,
    }


def run_centralized(
    data: PreparedData,
    cfg: CentralizedConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resolved_config: dict[str, Any] | None = None,
    on_epoch: Callable[[int, float, float, bool], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and write RUN_DIR (atomically). Returns ``metrics.json``'s content."""
    require_evaluable(data)
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model, summary = train_centralized(data, cfg, on_epoch=on_epoch)
        test = evaluate(
            ModelScorer(model, cfg.sampling, cfg.device),
            data.split,
            data.catalog,
            which="test",
            seed=cfg.seed,
        )
        metrics: dict[str, Any] = test.to_metrics()
        metrics["baselines"] = baseline_metrics(
            data, ease_lambda=cfg.ease_lambda, seed=cfg.seed, ease_max_items=cfg.ease_max_items
        )
        metrics["dataset"] = dataset_summary(data)
        metrics["training"] = {k: v for k, v in summary.items() if k != "history"}
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        run_id = f"centralized-{uuid.uuid4().hex[:12]}"
        save_model(
            tmp, model.cpu(), data.catalog, cfg.sampling, run_id=run_id, extra={"training": cfg.to_json()}
        )
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(
            tmp / "config.json", {"command": "centralized", **(resolved_config or {}), "train": cfg.to_json()}
        )
        with open(tmp / "epochs.jsonl", "w", encoding="utf-8") as f:
            for row in summary["history"]:
                f.write(json.dumps(row) + "\n")
    return metrics

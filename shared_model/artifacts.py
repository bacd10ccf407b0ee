"""``model.pt`` + ``model.json``: everything ``recommend``/``serve`` need, and nothing else.

``model.json`` holds the architecture, the item-id mapping with titles and genres, the user-feature
vocabularies and the run's configuration summary. No user id, history, key or metric per user ever
goes in either file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedrec.shared_model.data import Catalog
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.item_model import ItemModelConfig, ItemReleaseModel, Ranker
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.training import SamplingConfig

MODEL_FORMAT = "fedrec-model"
MODEL_FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: Ranker  # HistoryMLP (kind "mlp") or ItemReleaseModel (dp_ease | ease | dp_popularity)
    catalog: Catalog
    sampling: SamplingConfig
    run_id: str
    meta: dict[str, Any]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via temp file + fsync + rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(
    run_dir: Path,
    model: Ranker,
    catalog: Catalog,
    sampling: SamplingConfig,
    *,
    run_id: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model.pt`` (state dict only) and ``model.json`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = run_dir / ".model.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / "model.pt")
    meta = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "run_id": run_id,
        "kind": model.cfg.kind if isinstance(model, ItemReleaseModel) else "mlp",
        "model": model.cfg.to_json(),
        "sampling": {
            "max_history": sampling.max_history,
            "targets": sampling.targets,
            "negatives": sampling.negatives,
            "max_eval_history": sampling.max_eval_history,
        },
        "catalog": catalog.to_json(),
        **(extra or {}),
    }
    write_json_atomic(run_dir / "model.json", meta)


def load_model(run_dir: Path, *, device: str = "cpu") -> LoadedModel:
    """Load a model written by :func:`save_model`; clear :class:`FedrecError` when unusable."""
    pt, js = run_dir / "model.pt", run_dir / "model.json"
    for p in (pt, js):
        if not p.is_file():
            raise FedrecError(f"{run_dir} is not a fedrec model: {p.name} is missing")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedrecError(f"{js} is not valid JSON ({e})") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_FORMAT_VERSION:
        raise FedrecError(f"{js} is not a fedrec model file of version {MODEL_FORMAT_VERSION}")
    try:
        catalog = Catalog.from_json(meta["catalog"])
        sampling = SamplingConfig(**meta["sampling"])
        model: Ranker
        if meta.get("kind", "mlp") == "mlp":
            cfg = ModelConfig.from_json(meta["model"])
            model = HistoryMLP(cfg, catalog.genres if cfg.n_genres else None)
        else:
            model = ItemReleaseModel(ItemModelConfig.from_json(meta["model"]))
        if model.cfg.n_items != catalog.n_items:
            raise ValueError(f"the model covers {model.cfg.n_items} items, the catalogue {catalog.n_items}")
        state = torch.load(pt, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, FedrecError) as e:
        raise FedrecError(
            f"{run_dir} holds an unreadable or inconsistent model ({type(e).__name__}: {e})"
        ) from None
    model.to(device).eval()
    return LoadedModel(
        model=model, catalog=catalog, sampling=sampling, run_id=str(meta.get("run_id", "")), meta=meta
    )

"""Issue 16 item 2: ablations of the DP-SGD MLP on top of the DP item release, in one process, chosen on
VALIDATION only (full-ranking HR@10 / NDCG@10 of the second-last item).

The stages are the product's own functions, called without Flower: each tenant's item release
(``client.task.release_message``, σ calibrated alone to ``share·ε``), the server's post-processing
(``server.release_init.init_from_release``), each tenant's DP-SGD round (``client.train.train_round``,
Poisson sampling, per-user clipping, its own noise; σ calibrated with the release in the accountant
history so that release + rounds compose to ε), FedAvg of the tenants' parameters weighted by users.
Per (seed, config) it prints one JSON line with val HR@10 of: the prior alone, the model before
DP-SGD, the model after it, and DP popularity at the whole ε (a fresh release, as `fedrec simulate`
reports it). DP noise always comes from fresh OS entropy, never from the seed (the seed fixes the
partition and the model's initialisation). `scripts/tune_federated.py` runs a chosen config through
the real ServerApp/ClientApp loop.

    python scripts/ablate_dp_mlp.py --data /work/shared/data/ml-100k --seeds 0 1 2 --epsilon 8 \
        --config 'name=mix;release-init=0.9;release-init-items=genres;release-init-pop=1;dot-mix=0;dp-train=mix;lr=0.05'
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.client.task import local_config, release_message
from fedrec.client.train import plan_round, train_round
from fedrec.privacy import gram
from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.server.loop import model_config
from fedrec.server.release import sum_noise
from fedrec.server.release_init import init_from_release, init_model_config, public_item_text
from fedrec.shared_model.baselines import DPPopularity
from fedrec.shared_model.codec import load_weights, parameter_weights
from fedrec.shared_model.data import concat_splits
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.model import HistoryMLP
from fedrec.shared_model.runconfig import RunConfig
from fedrec.shared_model.training import ModelScorer
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.simulate import load_tenant_splits, open_federation


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def val_hr(model_or_scorer: Any, union: Any, catalog: Any, cfg: RunConfig) -> dict[str, float]:
    scorer = (
        ModelScorer(model_or_scorer, local_config(cfg).sampling)
        if isinstance(model_or_scorer, HistoryMLP)
        else model_or_scorer
    )
    full = evaluate(scorer, union, catalog, which="val", seed=cfg.seed, batch_size=64).to_metrics()["full"]
    return {"hr@10": round(full["hr@10"], 5), "ndcg@10": round(full["ndcg@10"], 5)}


def run_config(spec: dict[str, Any], fed: Path, splits: dict[str, Any], seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = dict(spec)
    name = spec.pop("name", "")
    nodp = spec.get("epsilon") == float("inf")  # the same stages without noise (no guarantee)
    if nodp:
        spec["epsilon"] = 1.0
    cfg = RunConfig.from_mapping({"fed-dir": str(fed), "approach": "mlp", "seed": seed, **spec})
    f = open_federation(fed)
    catalog = f.catalog
    union = concat_splits(list(splits.values()))
    n_items = catalog.n_items
    rng = np.random.default_rng(secrets.randbits(128))  # release noise: fresh, never the seed
    row: dict[str, Any] = {"name": name, "seed": seed, "set": spec}
    # DP popularity at the whole ε (the product's baseline)
    total_pop = np.zeros(n_items)
    for t, sp in splits.items():
        sig = (
            0.0
            if nodp
            else calibrate_noise(
                target_epsilon=cfg.cap_for(t), delta=cfg.delta, sample_rate=1.0, steps=1, accountant="prv"
            )
        )
        total_pop += DPPopularity.release(sp, sig, rng)
    row["dp_popularity"] = val_hr(DPPopularity().fit_released(total_pop), union, catalog, cfg)
    # stage 1: the initialising release
    share, rho = cfg.release_init, cfg.release_init_pop
    total: dict[str, np.ndarray] = {}
    sig_rel: dict[str, float] = {}
    for t, sp in splits.items():
        s = (
            0.0
            if nodp
            else gram.calibrate_release_sigma(
                target_epsilon=cfg.cap_for(t) * share, delta=cfg.delta, accountant="prv"
            )
        )
        sig_rel[t] = s
        msg = release_message(
            sp.indptr, sp.train_items, n_items, gram.ReleaseNoise(sigma=s, pop_share=rho), rng
        )
        for k, v in msg.items():
            total[k] = total[k] + v.astype(np.float64) if k in total else v.astype(np.float64)
    users = sum(sp.n_users for sp in splits.values())
    emb, prior, facts = init_from_release(
        total, n_items=n_items, users=users, sigma_sum=sum_noise(list(sig_rel.values()), 1), dim=cfg.dim,
        pop_share=rho, source=cfg.release_init_items, genres=catalog.genres,
        text=_item_text(cfg, catalog),
    )  # fmt: skip
    mcfg = init_model_config(
        model_config(catalog, cfg),
        dot_mix=cfg.dot_mix if cfg.dot_mix >= 0 else None,
        trainable=cfg.train_modules(),
        prior_negatives=cfg.prior_negatives,
    )
    torch.manual_seed(seed)
    model = HistoryMLP(mcfg, catalog.genres)
    model.set_item_embeddings(emb)
    model.set_prior(prior)
    row["facts"] = facts
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from fedrec.shared_model.priors import PriorScorer

    row["prior_only"] = val_hr(PriorScorer(prior.astype(np.float64)), union, catalog, cfg)
    row["before_sgd"] = val_hr(model, union, catalog, cfg)
    # stage 2: DP-SGD rounds, FedAvg
    local = local_config(cfg)
    local = type(local)(**{**local.__dict__, "device": "cpu", "dp": not nodp})
    sig_sgd: dict[str, float] = {}
    eps: dict[str, float] = {}
    for t, sp in splits.items():
        plan = plan_round(sp.n_users, local)
        hist = [(sig_rel[t], 1.0, 1)]
        if nodp:
            sig_sgd[t], eps[t] = 0.0, float("inf")
            continue
        sig_sgd[t] = calibrate_noise(
            target_epsilon=cfg.cap_for(t), delta=cfg.delta, sample_rate=plan.sample_rate,
            steps=plan.steps * cfg.num_server_rounds, accountant="prv", history_before=hist,
        )  # fmt: skip
        eps[t] = epsilon(
            history=[*hist, (sig_sgd[t], plan.sample_rate, plan.steps * cfg.num_server_rounds)],
            delta=cfg.delta,
        )
    row["sigma_sgd_median"] = round(float(np.median(list(sig_sgd.values()))), 4)
    row["epsilon_max"] = round(max(eps.values()), 4)
    frozen0 = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    for _ in range(cfg.num_server_rounds):
        global_w = parameter_weights(model)
        acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_w.items()}
        for t, sp in splits.items():
            local_model = HistoryMLP(mcfg, catalog.genres)
            load_weights(local_model, {**{k: v for k, v in _buffers(model).items()}, **global_w})
            train_round(local_model, sp, local, noise_multiplier=sig_sgd[t], seed=secrets.randbits(63))
            for k, v in parameter_weights(local_model).items():
                acc[k] += (v.astype(np.float64) - global_w[k]) * (sp.n_users / users)  # FedAvg of deltas
        load_weights(model, {k: (global_w[k] + acc[k]).astype(np.float32) for k in acc})
    assert all(torch.equal(p, frozen0[k]) for k, p in model.named_parameters() if k in frozen0)
    row["after_sgd"] = val_hr(model, union, catalog, cfg)
    if model.mix is not None:
        row["mix"] = round(float(model.mix.weight.detach()[0, 0]), 4)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


_TEXT: dict[tuple[str, ...], np.ndarray] = {}


def _item_text(cfg: RunConfig, catalog: Any) -> np.ndarray | None:
    """The product's title embeddings, computed once per process (each seed's federation folder is new)."""
    if not cfg.release_init_items.endswith("text"):
        return None
    if catalog.titles not in _TEXT:
        text = public_item_text(cfg, catalog)
        assert text is not None
        _TEXT[catalog.titles] = text
    return _TEXT[catalog.titles]


def _buffers(model: HistoryMLP) -> dict[str, np.ndarray]:
    return {k: b.detach().cpu().numpy() for k, b in model.named_buffers()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/ml-100k")
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--config", action="append", required=True, help="'name=X;KEY=VALUE;...' run-config keys")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    specs = []
    for c in args.config:
        kv = dict(p.split("=", 1) for p in c.split(";") if p.strip())
        specs.append(
            {k: (v if k == "name" else _value(v)) for k, v in kv.items()} | {"epsilon": args.epsilon}
        )
    for seed in args.seeds:
        data = prepare_dataset(load(args.data, seed=seed))
        with tempfile.TemporaryDirectory(prefix="fedrec-abl-") as tmp:  # tenant folders: removed after
            fed = Path(tmp) / "fed"
            pcfg = PrepareConfig(tenants=args.tenants, partition=args.partition, seed=seed, k_anonymity=5)
            prepare_federation(data, fed, pcfg)
            splits = load_tenant_splits(open_federation(fed))
            for spec in specs:
                row = run_config(spec, fed, splits, seed)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

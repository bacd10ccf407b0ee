"""Issue 5 items 1, 2, 4: a small DP-SGD head on FROZEN item representations + a DP popularity prior.

Protocol (docs/DP_HEAD.md): 5 tenants (iid partition of the users, the seed), user-level DP,
δ = 1e-5, PRV accountant, local noise (each tenant noises its own release; the server sums).
For each seed and ε, every tenant spends at most ε in total, composed across its stages:

* the head variants make ONE item release per tenant (``fedrec.privacy.gram``), a ``(σ_rel, q = 1, steps = 1)``
  segment with σ_rel calibrated ALONE to ``release_share · ε`` (the split rule, fixed a priori:
  ``--release-share 0.5``); the DP-SGD rounds are the next segment, σ_sgd calibrated with
  ``history_before = [release segment]`` so that the composed total is exactly the target ε;
* the references spend the whole ε on one stage: DP popularity (ρ = 1 release), DP-EASE (ρ = 0
  release, ``DPEASERule``), the DP-SGD MLP on all parameters (no release).

Variants (HR@10 / NDCG@10, full ranking, leave-one-out TEST item):

* ``a_head``  public item features (genres, year; ``--text``: + hashed title words) frozen as item
  embeddings, + the DP popularity log-prior of a ρ = 1 release, + a small DP-SGD head (hidden 16,
  zero-initialised output, no item bias / dot term: it starts exactly at the prior);
* ``a_prior`` the same release's prior alone (the head's starting point; free post-processing);
* ``b_head``  one ρ = 0.2 release: its popularity part gives the prior, its Gram part gives frozen item
  embeddings (top ≤ 16 EigenGram vectors above the noise edge, shrunk), + the same head;
* ``b_prior`` that release's (noisier, ρ = 0.2) prior alone;
* ``b_eigen`` the EigenGram scorer on that same release (free post-processing, no head);
* ``dp_popularity``, ``dp_ease``, ``mlp_all``: the references above, at the whole ε; ``dp_ease_ridge``
  is the first DP-EASE rule (``denoise=False``) on the same release as ``dp_ease``.

Federated part: in one process, each round every tenant trains the global model on its own users with
``fedrec.client.train.train_round`` (its own DP-SGD: Poisson sampling, per-user clipping, its own noise) and
the server averages the parameters weighted by user counts (FedAvg). DP noise (release and DP-SGD)
always comes from fresh OS entropy, never from ``--seeds``.

``--head bilinear``: the heads are ``prior + uᵀAv + w·v + b`` (:class:`BilinearHead`) instead of the MLP;
``--refs-only``: only DP popularity and DP-EASE (both rules); ``--from-csv``: rebuild tables, no run.

    python scripts/ablate_dp_head.py --data ml100k --eps 8,3,1,inf --seeds 3 --text --out /tmp/dphead/ml
    python scripts/ablate_dp_head.py --data synthetic --users 20000 --eps 8,3,1,inf --seeds 3 \
        --out /tmp/dphead/syn
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import secrets
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.client.train import LocalTrainConfig, plan_round, train_round
from fedrec.privacy import gram
from fedrec.privacy.accounting import calibrate_noise, epsilon
from fedrec.shared_model.baselines import DPPopularity
from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.dp_item import DPEASE, DPEASERule, EigenGram
from fedrec.shared_model.evaluate import evaluate
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.priors import PriorScorer, log_prior
from fedrec.shared_model.training import ModelScorer, SamplingConfig
from fedrec.simulations.data.partition import PartitionSpec, partition_users

ML100K = "/work/shared/data/ml-100k"
DELTA = 1e-5


@dataclass(frozen=True)
class Recipe:
    """Federated DP-SGD recipe of one model family (fixed a priori, not tuned on test items)."""

    rounds: int
    local_epochs: float
    batch_users: int
    lr: float
    max_grad_norm: float = 1.0


HEAD = Recipe(rounds=10, local_epochs=1.0, batch_users=64, lr=1e-2)
MLP = Recipe(rounds=3, local_epochs=1.0, batch_users=64, lr=3e-3)  # the project's RunConfig defaults


# ------------------------------------------------------------------ item representations


def public_features(catalog: Catalog, text_buckets: int = 0) -> np.ndarray:
    """(n, G + 2 [+ text_buckets]) float32: unit-norm genre multi-hot, z-scored year, unknown-year flag,
    and optionally signed hashed title words/bigrams (crc32, L2-normalised). Public: costs no privacy."""
    g = catalog.genres.astype(np.float64)
    g = g / np.sqrt(np.maximum(g.sum(1, keepdims=True), 1.0))
    years = catalog.years.astype(np.float64)
    known = years > 0
    z = np.zeros_like(years)
    if known.any():
        z[known] = (years[known] - years[known].mean()) / max(years[known].std(), 1e-6)
    cols = [g, z[:, None], (~known).astype(np.float64)[:, None]]
    if text_buckets:
        t = np.zeros((catalog.n_items, text_buckets))
        for i, title in enumerate(catalog.titles):
            words = re.findall(r"[a-z0-9']+", re.sub(r"\(\d{4}\)", "", title.lower()))
            for tok in words + [a + " " + b for a, b in itertools.pairwise(words)]:
                h = zlib.crc32(tok.encode())
                t[i, h % text_buckets] += 1.0 if (h >> 16) & 1 else -1.0
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        cols.append(t)
    return np.concatenate(cols, axis=1).astype(np.float32)


def eigen_embeddings(
    g: np.ndarray, offdiag_std: float, diag_std: float, users: int, rule: DPEASERule, dim: int
) -> tuple[np.ndarray, int, EigenGram]:
    """(n, dim) frozen item embeddings from a (noisy) Gram: the top ≤ dim EigenGram components above the
    noise edge, each column scaled by √shrink, rows of the support scaled to mean norm 1, others 0."""
    eig = EigenGram(rule).fit_gram(g, offdiag_std=offdiag_std, diag_std=diag_std, users=users)
    assert eig.vectors is not None and eig.shrink is not None and eig.items is not None
    k = min(dim, eig.components)
    emb = np.zeros((g.shape[0], dim), dtype=np.float64)
    if k:
        v = eig.vectors[:, -k:] * np.sqrt(eig.shrink[-k:])[None, :]  # eigh is ascending: the top k
        norm = np.linalg.norm(v, axis=1).mean()
        emb[eig.items, :k] = v / max(norm, 1e-12)
    return emb.astype(np.float32), eig.components, eig


# ------------------------------------------------------------------ federated DP-SGD


class BilinearHead(torch.nn.Module):
    """``logit = prior_i + uᵀ A v_i + w·v_i + b`` on FROZEN item vectors v (u = mean of the history's v).

    A (d × d), w, b start at zero, so the model starts exactly at the prior. The interaction a MLP head has
    to approximate with ReLUs is here one linear layer: d² + d + 1 trainable parameters. Every trainable
    parameter is an ``nn.Linear`` (fast per-user clipping); the history and candidates are looked up in one
    call, as in HistoryMLP. A ``--head bilinear`` ablation, not part of HistoryMLP.
    """

    def __init__(self, n_items: int, emb: np.ndarray, prior: np.ndarray) -> None:
        super().__init__()
        d = emb.shape[1]
        self.pad = n_items
        table = np.zeros((n_items + 1, d), dtype=np.float32)
        table[:n_items] = emb
        self.item_emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(table), freeze=True)
        p = np.zeros(n_items + 1, dtype=np.float32)
        p[:n_items] = prior
        self.register_buffer("prior", torch.from_numpy(p))
        self.inter = torch.nn.Linear(d, d, bias=False)
        self.lin = torch.nn.Linear(d, 1)
        for w in (self.inter.weight, self.lin.weight, self.lin.bias):
            torch.nn.init.zeros_(w)

    def _user(self, hist_emb: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        mask = (history != self.pad).unsqueeze(-1).to(hist_emb.dtype)
        return (hist_emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        user_features: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        emb = self.item_emb(torch.cat([history, candidates], dim=1))
        u = self._user(emb[:, : history.shape[1]], history)  # (B, d)
        v = emb[:, history.shape[1] :]  # (B, C, d)
        return (self.inter(u).unsqueeze(1) * v).sum(-1) + self.lin(v).squeeze(-1) + self.prior[candidates]

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        """Scorer protocol: (B, n_items) over the whole catalogue."""
        from fedrec.shared_model.training import pad_rows

        n = self.pad
        hist = torch.from_numpy(pad_rows([h[-200:] for h in histories], n))
        with torch.no_grad():
            u = self._user(self.item_emb(hist), hist)  # (B, d)
            v = self.item_emb.weight[:n]  # (N, d)
            s = self.inter(u) @ v.T + self.lin(v).squeeze(-1)[None, :] + self.prior[:n][None, :]
        return s.numpy()


def prior_offset(n_items: int) -> np.float32:
    """+ log(N / negatives): the Bayes logit of a popularity-only model under the training sampler
    (targets ∝ popularity, ``negatives`` uniform items per target), so the zero head starts calibrated
    and its first steps are not spent (and noised) learning a constant. Ranking is unchanged."""
    return np.float32(math.log(n_items / SamplingConfig().negatives))


def make_head(kind: str, n_items: int, emb: np.ndarray, prior: np.ndarray) -> tuple[torch.nn.Module, Any]:
    """(model to train, its Scorer factory) for ``--head mlp|bilinear``."""
    if kind == "bilinear":
        model = BilinearHead(n_items, emb, prior + prior_offset(n_items))
        return model, lambda: model
    mlp = head_model(n_items, emb, prior)
    return mlp, lambda: ModelScorer(mlp, SamplingConfig())


def head_model(n_items: int, emb: np.ndarray, prior: np.ndarray) -> HistoryMLP:
    cfg = ModelConfig(
        n_items=n_items,
        dim=emb.shape[1],
        hidden=(16,),
        use_context=False,
        item_bias=False,
        dot_term=False,
        fixed_prior=True,
        freeze_item_emb=True,
        zero_init_output=True,
    )
    model = HistoryMLP(cfg)
    model.set_item_embeddings(emb)
    model.set_prior(prior + prior_offset(n_items))
    return model


def mlp_model(catalog: Catalog) -> HistoryMLP:
    """The project's model on all parameters (fedrec.server.loop.model_config with the RunConfig defaults)."""
    cfg = ModelConfig(
        n_items=catalog.n_items,
        n_genres=len(catalog.genre_names),
        user_cardinalities=catalog.cardinalities(),
        dim=32,
        hidden=(64, 32),
    )
    return HistoryMLP(cfg, catalog.genres if cfg.n_genres else None)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fedavg_train(
    model: torch.nn.Module, tenants: list[UserSplit], recipe: Recipe, sigmas: list[float]
) -> None:
    """FedAvg in one process; ``sigmas[t]`` = tenant t's DP-SGD noise multiplier (0 = no DP)."""
    dp = all(s > 0 for s in sigmas)
    local = LocalTrainConfig(
        dp=dp,
        local_epochs=recipe.local_epochs,
        batch_users=recipe.batch_users,
        lr=recipe.lr,
        max_grad_norm=recipe.max_grad_norm,
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = np.array([t.n_users for t in tenants], dtype=np.float64)
    weights /= weights.sum()
    for _ in range(recipe.rounds):
        acc: dict[str, torch.Tensor] = {}
        for w, split, sigma in zip(weights, tenants, sigmas, strict=True):
            model.load_state_dict(state)
            # Fresh OS entropy: Poisson sampling, example sampling and the Gaussian noise of this round.
            train_round(model, split, local, noise_multiplier=sigma, seed=secrets.randbits(62))  # type: ignore[arg-type]
            for k, v in model.state_dict().items():
                acc[k] = acc.get(k, torch.zeros_like(v, dtype=torch.float64)) + w * v.detach().double()
        state = {k: acc[k].to(v.dtype) for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()


_SIGMA_CACHE: dict[tuple[Any, ...], float] = {}


def sgd_sigma(eps: float, n_users: int, recipe: Recipe, before: list[tuple[float, float, int]]) -> float:
    """σ of a tenant's DP-SGD (all rounds) so that ``before`` + DP-SGD composes to exactly ε."""
    plan = plan_round(
        n_users, LocalTrainConfig(batch_users=recipe.batch_users, local_epochs=recipe.local_epochs)
    )
    key = (eps, plan.sample_rate, plan.steps * recipe.rounds, tuple(before))
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = calibrate_noise(
            target_epsilon=eps,
            delta=DELTA,
            sample_rate=plan.sample_rate,
            steps=plan.steps * recipe.rounds,
            accountant="prv",
            history_before=before,
        )
    return _SIGMA_CACHE[key]


def total_epsilon(segments: list[tuple[float, float, int]]) -> float:
    return epsilon(history=segments, delta=DELTA, accountant="prv")


# ------------------------------------------------------------------ one seed


def run_seed(
    name: str,
    split: UserSplit,
    catalog: Catalog,
    eps_list: list[float],
    seed: int,
    args: argparse.Namespace,
    log: Callable[[str], None],
    rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    k = args.tenants
    rule = DPEASERule()
    parts = partition_users(split, catalog, k, PartitionSpec("iid"), seed=seed, min_users=1)
    tenants = [split.subset(p) for p in parts]
    xs = [gram.unit_rows(s.indptr, s.train_items, s.n_items) for s in tenants]
    sizes = [s.n_users for s in tenants]
    users = sum(sizes)
    test = np.flatnonzero(split.test_item >= 0)
    if len(test) > args.eval_users:
        test = np.sort(np.random.default_rng([seed, 7]).choice(test, args.eval_users, replace=False))
    ev = split.subset(test)
    noise_rng = np.random.default_rng()  # release noise: fresh OS entropy, never the public seed
    feats = public_features(catalog)
    feats_text = public_features(catalog, args.text_buckets) if args.text else None
    base = {"dataset": name, "users": users, "items": split.n_items, "seed": seed, "tenants": k}

    def score(scorer: Any) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        m = evaluate(scorer, ev, catalog, which="test", seed=seed).to_metrics()["full"]
        return float(m["hr@10"]), float(m["ndcg@10"]), time.perf_counter() - t0

    def add(eps: float, approach: str, scorer: Any, seconds: float, **extra: Any) -> None:
        hr, nd, t_eval = score(scorer)
        rows.append(
            {
                **base,
                "epsilon": eps,
                "approach": approach,
                "hr@10": hr,
                "ndcg@10": nd,
                "train_s": round(seconds, 2),
                "eval_s": round(t_eval, 2),
                **extra,
            }
        )

    def do_release(sigma: float, rho: float) -> tuple[gram.ItemRelease, gram.ReleaseNoise, float]:
        """Every tenant releases once (local noise); the server sums. Returns (sum, noise of the sum, s)."""
        t0 = time.perf_counter()
        noise = gram.ReleaseNoise(sigma=sigma, pop_share=rho, shares=1)
        total = gram.server_sum([gram.release(x, noise, noise_rng) for x in xs])
        return total, gram.ReleaseNoise(sigma=sigma * math.sqrt(k), pop_share=rho), time.perf_counter() - t0

    def prior_of(total: gram.ItemRelease, one: gram.ReleaseNoise) -> np.ndarray:
        assert total.popularity is not None
        std = one.pop_std() if one.sigma > 0 else 0.0
        return log_prior(total.popularity, std).astype(np.float32)

    for eps in eps_list:
        private = math.isfinite(eps)
        sig_full = gram.calibrate_release_sigma(target_epsilon=eps, delta=DELTA)  # whole ε, one release
        sig_rel = gram.calibrate_release_sigma(target_epsilon=args.release_share * eps, delta=DELTA)
        before = [(sig_rel, 1.0, 1)] if private else []
        head_sigmas = [sgd_sigma(eps, n, HEAD, before) if private else 0.0 for n in sizes]
        mlp_sigmas = [sgd_sigma(eps, n, MLP, []) if private else 0.0 for n in sizes]
        if private:
            plan = plan_round(
                sizes[0], LocalTrainConfig(batch_users=HEAD.batch_users, local_epochs=HEAD.local_epochs)
            )
            spent = total_epsilon([*before, (head_sigmas[0], plan.sample_rate, plan.steps * HEAD.rounds)])
        else:
            spent = math.inf
        acct = {"sigma_release": round(sig_rel, 4), "sigma_sgd": round(head_sigmas[0], 4), "eps_spent": spent}

        # ---- references: the whole ε on one stage
        total, one, t_rel = do_release(sig_full, 1.0)
        assert total.popularity is not None
        add(
            eps, "dp_popularity", DPPopularity().fit_released(total.popularity), t_rel, sigma_release=sig_full
        )
        total, one, t_rel = do_release(sig_full, 0.0)
        assert total.gram is not None
        t0 = time.perf_counter()
        ease = DPEASE(rule).fit_gram(
            total.gram,
            offdiag_std=one.offdiag_std() if private else 0.0,
            diag_std=one.diag_std() if private else 0.0,
            users=users,
        )
        assert ease.items is not None
        add(
            eps,
            "dp_ease",
            ease,
            t_rel + time.perf_counter() - t0,
            sigma_release=sig_full,
            m_items=len(ease.items),
        )
        # The first DP-EASE rule (ridge only, no spectral denoising; the default before commit 252a54a),
        # on the same release: post-processing, no extra budget.
        t0 = time.perf_counter()
        ridge = DPEASE(rule, denoise=False).fit_gram(
            total.gram,
            offdiag_std=one.offdiag_std() if private else 0.0,
            diag_std=one.diag_std() if private else 0.0,
            users=users,
        )
        add(eps, "dp_ease_ridge", ridge, t_rel + time.perf_counter() - t0, sigma_release=sig_full)
        if args.refs_only:
            log(
                f"  {name} seed {seed} ε={eps:g}: "
                + ", ".join(
                    f"{r['approach']} {r['hr@10']:.3f}"
                    for r in rows
                    if r["epsilon"] == eps and r["seed"] == seed
                )
            )
            write(args.out, rows)
            continue
        if not args.skip_mlp and (args.mlp_eps is None or eps in args.mlp_eps):
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model = mlp_model(catalog)
            fedavg_train(model, tenants, MLP, mlp_sigmas)
            add(
                eps,
                "mlp_all",
                ModelScorer(model, SamplingConfig()),
                time.perf_counter() - t0,
                sigma_sgd=round(mlp_sigmas[0], 4),
                params=trainable_params(model),
            )

        # ---- (a) public features + prior (ρ = 1 release at release_share·ε) + DP head
        total, one, t_rel = do_release(sig_rel, 1.0)
        prior = prior_of(total, one)
        add(eps, "a_prior", PriorScorer(prior.astype(np.float64)), t_rel, **acct)
        variants = [("a_head", feats)] + ([("a_text_head", feats_text)] if feats_text is not None else [])
        for label, f in variants:
            assert f is not None
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model, scorer_of = make_head(args.head, split.n_items, f, prior)
            fedavg_train(model, tenants, HEAD, head_sigmas)
            add(
                eps,
                label,
                scorer_of(),
                t_rel + time.perf_counter() - t0,
                params=trainable_params(model),
                **acct,
            )

        # ---- (b) one ρ = 0.2 release: prior + EigenGram item embeddings + DP head
        total, one, t_rel = do_release(sig_rel, args.rho)
        assert total.gram is not None
        t0 = time.perf_counter()
        prior_b = prior_of(total, one)
        emb, comps, eig = eigen_embeddings(
            total.gram,
            one.offdiag_std() if private else 0.0,
            one.diag_std() if private else 0.0,
            users,
            rule,
            args.eigen_dim,
        )
        t_fit = time.perf_counter() - t0
        add(eps, "b_prior", PriorScorer(prior_b.astype(np.float64)), t_rel, **acct)
        if private:  # without noise EigenGram is raw co-occurrence (see PRIVACY_UTILITY.md): not scored
            add(eps, "b_eigen", eig, t_rel + t_fit, components=comps, **acct)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model, scorer_of = make_head(args.head, split.n_items, emb, prior_b)
        fedavg_train(model, tenants, HEAD, head_sigmas)
        add(
            eps,
            "b_head",
            scorer_of(),
            t_rel + t_fit + time.perf_counter() - t0,
            components=comps,
            params=trainable_params(model),
            **acct,
        )
        log(
            f"  {name} seed {seed} ε={eps:g} (σ_rel {sig_rel:.3f}, σ_sgd {head_sigmas[0]:.3f}, "
            f"spent {spent:.3f}): "
            + ", ".join(
                f"{r['approach']} {r['hr@10']:.3f}" for r in rows if r["epsilon"] == eps and r["seed"] == seed
            )
        )
        write(args.out, rows)
    return rows


# ------------------------------------------------------------------ tables


ORDER = (
    "dp_popularity",
    "dp_ease",
    "dp_ease_ridge",
    "mlp_all",
    "a_prior",
    "a_head",
    "a_text_head",
    "b_prior",
    "b_eigen",
    "b_head",
)


def _eps_values(text: str) -> list[float]:
    return [math.inf if e.strip() in ("inf", "∞") else float(e) for e in text.split(",")]


def _eps(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], float(r["epsilon"]), r["approach"]), []).append(r)
    out = []
    for (ds, eps, approach), rs in groups.items():
        row: dict[str, Any] = {
            "dataset": ds,
            "epsilon": eps,
            "approach": approach,
            "hr@10": statistics.median(r["hr@10"] for r in rs),
            "ndcg@10": statistics.median(r["ndcg@10"] for r in rs),
            "hr_per_seed": "/".join(f"{r['hr@10']:.3f}" for r in rs),
            "seeds": len(rs),
        }
        for key in ("train_s", "eval_s", "components", "params", "m_items", "sigma_release", "sigma_sgd"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = statistics.median(vals)
        out.append(row)
    return out


def markdown(med: list[dict[str, Any]]) -> str:
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in med):
        eps_all = sorted({r["epsilon"] for r in med if r["dataset"] == ds}, reverse=True)
        eps_all = [e for e in eps_all if math.isinf(e)] + [e for e in eps_all if not math.isinf(e)]
        approaches = [a for a in ORDER if any(r["approach"] == a and r["dataset"] == ds for r in med)]
        lines += [f"### {ds}: full HR@10 (test), median of seeds", ""]
        lines.append("| ε | " + " | ".join(approaches) + " |")
        lines.append("|---" * (len(approaches) + 1) + "|")
        for eps in eps_all:
            cells = []
            for a in approaches:
                r = next(
                    (x for x in med if x["dataset"] == ds and x["epsilon"] == eps and x["approach"] == a),
                    None,
                )
                cells.append("—" if r is None else f"{r['hr@10']:.3f}")
            lines.append(f"| {'∞' if math.isinf(eps) else f'{eps:g}'} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"### {ds}: seconds per run (release + server fit + federated training; eval apart)",
            "",
        ]
        lines.append("| approach | train_s (median over ε, seeds) | eval_s | trainable params | extra |")
        lines.append("|---|---|---|---|---|")
        for a in approaches:
            rs = [x for x in med if x["dataset"] == ds and x["approach"] == a]
            extra = ""
            if a in ("b_eigen", "b_head"):
                extra = "components " + ", ".join(
                    f"ε={_eps(x['epsilon'])}: {x.get('components', '')}" for x in rs
                )
            lines.append(
                f"| {a} | {statistics.median(x['train_s'] for x in rs):.1f} | "
                f"{statistics.median(x['eval_s'] for x in rs):.1f} | "
                f"{rs[0].get('params', '—')} | {extra} |"
            )
        lines.append("")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a dp_head.csv, numbers parsed back (blank cells dropped)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v == "":
                    continue
                try:
                    row[k] = (
                        int(v)
                        if k in ("seed", "users", "items", "tenants", "components", "params", "m_items")
                        else float(v)
                    )
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


def write(out: Path, rows: list[dict[str, Any]]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    med = median_rows(rows)
    for path, table in ((out / "dp_head.csv", rows), (out / "dp_head_median.csv", med)):
        keys = list(dict.fromkeys(k for r in table for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(table)
    text = markdown(med)
    (out / "dp_head.md").write_text(text + "\n", encoding="utf-8")
    return text


def main() -> None:
    global HEAD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("ml100k", "synthetic"), default="ml100k")
    ap.add_argument("--ml100k-path", default=ML100K)
    ap.add_argument("--users", type=int, default=20000, help="synthetic: total users (all tenants)")
    ap.add_argument("--items", type=int, default=1000, help="synthetic: catalogue size")
    ap.add_argument("--eps", default="8,3,1,inf")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed … first-seed+seeds-1")
    ap.add_argument(
        "--from-csv",
        nargs="*",
        type=Path,
        help="no run: rebuild the tables in --out from these dp_head.csv files",
    )
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--eval-users", type=int, default=5000)
    ap.add_argument(
        "--release-share", type=float, default=0.5, help="ε share the item release is calibrated to"
    )
    ap.add_argument(
        "--rho", type=float, default=0.2, help="(b): popularity share of the release's sensitivity"
    )
    ap.add_argument("--eigen-dim", type=int, default=16, help="(b): at most this many EigenGram components")
    ap.add_argument("--text", action="store_true", help="also (a) + hashed title words (a_text_head)")
    ap.add_argument("--text-buckets", type=int, default=16)
    ap.add_argument("--skip-mlp", action="store_true")
    ap.add_argument("--refs-only", action="store_true", help="only DP popularity and DP-EASE (both rules)")
    ap.add_argument("--head", choices=("mlp", "bilinear"), default="mlp", help="head on the frozen vectors")
    ap.add_argument("--mlp-eps", default="", help="run mlp_all only at these ε (default: all)")
    ap.add_argument("--head-rounds", type=int, default=HEAD.rounds)
    ap.add_argument("--head-epochs", type=float, default=HEAD.local_epochs, help="local epochs per round")
    ap.add_argument("--head-lr", type=float, default=HEAD.lr)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dphead/out"))
    args = ap.parse_args()
    if not 0 < args.release_share < 1:
        ap.error("--release-share must be in (0, 1)")
    if args.from_csv:
        print(write(args.out, [r for path in args.from_csv for r in read_rows(path)]))
        return
    torch.set_num_threads(args.threads)
    HEAD = Recipe(
        rounds=args.head_rounds, local_epochs=args.head_epochs, batch_users=HEAD.batch_users, lr=args.head_lr
    )
    print(
        f"head recipe {HEAD}, MLP recipe {MLP}, release share {args.release_share}, ρ(b) {args.rho}",
        flush=True,
    )
    eps_list = _eps_values(args.eps)
    args.mlp_eps = _eps_values(args.mlp_eps) if args.mlp_eps else None
    t0 = time.perf_counter()
    from fedrec.simulations.reports.frontier import load_path, load_synthetic

    if args.data == "ml100k":
        split, catalog = load_path(Path(args.ml100k_path))
        name = "ml-100k"
    else:
        split, catalog = load_synthetic(args.users, args.items, 0)
        name = f"synthetic-{args.users}"
    print(
        f"{name}: {split.n_users} users, {split.n_items} items ({time.perf_counter() - t0:.1f}s to load)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_seed(name, split, catalog, eps_list, seed, args, lambda s: print(s, flush=True), rows)
    print(write(args.out, rows))
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()

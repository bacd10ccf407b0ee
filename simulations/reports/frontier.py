"""The privacy–utility frontier: full HR@10 vs ε of the one-shot DP approaches, per data-set size.

For each data set (synthetic with 1 000 / 10 000 / 100 000 users, optionally ml-100k), each seed and
each ε, in process:

1. partition the users into ``tenants`` tenants (iid, the seed);
2. every tenant computes its unit-norm user rows and releases ONCE (``fedrec.privacy.gram``): a DP popularity
   vector (ρ = 1) or a noisy Gram (ρ = 0) at σ calibrated for (ε, δ) at sensitivity 1 — each approach
   spends the whole ε on its own release (the automatic choice is made before anything is released);
3. the server sums the releases and fits DP popularity / DP-EASE (the rule of ``fedrec.shared_model.dp_item``);
4. evaluation on the test protocol (full ranking), on at most ``eval_users`` test users (a fixed random
   sample per seed; all users when fewer).

Two noise modes: ``local`` (each tenant adds σ; the sum carries σ·√k — today's protocol) and
``distributed`` (each tenant adds σ/√k; the sum carries σ — what SecAgg+ enables).

The "DP MLP" column (``frontier_mlp``) is different in kind: each of its points is one whole federated
run of the product's loop (prepare, release, DP-SGD rounds, exact evaluation), training the MLP that
``auto`` would train on that data set, at the same ε per tenant.

Outputs (``write_outputs``): ``frontier.csv`` (every run), ``frontier_median.csv`` and ``frontier.md``
(median over seeds, with the automatic choice), ``frontier.png``.
"""

from __future__ import annotations

import csv
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.privacy import gram
from fedrec.shared_model.baselines import DPPopularity, Popularity
from fedrec.shared_model.choose import choose
from fedrec.shared_model.data import Catalog, UserSplit
from fedrec.shared_model.dp_item import DPEASE, DPEASERule, EigenGram
from fedrec.shared_model.evaluate import evaluate
from fedrec.simulations.data.partition import PartitionSpec, partition_users

APPROACHES = ("popularity", "dp_popularity", "dp_ease", "eigen_gram", "chosen")


@dataclass(frozen=True)
class FrontierConfig:
    users: tuple[int, ...] = (1000, 10000, 100000)
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, math.inf)
    seeds: int = 3
    tenants: int = 5
    items: int = 1000  # synthetic catalogue size
    delta: float = 1e-5
    accountant: str = "prv"
    eval_users: int = 5000  # test users evaluated per run (a fixed sample; s.e. ≤ 0.007 at HR 0.2)
    modes: tuple[str, ...] = ("local", "distributed")
    ml100k: Path | None = None
    given: tuple[str, str] | None = None  # a given split (TRAIN, TEST), read by load_given
    rule: DPEASERule = field(default_factory=DPEASERule)
    eigen: bool = True  # also score the Gram release with EigenGram (post-processing, same release)
    mlp: bool = True  # the "DP MLP" column (``frontier_mlp``: the MLP auto trains, one real run; slowest)
    mlp_modes: tuple[str, ...] = ("local", "distributed")  # the DP MLP's noise modes (one run each)
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (a long frontier run in parts)
    synth_profile: str = "movielens"  # the synthetic generator (``scale``: large catalogue, long tail)


@dataclass
class TenantStats:
    x: Any  # scipy CSR unit rows of the tenant
    users: int


def _hr(scorer: Any, split: UserSplit, catalog: Catalog, seed: int) -> tuple[float, float]:
    m = evaluate(scorer, split, catalog, which="test", seed=seed).to_metrics()["full"]
    return float(m["hr@10"]), float(m["ndcg@10"])


def _val_hr(scorer: Any, split: UserSplit, catalog: Catalog, seed: int) -> float:
    """Full HR@10 on the VALIDATION item (what ``auto``'s rule is judged on; test is only reported)."""
    return float(evaluate(scorer, split, catalog, which="val", seed=seed).to_metrics()["full"]["hr@10"])


def frontier_points(
    name: str,
    split: UserSplit,
    catalog: Catalog,
    cfg: FrontierConfig,
    seed: int,
    log: Callable[[str], None] = print,
    *,
    data: Any = None,
) -> list[dict[str, Any]]:
    """Every (ε, approach, mode) point of one data set and one seed, as flat rows. ``data`` (the
    ``PreparedData`` of ``split``) is what the DP MLP column's federation is prepared from: without it the
    column is left out."""
    rng_eval = np.random.default_rng([seed, 7])
    parts = partition_users(split, catalog, cfg.tenants, PartitionSpec("iid"), seed=seed, min_users=1)
    t0 = time.perf_counter()
    tenants = [
        TenantStats(gram.unit_rows(s.indptr, s.train_items, s.n_items), s.n_users)
        for s in (split.subset(p) for p in parts)
    ]
    t_rows = (time.perf_counter() - t0) / cfg.tenants
    test_users = np.flatnonzero(split.test_item >= 0)
    if len(test_users) > cfg.eval_users:
        test_users = np.sort(rng_eval.choice(test_users, cfg.eval_users, replace=False))
    ev = split.subset(test_users)
    sizes = [t.users for t in tenants]
    rows: list[dict[str, Any]] = []
    base = {
        "tenant_users": "/".join(str(n) for n in sizes),
        "dataset": name,
        "users": split.n_users,
        "items": split.n_items,
        "seed": seed,
        "tenants": cfg.tenants,
        "genres": len(catalog.genre_names),
    }
    noise_rng = np.random.default_rng()  # release noise: fresh, never from the public seed

    def add(eps: float, approach: str, mode: str, hr: float, ndcg: float, **extra: Any) -> None:
        rows.append(
            {
                **base,
                "epsilon": eps,
                "approach": approach,
                "mode": mode,
                "hr@10": hr,
                "ndcg@10": ndcg,
                **extra,
            }
        )

    hr, nd = _hr(Popularity().fit(split), ev, catalog, seed)
    for eps in cfg.epsilons:
        add(eps, "popularity", "none", hr, nd)
    releases: tuple[tuple[str, float], ...] = (("dp_popularity", 1.0), ("dp_ease", 0.0))
    if split.n_items > gram.MAX_GRAM_ITEMS:  # a dense N × N Gram release would not fit: no Gram columns
        releases = releases[:1]
        log(f"  {name}: {split.n_items} items > {gram.MAX_GRAM_ITEMS} (the gram limit): no DP-EASE/EigenGram")
    for eps in cfg.epsilons:
        sigma = gram.calibrate_release_sigma(target_epsilon=eps, delta=cfg.delta, accountant=cfg.accountant)  # type: ignore[arg-type]
        modes = cfg.modes if sigma > 0 else ("none",)
        for mode in modes:
            shares = cfg.tenants if mode == "distributed" else 1
            for approach, rho in releases:
                noise = gram.ReleaseNoise(sigma=sigma, pop_share=rho, shares=shares)
                t1 = time.perf_counter()
                total = gram.server_sum([gram.release(t.x, noise, noise_rng) for t in tenants])
                t_release = (time.perf_counter() - t1) / cfg.tenants + t_rows
                one = gram.ReleaseNoise(sigma=noise.local_sigma * math.sqrt(cfg.tenants), pop_share=rho)
                t2 = time.perf_counter()
                extra: dict[str, Any] = {"sigma": sigma, "sum_sigma": one.sigma}
                if approach == "dp_popularity":
                    assert total.popularity is not None
                    scorer: Any = DPPopularity().fit_released(total.popularity)
                else:
                    assert total.gram is not None
                    model = DPEASE(cfg.rule).fit_gram(
                        total.gram,
                        offdiag_std=one.offdiag_std() if sigma > 0 else 0.0,
                        diag_std=one.diag_std() if sigma > 0 else 0.0,
                        users=sum(sizes),
                    )
                    assert model.items is not None
                    extra.update(
                        m_items=len(model.items), lam=round(model.lam_used, 3), components=model.components
                    )
                    scorer = model
                t_fit = time.perf_counter() - t2
                t3 = time.perf_counter()
                hr, nd = _hr(scorer, ev, catalog, seed)
                t_eval = time.perf_counter() - t3
                if sigma > 0:
                    extra["val_hr@10"] = _val_hr(scorer, ev, catalog, seed)
                add(
                    eps,
                    approach,
                    mode,
                    hr,
                    nd,
                    release_s=round(t_release, 3),
                    server_fit_s=round(t_fit, 3),
                    eval_s=round(t_eval, 3),
                    **extra,
                )
                if approach == "dp_ease" and sigma > 0:
                    # Ablation on the same release: the first version's ridge-only rule (no denoising).
                    assert total.gram is not None
                    ridge = DPEASE(cfg.rule, denoise=False).fit_gram(
                        total.gram, offdiag_std=one.offdiag_std(), diag_std=one.diag_std(), users=sum(sizes)
                    )
                    hr, nd = _hr(ridge, ev, catalog, seed)
                    add(eps, "dp_ease_ridge", mode, hr, nd, lam=round(ridge.lam_used, 3), sigma=sigma)
                if approach == "dp_ease" and cfg.eigen and sigma > 0:
                    # The same release, post-processed differently: no extra noise, no extra budget.
                    # (Without noise nothing is truncated: EigenGram is then raw co-occurrence, skipped.)
                    assert total.gram is not None
                    t4 = time.perf_counter()
                    eig = EigenGram(cfg.rule).fit_gram(
                        total.gram,
                        offdiag_std=one.offdiag_std() if sigma > 0 else 0.0,
                        diag_std=one.diag_std() if sigma > 0 else 0.0,
                        users=sum(sizes),
                    )
                    t_fit = time.perf_counter() - t4
                    hr, nd = _hr(eig, ev, catalog, seed)
                    add(
                        eps,
                        "eigen_gram",
                        mode,
                        hr,
                        nd,
                        server_fit_s=round(t_fit, 3),
                        components=eig.components,
                        sigma=sigma,
                        sum_sigma=one.sigma,
                    )
        if cfg.mlp and data is not None and not math.isinf(eps):
            from fedrec.simulations.reports.frontier_mlp import run_dp_mlp

            for mode in cfg.mlp_modes:
                pt = run_dp_mlp(
                    data, epsilon_target=eps, delta=cfg.delta, seed=seed, tenants=cfg.tenants, mode=mode
                )
                add(eps, "dp_mlp", mode, pt.hr, pt.ndcg, **{"val_hr@10": pt.val_hr}, **pt.facts)
                log(
                    f"  {name} seed {seed} ε={eps:g}: DP MLP ({pt.facts['head']} head, {mode} noise) "
                    f"{pt.hr:.3f} in {pt.facts['prepare_s'] + pt.facts['train_s']:.0f}s"
                )
        log(
            f"  {name} seed {seed} ε={eps:g}: "
            + ", ".join(
                f"{r['approach']}/{r['mode']} {r['hr@10']:.3f}"
                for r in rows
                if r["epsilon"] == eps and r["approach"] != "popularity"
            )
        )
    return rows


def add_choices(
    rows: Sequence[dict[str, Any]], *, delta: float = 1e-5, accountant: str = "prv"
) -> list[dict[str, Any]]:
    """``rows`` plus one ``chosen`` row per (dataset, seed, ε, mode): what ``approach auto`` picks from
    public facts (tenant sizes, σ, noise mode, catalogue size, public genres; ``resolve_approach``), with
    the measured HR@10 of the picked approach. Where auto trains an MLP head the row is the DP MLP
    column's point (when the run has that column; else the release ``choose()`` picked)."""
    from fedrec.server.release import resolve_approach
    from fedrec.shared_model.runconfig import RunConfig

    @functools.cache
    def release_sigma(eps: float) -> float:  # one calibration per ε, not per (data set, seed, mode)
        if math.isinf(eps):
            return 0.0
        return gram.calibrate_release_sigma(target_epsilon=eps, delta=delta, accountant=accountant)  # type: ignore[arg-type]

    out = [r for r in rows if r["approach"] != "chosen"]
    keys = dict.fromkeys(
        (r["dataset"], r["seed"], float(r["epsilon"]), r["mode"]) for r in out if r["approach"] == "dp_ease"
    )
    for ds, seed, eps, mode in keys:
        same = [r for r in out if r["dataset"] == ds and r["seed"] == seed and float(r["epsilon"]) == eps]
        sizes = [int(n) for n in str(same[0]["tenant_users"]).split("/")]
        sigma = release_sigma(eps)
        nm = "distributed" if mode == "distributed" else "local"
        release = choose(sizes, sigma, noise_mode=nm, epsilon=eps)  # type: ignore[arg-type]
        picked, reason = str(release.approach), release.reason
        name = "dp_ease" if release.approach in ("ease", "dp_ease") else "dp_popularity"
        src = next(r for r in same if r["mode"] == mode and r["approach"] == name)
        mlp = next((r for r in same if r["mode"] == mode and r["approach"] == "dp_mlp"), None)
        if not math.isinf(eps) and mlp is not None:  # no DP: auto trains the federated MLP, not a point
            auto = resolve_approach(
                RunConfig(approach="auto", epsilon=eps, delta=delta, accountant=accountant),
                {f"tenant-{i}": n for i, n in enumerate(sizes)},
                int(same[0]["items"]),
                shares=len(sizes) if mode == "distributed" else 1,
                item_features=int(same[0].get("genres", 0) or 0) > 0,
            )
            if auto.approach == "mlp":
                src, picked, reason = mlp, f"mlp ({auto.head or 'genres'} head)", auto.reason
        keep = (
            "tenant_users",
            "dataset",
            "users",
            "items",
            "seed",
            "tenants",
            "epsilon",
            "mode",
            "hr@10",
            "ndcg@10",
        )
        out.append({**{k: src[k] for k in keep}, "approach": "chosen", "picked": picked, "reason": reason})
    return out


def synthetic_data(users: int, items: int, seed: int, profile: str = "movielens") -> Any:
    """The synthetic data set (``PreparedData``) of one frontier point."""
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.sources import synthetic
    from fedrec.simulations.data.synth_scale import SynthSpec

    spec = SynthSpec(profile=profile) if profile != "movielens" else None
    return prepare_dataset(synthetic(users=users, items=items, seed=seed, spec=spec))


def load_synthetic(
    users: int, items: int, seed: int, profile: str = "movielens"
) -> tuple[UserSplit, Catalog]:
    data = synthetic_data(users, items, seed, profile)
    return data.split, data.catalog


def path_data(path: Path) -> Any:
    from fedrec.simulations.data.dataset import prepare_dataset
    from fedrec.simulations.data.sources import load

    return prepare_dataset(load(str(path)))


def load_path(path: Path) -> tuple[UserSplit, Catalog]:
    data = path_data(path)
    return data.split, data.catalog


def given_data(train: str, test: str) -> Any:
    from fedrec.simulations.data.dataset import prepare_given_split
    from fedrec.simulations.data.sources import load_given_split

    return prepare_given_split(*load_given_split(train, test))


def run_frontier(cfg: FrontierConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, Callable[[int], Any]]] = [
        (
            f"synthetic-{u}"
            if cfg.synth_profile == "movielens"
            else f"synthetic-{cfg.synth_profile}-{u}x{cfg.items}",
            functools.partial(synthetic_data, u, cfg.items, profile=cfg.synth_profile),
        )
        for u in cfg.users
    ]
    if cfg.ml100k is not None:
        ml = functools.cache(functools.partial(path_data, cfg.ml100k))
        jobs.append(("ml-100k", lambda seed: ml()))
    if cfg.given is not None:
        given = functools.cache(functools.partial(given_data, *cfg.given))
        given()  # read and checked before any job: a bad TRAIN/TEST fails at once, not after the others
        jobs.append((f"given:{Path(cfg.given[0]).name}", lambda seed: given()))
    for name, loader in jobs:
        for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
            t0 = time.perf_counter()
            data = loader(seed)
            log(
                f"{name} seed {seed}: {data.split.n_users} users, {data.split.n_items} items "
                f"({time.perf_counter() - t0:.1f}s to load)"
            )
            rows += frontier_points(name, data.split, data.catalog, cfg, seed, log, data=data)
    return add_choices(rows, delta=cfg.delta, accountant=cfg.accountant)


def median_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median HR@10 over seeds per (dataset, ε, approach, mode), with the seed count."""
    groups: dict[tuple[str, float, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], float(r["epsilon"]), r["approach"], r["mode"]), []).append(r)
    out = []
    for (ds, eps, approach, mode), rs in groups.items():
        row = {
            "dataset": ds,
            "epsilon": eps,
            "approach": approach,
            "mode": mode,
            "hr@10": statistics.median(r["hr@10"] for r in rs),
            "ndcg@10": statistics.median(r["ndcg@10"] for r in rs),
            "seeds": len(rs),
        }
        if approach == "chosen":
            row["picked"] = "/".join(sorted({str(r["picked"]) for r in rs}))
        if approach == "dp_mlp":
            row["head"] = "/".join(sorted({str(r.get("head", "")) for r in rs}))
        for key in (
            "release_s",
            "server_fit_s",
            "eval_s",
            "m_items",
            "lam",
            "components",
            "val_hr@10",
            "train_s",
            "w",
            "sigma_sgd",
            "epsilon_spent",
            "prepare_s",
        ):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = statistics.median(vals)
        out.append(row)
    return out


def _eps_label(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def markdown(med: Sequence[dict[str, Any]]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for r in med))
    epsilons = sorted({r["epsilon"] for r in med})
    cols = [
        ("dp_popularity", "local", "DP popularity"),
        ("dp_ease", "local", "DP-EASE, local noise"),
        ("dp_ease", "distributed", "DP-EASE, distributed noise (SecAgg)"),
        ("dp_ease_ridge", "local", "DP-EASE ridge-only, local"),
        ("dp_ease_ridge", "distributed", "DP-EASE ridge-only, distributed"),
        ("eigen_gram", "local", "EigenGram, local"),
        ("eigen_gram", "distributed", "EigenGram, distributed"),
        ("dp_mlp", "local", "DP MLP, local noise"),
        ("dp_mlp", "distributed", "DP MLP, distributed noise (SecAgg)"),
        ("chosen", "local", "automatic choice, local"),
        ("chosen", "distributed", "automatic choice, distributed"),
    ]
    if not any(r["approach"] == "dp_mlp" for r in med):  # run with --no-mlp
        cols = [c for c in cols if c[0] != "dp_mlp"]
    lines = ["Full-ranking HR@10, median of seeds (user-level, δ = 1e-5, PRV; ε = ∞: no noise).", ""]
    for ds in datasets:
        pop = next((r for r in med if r["dataset"] == ds and r["approach"] == "popularity"), None)
        lines.append(f"### {ds}" + (f" (popularity {pop['hr@10']:.3f})" if pop else ""))
        lines.append("")
        lines.append("| ε | " + " | ".join(c[2] for c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for eps in epsilons:
            cells = []
            for approach, mode, _ in cols:
                m = mode if not math.isinf(eps) else "none"
                r = next(
                    (
                        x
                        for x in med
                        if x["dataset"] == ds
                        and x["epsilon"] == eps
                        and x["approach"] == approach
                        and x["mode"] == m
                    ),
                    None,
                )
                if r is None:
                    cells.append("—")
                else:
                    cell = f"{r['hr@10']:.3f}"
                    if approach == "chosen":
                        cell += f" ({r.get('picked', '')})"
                    if approach == "dp_mlp":
                        cell += f" ({r.get('head', '')} head)"
                    cells.append(cell)
            lines.append(f"| {_eps_label(eps)} | " + " | ".join(cells) + " |")
        lines.append("")
    val = [r for r in med if "val_hr@10" in r and r["mode"] in ("local", "distributed")]
    if any(r["approach"] == "dp_mlp" for r in val):
        lines += [
            "Validation full HR@10, median of seeds: the figures `auto`'s rule is judged on "
            "(the tables above are test, reported only).",
            "",
            "| data set | ε | noise | DP popularity | DP-EASE | DP MLP | best on validation |",
            "|---|---|---|---|---|---|---|",
        ]
        names = {"dp_popularity": "DP popularity", "dp_ease": "DP-EASE", "dp_mlp": "DP MLP"}
        for ds in datasets:
            for eps in epsilons:
                for mode in ("local", "distributed"):
                    got = {
                        r["approach"]: r["val_hr@10"]
                        for r in val
                        if r["dataset"] == ds and r["epsilon"] == eps and r["mode"] == mode
                    }
                    if "dp_mlp" not in got:
                        continue
                    cells = [f"{got[a]:.3f}" if a in got else "—" for a in names]
                    best = max((a for a in names if a in got), key=lambda a: got[a])
                    lines.append(
                        f"| {ds} | {_eps_label(eps)} | {mode} | " + " | ".join(cells) + f" | {names[best]} |"
                    )
        lines.append("")
    return "\n".join(lines)


def plot(med: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in med))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    finite = sorted({r["epsilon"] for r in med if not math.isinf(r["epsilon"])})
    inf_x = (max(finite) * 2) if finite else 1.0
    # One colour per series on every panel, and one legend for the figure (a series missing from the
    # last panel, or coloured differently there, would otherwise be unreadable).
    series = (
        ("dp_popularity", "local", "DP popularity", "o-", "C0"),
        ("dp_ease", "local", "DP-EASE (local noise)", "s-", "C1"),
        ("dp_ease", "distributed", "DP-EASE (distributed noise)", "^--", "C2"),
        ("eigen_gram", "local", "EigenGram (local noise)", "x:", "C3"),
        ("dp_mlp", "local", "DP MLP (local noise)", "D-", "C4"),
        ("dp_mlp", "distributed", "DP MLP (distributed noise)", "d--", "C5"),
    )
    handles: dict[str, Any] = {}
    for ax, ds in zip(axes[0], datasets, strict=True):
        for approach, mode, label, style, color in series:
            pts = sorted(
                (r["epsilon"] if not math.isinf(r["epsilon"]) else inf_x, r["hr@10"])
                for r in med
                if r["dataset"] == ds
                and r["approach"] == approach
                and (r["mode"] == mode or r["mode"] == "none")
            )
            if pts:
                (handles[label],) = ax.plot(*zip(*pts, strict=True), style, color=color, label=label)
        pop = [r["hr@10"] for r in med if r["dataset"] == ds and r["approach"] == "popularity"]
        if pop:
            handles["popularity (no DP)"] = ax.axhline(
                pop[0], color="grey", ls=":", label="popularity (no DP)"
            )
        ax.set_xscale("log")
        ticks = [*finite, inf_x]
        ax.set_xticks(ticks)
        ax.set_xticklabels([*(f"{e:g}" for e in finite), "∞"])
        ax.minorticks_off()
        ax.set_xlabel("ε (user-level, δ = 1e-5)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("full HR@10 (test), median of seeds")
    order = [lbl for *_, lbl, _, _ in series if lbl in handles] + [
        k for k in handles if k == "popularity (no DP)"
    ]
    fig.legend([handles[k] for k in order], order, loc="lower center", ncol=min(len(order), 7), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows of earlier ``frontier.csv`` files (numbers back to numbers), to render them together."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for raw in csv.DictReader(f):
                row: dict[str, Any] = {}
                for k, v in raw.items():
                    if v is None or v == "":
                        continue
                    if k in ("tenant_users", "dataset", "approach", "mode", "picked", "reason"):
                        row[k] = v
                        continue
                    try:
                        row[k] = int(v) if k in ("seed", "users", "items", "tenants") else float(v)
                    except ValueError:
                        row[k] = v
                rows.append(row)
    return rows


def write_outputs(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    med = median_table(rows)
    paths = [out / "frontier.csv", out / "frontier_median.csv", out / "frontier.md", out / "frontier.png"]
    for path, table in ((paths[0], rows), (paths[1], med)):
        keys = list(dict.fromkeys(k for r in table for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in table:
                w.writerow(r)
    paths[2].write_text(markdown(med) + "\n", encoding="utf-8")
    plot(med, paths[3])
    return paths

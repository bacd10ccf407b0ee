"""The ``scale`` synthetic generator: shape, determinism, low-rank structure, CLI flags and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.sources import load, synthetic, write_synthetic
from fedrec.simulations.data.synth_scale import SynthSpec
from fedrec.simulations.errors import DataError

SCALE = SynthSpec(profile="scale")
FEDREC = [sys.executable, "-m", "fedrec.simulations.cli.main"]


def test_shape_long_tail_and_items_per_user() -> None:
    ds = synthetic(users=3000, items=8000, seed=1, spec=SCALE)
    inter = ds.interactions
    per_user = inter.groupby("user").size()
    assert per_user.min() >= SCALE.min_per_user
    assert 15 <= per_user.median() <= 25  # ~15–30 items for most users
    assert per_user.quantile(0.25) >= 10 and per_user.quantile(0.75) <= 35
    assert not inter.duplicated(["user", "item"]).any()  # repeated draws collapse
    counts = inter["item"].value_counts().to_numpy()  # descending
    top1pct = counts[: len(ds.items) // 100].sum() / counts.sum()
    assert 0.08 <= top1pct <= 0.5  # long tail: 1% of the items hold a large share, not everything
    assert (counts <= 2).sum() > 0.2 * len(counts)  # … and many items are rare
    assert inter["rating"].isna().all() and ds.users is None  # implicit log
    assert (inter.groupby("user")["timestamp"].is_monotonic_increasing).all()


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    a = synthetic(users=400, items=2000, seed=3, spec=SCALE).interactions
    b = synthetic(users=400, items=2000, seed=3, spec=SCALE).interactions
    c = synthetic(users=400, items=2000, seed=4, spec=SCALE).interactions
    assert a.equals(b)
    assert not a.equals(c)


def test_tastes_are_low_rank_plus_noise() -> None:
    # One topic per user (tiny Dirichlet concentration), no noise: a user's items share one topic,
    # which the generator writes as the item's genre (topic mod 18, rank 10 ≤ 18: one genre per topic).
    pure = SynthSpec(profile="scale", rank=10, noise=0.0, alpha=1e-4)
    ds = synthetic(users=300, items=3000, seed=0, spec=pure)
    genre = ds.items["genres"]
    genres_per_user = (
        ds.interactions.assign(g=ds.interactions["item"].map(genre)).groupby("user")["g"].nunique()
    )
    assert (genres_per_user == 1).mean() > 0.95
    # With noise, draws from the global popularity mix other topics in.
    noisy = synthetic(users=300, items=3000, seed=0, spec=SynthSpec(profile="scale", rank=10, noise=0.5))
    g2 = noisy.interactions.assign(g=noisy.interactions["item"].map(noisy.items["genres"]))
    assert (g2.groupby("user")["g"].nunique() > 1).mean() > 0.9


def test_scale_set_prepares_and_round_trips_through_csv(tmp_path: Path) -> None:
    ds = synthetic(users=200, items=1500, seed=2, spec=SCALE)
    write_synthetic(ds, tmp_path / "syn")
    back = load(str(tmp_path / "syn"))
    assert len(back.interactions) == len(ds.interactions)
    data = prepare_dataset(ds)
    assert data.split.n_users == 200
    assert data.catalog.n_items <= 1500


def test_bad_spec_is_one_clear_error() -> None:
    for kwargs, needle in (
        ({"profile": "huge"}, "--synth-profile"),
        ({"profile": "scale", "noise": 1.5}, "--synth-noise"),
        ({"profile": "scale", "rank": 0}, "--synth-rank"),
        ({"profile": "scale", "per_user": 1}, "--synth-per-user"),
        ({"profile": "scale", "alpha": 0.0}, "--synth-alpha"),
        ({"profile": "scale", "alpha": float("nan")}, "--synth-alpha"),
    ):
        with pytest.raises(DataError, match=needle):
            SynthSpec(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="synthetic only"):
        load("/work/shared/data/ml-100k", synth=SCALE)


def test_cli_data_synth_scale_writes_the_generator_output(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    args = ["data", "synth", "--out", str(out), "--users", "150", "--items", "900", "--seed", "5"]
    proc = subprocess.run(
        [
            *FEDREC,
            *args,
            "--synth-profile",
            "scale",
            "--synth-per-user",
            "12",
            "--synth-rank",
            "8",
            "--synth-alpha",
            "0.003",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    want = synthetic(
        users=150, items=900, seed=5, spec=SynthSpec(profile="scale", per_user=12.0, rank=8, alpha=0.003)
    ).interactions
    got = load(str(out)).interactions
    assert len(got) == len(want)
    assert np.array_equal(got["item"].to_numpy(), want["item"].to_numpy())


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--synth-per-user", "3"], "--synth-profile scale only"),
        (["--synth-profile", "scale", "--synth-noise", "2"], "--synth-noise"),
        (["--synth-alpha", "0.003"], "--synth-profile scale only"),
        (["--synth-profile", "scale", "--synth-alpha", "-1"], "--synth-alpha"),
    ],
)
def test_cli_bad_synth_flags_exit_2_and_write_nothing(tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [*FEDREC, "centralized", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1]
    assert list(tmp_path.iterdir()) == []


def _recall20(model, indptr: np.ndarray, items: np.ndarray, held: list[np.ndarray]) -> float:  # type: ignore[no-untyped-def]
    import torch

    from fedrec.shared_model.ranking import mask_items, top_k

    n = model.cfg.n_items
    users = [u for u in range(len(held)) if len(held[u])]
    hists = [items[indptr[u] : indptr[u + 1]] for u in users]
    h = np.full((len(users), max(len(x) for x in hists)), n, dtype=np.int64)
    for r, x in enumerate(hists):
        h[r, : len(x)] = x
    s = mask_items(model.score_all(torch.from_numpy(h)).numpy().astype(np.float64), hists)
    top, _ = top_k(s, 20)
    return float(np.mean([np.isin(held[u], top[r]).sum() / len(held[u]) for r, u in enumerate(users)]))


def test_default_shape_has_item_item_structure_a_gram_model_can_use() -> None:
    # The reason the defaults exist (module docstring): non-private EASE on the top items beats
    # popularity clearly (the first version's 40 flat topics gave 1.2×), and broad topics draw more users.
    from fedrec.privacy import gram
    from fedrec.server.release import fit_release
    from fedrec.shared_model.item_model import ItemReleaseModel

    users, n = 3000, 4000
    raw = synthetic(users=users, items=n, seed=5, spec=SCALE).interactions
    u = raw["user"].astype(np.int64).to_numpy() - 1
    i = raw["item"].astype(np.int64).to_numpy() - 1
    held_out = np.random.default_rng(0).random(len(u)) < 0.2
    order = np.argsort(u, kind="stable")
    u, i, held_out = u[order], i[order], held_out[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(u[~held_out], minlength=users))])
    tr = i[~held_out]
    held = [i[held_out & (u == k)] for k in range(users)]
    pop = np.asarray(gram.unit_rows(indptr, tr, n).sum(axis=0)).ravel()
    sel = gram.select_top(pop, 800)
    xs = gram.selected_rows(indptr, tr, n, sel)
    ease = fit_release(
        {"gram": gram.pack_gram((xs.T @ xs).toarray())}, "dp_two_stage", n_items=n, users=users,
        sigma_sum=0.0, dp=False, stage=2, selection=sel, prior=np.log1p(pop),
    )  # fmt: skip
    r_pop = _recall20(ItemReleaseModel.from_popularity(pop, 0.0), indptr, tr, held)
    r_ease = _recall20(ease, indptr, tr, held)
    assert r_ease >= 1.4 * r_pop, (r_ease, r_pop)

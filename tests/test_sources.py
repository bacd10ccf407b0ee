"""Data sources: every loader on tiny fixtures, content detection, errors, synthetic, round trip, download."""

from __future__ import annotations

import http.server
import io
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.shared_model.errors import FedrecError
from fedrec.simulations.data.sources import (
    GENRES,
    OCCUPATIONS,
    RawDataset,
    download,
    load,
    synthetic,
    write_synthetic,
)
from fedrec.simulations.errors import DataError

ML100K = Path("/work/shared/data/ml-100k")


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _check_schema(ds: RawDataset) -> None:
    inter = ds.interactions
    assert list(inter.columns) == ["user", "item", "rating", "timestamp"]
    assert inter["user"].dtype == "str" and inter["item"].dtype == "str"
    assert inter["rating"].dtype == np.float64 and inter["timestamp"].dtype == np.int64
    assert ds.items.index.name == "item" and ds.items.index.dtype == "str"
    assert list(ds.items.columns) == ["title", "genres", "year"]
    assert ds.items["year"].dtype == np.int64
    assert set(inter["item"]) <= set(ds.items.index)
    if ds.users is not None:
        assert ds.users.index.name == "user"
        assert set(inter["user"]) <= set(ds.users.index)
        if "age" in ds.users:
            assert ds.users["age"].dtype == np.float64


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ml100k-like"
    _write(
        d / "u.data", "1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250000\n2\t99\t1\t881250001\n"
    )
    flags_a = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)  # Animation, Children's, Comedy
    flags_b = "|".join(["1"] + ["0"] * 18)  # only "unknown" -> no genre
    _write(
        d / "u.item",
        f"10|Amélie (2001)|01-Jan-2001||http://x|{flags_a}\n20|unknown|||http://y|{flags_b}\n",
        encoding="latin-1",
    )
    _write(d / "u.user", "1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    return d


@pytest.fixture
def ml1m_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ml1m-like"
    _write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    _write(
        d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Señor James (1996)::Animation|Children's\n",
        encoding="latin-1",
    )
    _write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    return d


def _latest_dir(tmp_path: Path, *, users: bool) -> Path:
    d = tmp_path / ("latest-users" if users else "latest")
    _write(
        d / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n2,1,2.5,964982224\n",
    )
    _write(
        d / "movies.csv",
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
        '3,"Heat, The (1995)",(no genres listed)\n',
    )
    if users:
        _write(
            d / "users.csv", "userId,age,gender,occupation,zip\n1,34,F,writer,02139\n2,19,M,student,90210\n"
        )
    return d


# ------------------------------------------------------------------------------ MovieLens layouts


def test_ml100k_layout(ml100k_dir: Path) -> None:
    ds = load(str(ml100k_dir))
    _check_schema(ds)
    assert ds.source == f"movielens-100k:{ml100k_dir}"
    assert ds.interactions["rating"].tolist() == [5.0, 3.0, 4.0, 1.0]
    assert ds.interactions["timestamp"].iloc[0] == 881250949
    assert ds.items.loc["10"].tolist() == ["Amélie (2001)", "Animation|Children's|Comedy", 2001]
    assert ds.items.loc["20"].tolist() == ["unknown", "", 0]
    assert ds.items.loc["99"].tolist() == ["", "", 0]  # rated but missing from u.item
    assert ds.users is not None
    assert ds.users.loc["2"].tolist() == [53.0, "F", "other", "T8H1N"]


def test_ml100k_genre_names_from_u_genre(ml100k_dir: Path) -> None:
    names = ["unknown", *[f"G{i}" for i in range(1, 19)]]
    _write(ml100k_dir / "u.genre", "".join(f"{n}|{i}\n" for i, n in enumerate(names)) + "\n")
    assert load(str(ml100k_dir)).items.loc["10", "genres"] == "G3|G4|G5"


def test_ml1m_layout(ml1m_dir: Path) -> None:
    ds = load(str(ml1m_dir))
    _check_schema(ds)
    assert ds.source.startswith("movielens-1m:")
    assert ds.items.loc["661"].tolist() == ["Señor James (1996)", "Animation|Children's", 1996]
    assert ds.items.loc["1193", "year"] == 1975
    assert ds.users is not None
    assert ds.users.loc["1"].tolist() == [1.0, "F", "K-12 student", "48067"]  # age group code kept
    assert ds.users.loc["2", "occupation"] == "self-employed"


def test_ml10m_layout_without_users(ml1m_dir: Path) -> None:
    (ml1m_dir / "users.dat").unlink()
    ds = load(str(ml1m_dir))
    assert ds.users is None and ds.source.startswith("movielens-10m:")


@pytest.mark.parametrize("users", [False, True])
def test_latest_layout(tmp_path: Path, users: bool) -> None:
    d = _latest_dir(tmp_path, users=users)
    ds = load(str(d))
    _check_schema(ds)
    assert ds.interactions["rating"].tolist() == [4.0, 4.5, 2.5]
    assert ds.items.loc["3"].tolist() == ["Heat, The (1995)", "", 1995]  # "(no genres listed)" -> ""
    if users:
        assert ds.users is not None
        assert ds.users.loc["1"].tolist() == [34.0, "F", "writer", "02139"]  # zip keeps its leading 0
    else:
        assert ds.users is None


@pytest.mark.parametrize(
    ("layout", "name"), [("100k", "u.data"), ("1m", "ratings.dat"), ("latest", "ratings.csv")]
)
def test_rating_file_path_uses_its_folder(
    tmp_path: Path, ml100k_dir: Path, ml1m_dir: Path, layout: str, name: str
) -> None:
    folder = {"100k": ml100k_dir, "1m": ml1m_dir, "latest": _latest_dir(tmp_path, users=True)}[layout]
    via_file = load(str(folder / name))
    via_folder = load(str(folder))
    pd.testing.assert_frame_equal(via_file.interactions, via_folder.interactions)
    pd.testing.assert_frame_equal(via_file.items, via_folder.items)
    assert via_file.users is not None


def test_detection_is_by_content_not_name(tmp_path: Path) -> None:
    f = _write(tmp_path / "export" / "whatever.txt", "7::70::3::100\n8::70::4::200\n")
    ds = load(str(f))
    assert ds.source.startswith("movielens-10m:") and ds.interactions["user"].tolist() == ["7", "8"]
    tabbed = _write(tmp_path / "other" / "log.tsv", "1\t2\t3\t4\n")
    assert load(str(tabbed)).source.startswith("movielens-100k:")


def test_unzipped_archive_folder_is_entered(tmp_path: Path) -> None:
    _latest_dir(tmp_path / "dl", users=False)
    assert len(load(str(tmp_path / "dl")).interactions) == 3


# ---------------------------------------------------------------------------- generic CSV / Parquet


def _generic_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer": [101, 101, 102],
            "sku": ["A-1", "B-2", "A-1"],
            "stars": [5.0, None, 3.0],
            "when": ["2024-01-02T03:04:05Z", "2024-01-03T00:00:00Z", "2024-01-01T00:00:00Z"],
            "other": [1, 2, 3],
        }
    )


def test_generic_csv_with_columns(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    _generic_frame().to_csv(f, index=False)
    ds = load(str(f), columns="user=customer,item=sku,rating=stars,timestamp=when")
    _check_schema(ds)
    assert ds.source == f"csv:{f}" and ds.users is None
    assert ds.interactions["user"].tolist() == ["101", "101", "102"]
    assert np.isnan(ds.interactions["rating"].iloc[1])
    assert ds.interactions["timestamp"].iloc[0] == int(pd.Timestamp("2024-01-02T03:04:05Z").timestamp())
    assert ds.items.loc["B-2"].tolist() == ["", "", 0]


def test_generic_parquet_without_rating_or_timestamp(tmp_path: Path) -> None:
    f = tmp_path / "log.parquet"
    frame = _generic_frame()
    frame["customer"] = frame["customer"].astype(np.float64)  # ids stored as floats stay "101"
    frame.to_parquet(f)
    ds = load(str(f), columns="user=customer, item=sku")
    _check_schema(ds)
    assert ds.interactions["user"].tolist() == ["101", "101", "102"]
    assert ds.interactions["rating"].isna().all()
    assert ds.interactions["timestamp"].tolist() == [0, 1, 2]  # row order


# ---------------------------------------------------------------------------------------- errors


def _error(src: str, **kwargs: str) -> str:
    with pytest.raises(DataError) as info:
        load(src, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, FedrecError)
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg
    return msg


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in _error(str(tmp_path / "nope"))


def test_unknown_folder_lists_expected_files(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "notes.txt", "hello\n")
    _write(tmp_path / "d" / "more.txt", "hello\n")
    msg = _error(str(tmp_path / "d"))
    assert "u.data" in msg and "ratings.dat" in msg and "ratings.csv" in msg


def test_unknown_file_format(tmp_path: Path) -> None:
    assert "unknown format" in _error(str(_write(tmp_path / "x.txt", "hello world\n")))


def test_csv_needs_columns_and_lists_them(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    _generic_frame().to_csv(f, index=False)
    msg = _error(str(f))
    assert "--columns" in msg and "customer, sku, stars, when, other" in msg


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_wrong_column_name_lists_available(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"log.{suffix}"
    frame = _generic_frame()
    frame.to_csv(f, index=False) if suffix == "csv" else frame.to_parquet(f)
    msg = _error(str(f), columns="user=customer,item=product")
    assert "item=product" in msg and "customer, sku, stars, when, other" in msg


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("user=customer;item=sku", "malformed"),
        ("user=customer,item", "malformed"),
        ("user=customer,thing=sku", "unknown field"),
        ("user=customer,user=sku", "twice"),
        ("user=customer", "lacks item"),
    ],
)
def test_malformed_columns(tmp_path: Path, spec: str, words: str) -> None:
    f = tmp_path / "log.csv"
    _generic_frame().to_csv(f, index=False)
    assert words in _error(str(f), columns=spec)


def test_columns_on_a_folder(ml100k_dir: Path) -> None:
    assert "single .csv/.parquet file" in _error(str(ml100k_dir), columns="user=a,item=b")


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("log.csv", "", "is empty"),
        ("log.csv", "customer,sku\n", "no interactions"),
        ("log.csv", "customer,sku,stars\n1,a,5\n2,b,great\n", "line 3 has a rating that is not a number"),
        ("log.csv", "customer,sku,when\n1,a,yesterday-ish\n", "neither unix seconds nor a date"),
        ("log.csv", "customer,sku\n1,\n", "empty item"),
    ],
)
def test_bad_generic_content(tmp_path: Path, name: str, text: str, words: str) -> None:
    f = _write(tmp_path / name, text)
    header = text.splitlines()[0].split(",") if text else []
    spec = "user=customer,item=sku" + "".join(
        f",{k}={c}" for k, c in (("rating", "stars"), ("timestamp", "when")) if c in header
    )
    msg = _error(str(f), columns=spec)
    assert words in msg and f.name in msg


def test_empty_and_unparsable_movielens_files(tmp_path: Path, ml100k_dir: Path, ml1m_dir: Path) -> None:
    empty = _latest_dir(tmp_path, users=False) / "ratings.csv"
    empty.write_text("userId,movieId,rating,timestamp\n")
    assert "no interactions" in _error(str(empty.parent))
    _write(ml100k_dir / "u.data", "1\t10\t5\t881250949\n1\t20\tx\t881250950\n")
    assert "line 2 has a rating that is not a number" in _error(str(ml100k_dir))
    _write(ml1m_dir / "ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    assert "line 2 has a timestamp that is not a number ('')" in _error(str(ml1m_dir))
    _write(ml1m_dir / "ratings.dat", "1::1193::5::978300760\n1::661::3::9::9\n")
    assert "malformed row" in _error(str(ml1m_dir))
    _write(ml100k_dir / "u.data", "user item rating\n")
    assert "does not look like a MovieLens u.data" in _error(str(ml100k_dir))


# ------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic() -> None:
    a, b = synthetic(users=300, items=200, seed=5), synthetic(users=300, items=200, seed=5)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert a.users is not None and b.users is not None
    pd.testing.assert_frame_equal(a.users, b.users)
    c = synthetic(users=300, items=200, seed=6)
    assert not a.interactions.equals(c.interactions)
    assert load("synthetic", seed=5, synth_users=300, synth_items=200).interactions.equals(a.interactions)


def test_synthetic_shape_and_ranges() -> None:
    ds = synthetic(seed=0)  # the default: 2000 users x 1000 items
    _check_schema(ds)
    inter, items, users = ds.interactions, ds.items, ds.users
    assert users is not None
    assert ds.source == "synthetic(seed=0,users=2000,items=1000)"
    assert len(items) == 1000 and len(users) == 2000 and inter["user"].nunique() == 2000
    assert not inter.duplicated(["user", "item"]).any()  # drawn without replacement
    per_user = inter.groupby("user").size()
    assert per_user.min() >= 5 and per_user.max() <= 400
    assert 30 <= per_user.median() <= 50
    assert set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0} and 3.0 < inter["rating"].mean() < 4.2
    assert (inter.groupby("user")["timestamp"].diff().dropna() > 0).all()  # strictly increasing per user
    assert inter["timestamp"].max() - inter["timestamp"].min() <= 2 * 365 * 86400 + 400
    n_genres = items["genres"].str.split("|").str.len()
    assert n_genres.between(1, 3).all() and set("|".join(items["genres"]).split("|")) <= set(GENRES)
    assert items["title"].iloc[16] == f"Synthetic Movie 17 ({items['year'].iloc[16]})"
    assert items["year"].between(1920, 2020).all()
    assert users["age"].between(7, 73).all() and set(users["gender"]) == {"M", "F"}
    assert set(users["occupation"]) <= set(OCCUPATIONS)
    assert users["zip"].str.fullmatch(r"\d{5}").all()
    # power law: the 10% most popular items hold a large share of the interactions
    counts = inter["item"].value_counts()
    assert counts.iloc[:100].sum() / counts.sum() > 0.3
    # small catalogues cap interactions at items/2
    small = synthetic(users=50, items=20, seed=1).interactions.groupby("user").size()
    assert small.max() <= 10


def test_synthetic_is_personalized() -> None:
    """EASE beats popularity on each user's time-last item clearly, but not trivially: it is learnable."""
    ds = synthetic(users=1500, items=400, seed=2)
    inter = ds.interactions.sort_values(["user", "timestamp"], kind="stable")
    u = inter["user"].astype(int).to_numpy() - 1
    i = inter["item"].astype(int).to_numpy() - 1
    last = np.r_[u[1:] != u[:-1], True]
    x = np.zeros((1500, 400))
    x[u[~last], i[~last]] = 1.0
    test = np.zeros(1500, dtype=np.int64)
    test[u[last]] = i[last]

    def hr10(scores: np.ndarray) -> float:
        scores = np.where(x > 0, -np.inf, scores)
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        return float((top == test[:, None]).any(axis=1).mean())

    pop = hr10(np.broadcast_to(x.sum(0), x.shape))
    p = np.linalg.inv(x.T @ x + 200.0 * np.eye(400))
    ease = -p / np.diag(p)
    np.fill_diagonal(ease, 0.0)
    assert 1.8 * pop < hr10(x @ ease) < 4.0 * pop


def test_synthetic_speed() -> None:
    start = time.perf_counter()
    ds = synthetic(users=10_000, items=2_000, seed=0)
    assert time.perf_counter() - start < 10.0
    assert len(ds.interactions) > 250_000


def test_synthetic_rejects_tiny_sizes() -> None:
    with pytest.raises(DataError, match="at least 1 user and 10 items"):
        synthetic(users=0)


# ------------------------------------------------------------------------------ write_synthetic


def test_write_synthetic_round_trip(tmp_path: Path) -> None:
    ds = synthetic(users=200, items=120, seed=9)
    out = tmp_path / "synth"
    files = write_synthetic(ds, out)
    assert [f.name for f in files] == ["ratings.csv", "movies.csv", "users.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temp folder left behind
    back = load(str(out))
    assert back.source == f"movielens-latest:{out}"
    pd.testing.assert_frame_equal(back.interactions, ds.interactions)
    pd.testing.assert_frame_equal(back.items, ds.items)
    assert back.users is not None and ds.users is not None
    pd.testing.assert_frame_equal(back.users, ds.users)


def test_write_round_trip_of_loaded_data(tmp_path: Path) -> None:
    """Any RawDataset round-trips: NaN ratings, items without genres or years, missing user fields."""
    f = tmp_path / "log.csv"
    _generic_frame().to_csv(f, index=False)
    ds = load(str(f), columns="user=customer,item=sku,rating=stars,timestamp=when")
    write_synthetic(ds, tmp_path / "out")
    back = load(str(tmp_path / "out"))
    pd.testing.assert_frame_equal(back.interactions, ds.interactions)
    pd.testing.assert_frame_equal(back.items, ds.items)


def test_write_synthetic_refuses_non_empty_folder(tmp_path: Path) -> None:
    ds = synthetic(users=20, items=20, seed=0)
    out = tmp_path / "taken"
    _write(out / "keep.txt", "mine\n")
    with pytest.raises(DataError, match="already exists"):
        write_synthetic(ds, out)
    assert (out / "keep.txt").read_text() == "mine\n"
    (out / "keep.txt").unlink()
    write_synthetic(ds, out)  # an empty folder is fine
    assert (out / "ratings.csv").is_file()


# ------------------------------------------------------------------------------------- download


def test_download_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ml-100k, ml-1m, ml-latest-small"):
        download("ml-25m", tmp_path)


def test_download_offline_is_a_clear_error(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"Cannot reach 127\.0\.0\.1 .*pass its folder with --data\.$"):
        download("ml-100k", tmp_path / "dl", timeout=2, base_url="http://127.0.0.1:9/datasets")
    assert time.perf_counter() - start < 5
    assert list((tmp_path / "dl").iterdir()) == []  # no partial zip left behind


@pytest.fixture
def zip_server(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server with ml-latest-small.zip (tiny fixture) and a corrupt ml-1m.zip."""
    root = tmp_path / "www"
    root.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,10\n")
        zf.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    (root / "ml-latest-small.zip").write_bytes(buf.getvalue())
    (root / "ml-1m.zip").write_bytes(b"not a zip")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_extracts_and_loads(tmp_path: Path, zip_server: str) -> None:
    target = download("ml-latest-small", tmp_path / "dl", base_url=zip_server)
    assert target == tmp_path / "dl" / "ml-latest-small"
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["ml-latest-small"]
    assert load(str(target)).items.loc["1", "title"] == "Toy Story (1995)"
    assert load(str(tmp_path / "dl")).interactions["item"].tolist() == ["1"]  # parent folder works too
    assert download("ml-latest-small", tmp_path / "dl", base_url="http://127.0.0.1:9") == target  # cached
    with pytest.raises(DataError, match="not a valid zip archive"):
        download("ml-1m", tmp_path / "dl", base_url=zip_server)
    with pytest.raises(DataError, match="HTTP 404"):
        download("ml-100k", tmp_path / "dl", base_url=zip_server)


# ---------------------------------------------------------------------------------- real ml-100k


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="MovieLens-100K not present")
def test_real_ml100k() -> None:
    ds = load(str(ML100K))
    _check_schema(ds)
    assert len(ds.interactions) == 100_000
    assert ds.interactions["user"].nunique() == 943 and ds.users is not None and len(ds.users) == 943
    assert ds.interactions["item"].nunique() == 1682 and len(ds.items) == 1682
    assert ds.items.loc["1"].tolist() == ["Toy Story (1995)", "Animation|Children's|Comedy", 1995]
    assert set(ds.interactions["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ds.users.loc["1"].tolist() == [24.0, "M", "technician", "85711"]
    assert (ds.items["year"] > 1900).sum() == 1681  # only "unknown" (267) lacks a date
    assert load(str(ML100K / "u.data")).interactions.equals(ds.interactions)

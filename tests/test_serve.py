"""``fedrec serve`` over real HTTP on 127.0.0.1: contract, bad input, auth, privacy of logs, reload, CLI.

Every test talks to a uvicorn server started in a thread (or, for the CLI, a subprocess) — the whole
stack is exercised, nothing of ours is mocked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.server.serve import MAX_HISTORY, create_app
from fedrec.shared_model.artifacts import load_model, save_model
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP, ModelConfig
from fedrec.shared_model.quantize import quantize_for_serving
from fedrec.shared_model.recommend import Recommender
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.sources import load
from fedrec.simulations.driver.centralized import CentralizedConfig, run_centralized

SECRET = "secret-history-item-7f3a"  # an id that must never reach a log


def train_small(out: Path) -> Path:
    """A small trained MLP (synthetic: 300 users, 200 items, 2 epochs) in RUN_DIR ``out``."""
    data = prepare_dataset(load("synthetic", seed=0, synth_users=300, synth_items=200))
    run_centralized(data, CentralizedConfig(epochs=2, seed=0), out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small(tmp_path_factory.mktemp("serve") / "run")


@contextlib.contextmanager
def served(app: object, **kw: object) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (free port) in a thread; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, ws="none", lifespan="on", **kw)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    with served(create_app(model_dir), log_level="warning") as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def rec(model_dir: Path) -> Recommender:
    return Recommender(load_model(model_dir))


def post(client: httpx.Client, body: object) -> httpx.Response:
    return client.post("/v1/recommend", json=body)


# ------------------------------------------------------------------ contract
def test_healthz_docs_and_openapi(client: httpx.Client, rec: Recommender) -> None:
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model"] == rec.loaded.run_id and h["items"] == rec.catalog.n_items
    assert client.get("/docs").status_code == 200
    assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]


def test_recommend_matches_the_in_process_ranking(client: httpx.Client, rec: Recommender) -> None:
    ids = list(rec.catalog.item_ids)
    history, exclude = ids[:5], ids[5:8]
    r = post(client, {"history": [*history, "nope"], "k": 10, "exclude": exclude})
    assert r.status_code == 200
    body = r.json()
    got = [x["item"] for x in body["items"]]
    known, _ = rec.to_indices(history)
    ex, _ = rec.to_indices(exclude)
    ref = rec.recommend([known], k=10, exclude=[ex])[0]
    assert got == [ids[i] for i in ref.items]  # one ranking path
    assert not set(got) & set(history + exclude)
    assert body["unknown"] == ["nope"] and body["model"] == rec.loaded.run_id
    assert [x["title"] for x in body["items"]] == [rec.catalog.titles[i] for i in ref.items]
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_integer_ids_are_accepted(client: httpx.Client, rec: Recommender) -> None:
    as_str = post(client, {"history": ["1", "2"]}).json()["items"]
    as_int = post(client, {"history": [1, 2]}).json()["items"]
    assert [x["item"] for x in as_str] == [x["item"] for x in as_int]


@pytest.mark.parametrize("history", [[], ["unknown-a", "unknown-b"]])
def test_empty_or_unknown_history_falls_back_to_the_item_prior(
    client: httpx.Client, rec: Recommender, history: list[str]
) -> None:
    body = post(client, {"history": history, "k": 5}).json()
    ref = rec.recommend([np.zeros(0, dtype=np.int64)], k=5)[0]
    assert [x["item"] for x in body["items"]] == [rec.catalog.item_ids[i] for i in ref.items]
    assert body["unknown"] == history


def test_k_larger_than_what_is_left_and_everything_seen(client: httpx.Client, rec: Recommender) -> None:
    ids = list(rec.catalog.item_ids)
    body = post(client, {"history": ids[:190], "k": 1000}).json()
    assert len(body["items"]) == len(ids) - 190
    assert post(client, {"history": ids, "k": 10}).json()["items"] == []


def test_item_endpoint(client: httpx.Client, rec: Recommender) -> None:
    iid = rec.catalog.item_ids[3]
    assert client.get(f"/v1/items/{iid}").json()["title"] == rec.catalog.titles[3]
    r = client.get("/v1/items/does-not-exist")
    assert r.status_code == 404 and "unknown item" in r.json()["detail"]


def test_explain_names_history_items(client: httpx.Client, rec: Recommender) -> None:
    history = list(rec.catalog.item_ids[:8])
    body = post(client, {"history": history, "k": 5, "explain": True}).json()
    assert all("because" in x for x in body["items"])
    named = [b["item"] for x in body["items"] for b in x["because"]]
    assert named and set(named) <= set(history)
    assert all(b["contribution"] > 0 for x in body["items"] for b in x["because"])
    assert "because" not in post(client, {"history": history, "k": 5}).json()["items"][0]


def test_diversity_zero_is_plain_and_one_still_masks(client: httpx.Client, rec: Recommender) -> None:
    history = list(rec.catalog.item_ids[:10])
    plain = post(client, {"history": history, "k": 10}).json()["items"]
    assert post(client, {"history": history, "k": 10, "diversity": 0.0}).json()["items"] == plain
    div = post(client, {"history": history, "k": 10, "diversity": 1.0}).json()["items"]
    assert len(div) == 10 and not {x["item"] for x in div} & set(history)
    assert [x["item"] for x in div] != [x["item"] for x in plain]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"", 422),
        (b"[1, 2]", 422),
        (b'"history"', 422),
        (b'{"history": "1,2,3"}', 422),
        (b'{"history": [[1]]}', 422),
        (b'{"history": [1.5]}', 422),
        (b'{"history": [true]}', 422),
        (b'{"history": [""]}', 422),
        (b'{"history": ["' + b"x" * 65 + b'"]}', 422),
        (b'{"k": 0}', 422),
        (b'{"k": -3}', 422),
        (b'{"k": 1001}', 422),
        (b'{"k": 1e300}', 422),
        (b'{"k": "ten"}', 422),
        (b'{"diversity": 1.5}', 422),
        (b'{"diversity": NaN}', 422),
        (b'{"explain": "maybe"}', 422),
        (b'{"histroy": [1]}', 422),
    ],
)
def test_malformed_bodies_get_4xx_with_a_message(client: httpx.Client, body: bytes, status: int) -> None:
    r = client.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_history_length_is_bounded(client: httpx.Client) -> None:
    r = post(client, {"history": [str(i) for i in range(MAX_HISTORY + 1)]})
    assert r.status_code == 422 and "at most 5000" in r.text
    assert post(client, {"history": list(range(100_000))}).status_code == 413  # body-size limit first


def test_streamed_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"history": ['
        for _ in range(40):
            yield b'"1",' * 2000
        yield b'"1"]}'

    r = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def json_values() -> st.SearchStrategy[object]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=80)
    )
    return st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_over_the_openapi_schema_finds_no_5xx(client: httpx.Client, data: st.DataObject) -> None:
    """Bodies built from the schema's field names, each with a valid-looking or arbitrary value."""
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    ids = st.integers() | st.text(max_size=70)
    plausible: dict[str, st.SearchStrategy[object]] = {
        "history": st.lists(ids, max_size=30),
        "exclude": st.lists(ids, max_size=30),
        "k": st.integers(min_value=-5, max_value=1100),
        "explain": st.booleans(),
        "diversity": st.floats(min_value=-0.5, max_value=1.5, allow_nan=False, allow_infinity=False),
    }
    assert set(props) == set(plausible), "the fuzzer must cover every request field"
    fields = {name: plausible[name] | json_values() for name in props}
    body = data.draw(st.fixed_dictionaries({}, optional=fields) | json_values(), label="body")
    r = post(client, body)
    assert r.status_code < 500, (body, r.text)
    item = data.draw(
        st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=80)
    )
    r = client.get("/v1/items/" + httpx.URL("x/" + item).path.split("/", 2)[-1].replace("/", "%2F"))
    assert r.status_code < 500


# ------------------------------------------------------------------ auth and logs
def test_bearer_keys(model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# serving keys\nkey-one\n\nkey-two\n")
    with (
        served(create_app(model_dir, api_keys_file=keys), log_level="warning") as u,
        httpx.Client(base_url=u) as c,
    ):
        assert c.post("/v1/recommend", json={}).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert c.post("/v1/recommend", json={}, headers=bad).status_code == 401
        assert c.get("/v1/items/1", headers=bad).status_code == 401
        ok = {"Authorization": "Bearer key-two"}
        assert c.post("/v1/recommend", json={}, headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes need no key
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(FedrecError, match="holds no key"):
        create_app(model_dir, api_keys_file=tmp_path / "empty")


def test_histories_are_never_logged(
    model_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    # log_config=None: uvicorn's loggers (access log included) propagate to caplog.
    app = create_app(model_dir)
    with served(app, log_config=None, access_log=True, log_level="debug") as u, httpx.Client(base_url=u) as c:
        assert c.post("/v1/recommend", json={"history": [SECRET, "1"], "explain": True}).status_code == 200
        assert c.post("/v1/recommend", json={"history": [SECRET], "k": 0}).status_code == 422
        c.post("/v1/recommend", content=f'{{"history": ["{SECRET}"'.encode())
    assert "POST /v1/recommend" in caplog.text  # the access log is on …
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert SECRET not in text  # … and never holds a history


def test_validation_errors_do_not_echo_the_body(client: httpx.Client) -> None:
    r = post(client, {"history": [SECRET], "k": 0})
    assert r.status_code == 422 and SECRET not in r.text


# ------------------------------------------------------------------ reload
def new_checkpoint(model_dir: Path, run_id: str, seed: int) -> None:
    """Write a different (freshly initialised) model into ``model_dir`` the way training does."""
    old = load_model(model_dir)
    torch.manual_seed(seed)
    model = HistoryMLP(old.model.cfg, old.catalog.genres)
    save_model(model_dir, model, old.catalog, old.sampling, run_id=run_id)


def test_reload_on_change_drops_no_request(model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    work.mkdir()
    for name in ("model.pt", "model.json"):
        (work / name).write_bytes((model_dir / name).read_bytes())
    first = load_model(work).run_id
    app = create_app(work, reload_on_change=True, reload_poll_s=0.05)
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer(u: str) -> None:
        with httpx.Client(base_url=u, timeout=10) as c:
            while not stop.is_set():
                r = c.post("/v1/recommend", json={"history": ["1", "2", "3"], "k": 5})
                seen.append((r.status_code, r.json().get("model", "")))

    with served(app, log_level="warning") as u:
        workers = [threading.Thread(target=hammer, args=(u,)) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        new_checkpoint(work, "second", seed=1)
        deadline = time.monotonic() + 10
        while not any(m == "second" for _, m in seen[-20:]):
            assert time.monotonic() < deadline, "the new checkpoint was never served"
            time.sleep(0.05)
        time.sleep(0.2)
        stop.set()
        for w in workers:
            w.join(10)
    assert {s for s, _ in seen} == {200}, "a request failed during the reload"
    models = [m for _, m in seen]
    assert models[0] == first and models[-1] == "second"
    assert app.state.holder.reloads == 1


def test_unusable_checkpoint_keeps_the_old_model(model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    work.mkdir()
    for name in ("model.pt", "model.json"):
        (work / name).write_bytes((model_dir / name).read_bytes())
    app = create_app(work)
    holder = app.state.holder
    (work / "model.json").write_text("{broken")
    assert holder.reload() is False and holder.engine.run_id == load_model(model_dir).run_id


# ------------------------------------------------------------------ int8
def test_int8_serves_and_refuses_where_it_does_not_apply(
    model_dir: Path, rec: Recommender, tmp_path: Path
) -> None:
    with served(create_app(model_dir, int8=True), log_level="warning") as u, httpx.Client(base_url=u) as c:
        assert c.get("/healthz").json()["int8"] is True
        got = [
            x["item"]
            for x in c.post("/v1/recommend", json={"history": ["1", "2", "3"], "k": 10}).json()["items"]
        ]
    known, _ = rec.to_indices(["1", "2", "3"])
    ref = [rec.catalog.item_ids[i] for i in rec.recommend([known], k=10)[0].items]
    assert len(set(got) & set(ref)) >= 7  # int8 keeps most of the fp32 top-10
    flat = load_model(model_dir)
    shallow = HistoryMLP(
        ModelConfig.from_json({**flat.model.cfg.to_json(), "hidden": []}), flat.catalog.genres
    )
    save_model(tmp_path, shallow, flat.catalog, flat.sampling, run_id="shallow")
    with pytest.raises(FedrecError, match="no layer after the first"):
        quantize_for_serving(load_model(tmp_path))


# ------------------------------------------------------------------ CLI
# typer 0.x imports a click helper that click 8.3 deprecates; not ours to fix.
CLICK_DEPRECATION = r"ignore:'click\.utils\.get_(binary|text)_stream' is deprecated:DeprecationWarning"


def cli_app() -> Any:
    import typer

    from fedrec.server.cli_serve import register

    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so typer keeps "serve" as a subcommand
        """Unused."""

    return app


@pytest.mark.filterwarnings(CLICK_DEPRECATION)
def test_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli_app(), ["serve", "--model", str(tmp_path / "nothing")])
    assert isinstance(result.exception, FedrecError) and "model.pt is missing" in str(result.exception)


SERVE = "from fedrec.simulations.cli.main import main; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_missing_model_is_one_line_and_exit_2(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-c", SERVE, "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "model.pt is missing" in p.stderr


def test_cli_sighup_reloads_and_sigterm_stops_cleanly(model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    work.mkdir()
    for name in ("model.pt", "model.json"):
        (work / name).write_bytes((model_dir / name).read_bytes())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--model", str(work), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            time.sleep(0.1)
        new_checkpoint(work, "after-hup", seed=2)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while httpx.get(base + "/healthz").json()["model"] != "after-hup":
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
        assert httpx.post(base + "/v1/recommend", json={"history": ["1"]}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn re-raises the signal it caught once the graceful shutdown is done.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Shutting down" in out and "Traceback" not in out


def test_non_standard_json_numbers_get_4xx_not_5xx(client: httpx.Client) -> None:
    """Python's JSON parser accepts Infinity/NaN literals; the API must still answer 4xx."""
    for raw in (
        b"Infinity",
        b"NaN",
        b'{"history": ["1"], "k": Infinity}',
        b'{"history": ["1"], "diversity": NaN}',
        b'{"history": ["1"], "diversity": -Infinity}',
        b"\xff\xfe",
    ):
        r = client.post("/v1/recommend", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)

"""``fedrec serve``'s fast path (``FastRecommend``) answers exactly as the FastAPI route it bypasses.

Two servers over ONE loaded model, one with the fast path and one without, get the same requests:
valid bodies of every shape (int and string ids, unknown ids, exclusions, explanations, diversity,
k at its bounds), bad bodies (each must still reach pydantic and get its 4xx), odd content types
and bearer keys. Status and JSON body must be identical, and the fast path must have answered the
valid ones itself (its counters), not passed everything on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.server.serve import MAX_HISTORY, MAX_ID_CHARS, MAX_K, ModelHolder, create_app, fast_request
from tests.test_serve import SECRET, served, train_small

VALID = [
    b"{}",
    b'{"history": ["1", "2", "3"]}',
    b'{"history": [1, 2, 3], "k": 5}',
    b'{"history": ["1", 2, "no-such-item", "no-such-item", "' + b"x" * MAX_ID_CHARS + b'"]}',
    b'{"history": ["10", "20"], "exclude": ["11", 12], "k": 1}',
    b'{"history": ["10", "20", "30"], "explain": true, "k": 3}',
    b'{"history": ["10", "20", "30"], "diversity": 1, "k": 7}',
    b'{"history": ["10", "20", "30"], "diversity": 0.5, "explain": false}',
    b'{"history": ["5"], "k": ' + str(MAX_K).encode() + b"}",
    b'{"history": [' + b",".join(b'"%d"' % i for i in range(MAX_HISTORY)) + b"]}",
    b'{"k": 5, "k": 3}',  # a repeated field: the last one counts (as json.loads does)
    b'{"history": ["\\u00e9t\\u00e9", "1"]}',
]
# Valid after a coercion pydantic makes (k 10.0 or "10" → 10, true → 1, 1 → true), or not read by
# orjson as the route reads it (an int beyond 64 bits; a UTF-8 byte-order mark): passed on to FastAPI.
PASSED_ON = [
    b'{"history": [18446744073709551616, "1"]}',
    b'{"k": 10.0}',
    b'{"k": "10"}',
    b'{"k": true}',
    b'{"diversity": true}',
    b'{"explain": 1}',
    b'\xef\xbb\xbf{"history": ["1"]}',
]
INVALID = [
    b"{not json",
    b"",
    b"[1, 2]",
    b'"history"',
    b'{"history": "1,2,3"}',
    b'{"history": [[1]]}',
    b'{"history": [1.5]}',
    b'{"history": [1.0]}',
    b'{"history": [true]}',
    b'{"history": [null]}',
    b'{"history": [""]}',
    b'{"history": ["' + b"x" * (MAX_ID_CHARS + 1) + b'"]}',
    b'{"history": [' + b",".join(b"%d" % i for i in range(MAX_HISTORY + 1)) + b"]}",
    b'{"k": 0}',
    b'{"k": 1001}',
    b'{"k": 1e300}',
    b'{"diversity": 1.5}',
    b'{"diversity": -0.1}',
    b'{"diversity": NaN}',
    b'{"explain": "maybe"}',
    b'{"histroy": [1]}',
    b'{"history": ["\\ud800"]}',  # a lone surrogate: json.loads takes it, orjson does not
    b'{"history": ["' + SECRET.encode() + b'"], "k": 0}',
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small(tmp_path_factory.mktemp("fastpath") / "run")


@pytest.fixture(scope="module")
def urls(model_dir: Path) -> Iterator[tuple[str, str, dict[str, int]]]:
    """(fast-path URL, FastAPI-only URL, the fast server's counters), one model loaded once."""
    holder = ModelHolder(model_dir)
    fast, slow = create_app(model_dir, holder=holder), create_app(model_dir, holder=holder, fast_path=False)
    with served(fast, log_level="warning") as a, served(slow, log_level="warning") as b:
        yield a, b, fast.state.fast_path


def both(urls: tuple[str, str, dict[str, int]], body: bytes, headers: dict[str, str]) -> tuple[int, object]:
    """Post to both servers; assert the same status and JSON; return them."""
    answers = []
    for url in urls[:2]:
        r = httpx.post(url + "/v1/recommend", content=body, headers=headers, timeout=10)
        answers.append((r.status_code, r.json(), r.headers["content-type"]))
    assert answers[0] == answers[1], (body[:200], answers)
    return answers[0][0], answers[0][1]


def test_valid_bodies_answered_by_the_fast_path_as_by_fastapi(urls: tuple[str, str, dict[str, int]]) -> None:
    before = dict(urls[2])
    for body in VALID:
        status, answer = both(urls, body, {"content-type": "application/json"})
        assert status == 200 and isinstance(answer, dict) and "items" in answer, body[:80]
    assert urls[2]["fast"] - before["fast"] == len(VALID)  # every one answered by the fast path
    assert urls[2]["app"] == before["app"]


def test_bad_bodies_reach_pydantic_and_get_the_same_4xx(urls: tuple[str, str, dict[str, int]]) -> None:
    before = dict(urls[2])
    for body in INVALID:
        status, answer = both(urls, body, {"content-type": "application/json"})
        assert 400 <= status < 500 and isinstance(answer, dict) and answer["detail"], body[:80]
        assert SECRET not in str(answer)
    assert urls[2]["app"] - before["app"] == len(INVALID) and urls[2]["fast"] == before["fast"]
    for body in PASSED_ON:
        assert both(urls, body, {"content-type": "application/json"})[0] == 200


@pytest.mark.parametrize(
    "ctype",
    [
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
    ],
)
def test_content_types_answered_as_fastapi_does(urls: tuple[str, str, dict[str, int]], ctype: str) -> None:
    both(urls, b'{"history": ["1", "2"], "k": 3}', {"content-type": ctype})


def test_bearer_keys_on_the_fast_path(model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("key-one\nkey-two\n")
    holder = ModelHolder(model_dir)
    fast = create_app(model_dir, holder=holder, api_keys_file=keys)
    slow = create_app(model_dir, holder=holder, api_keys_file=keys, fast_path=False)
    body = b'{"history": ["1", "2"]}'
    with served(fast, log_level="warning") as a, served(slow, log_level="warning") as b:
        pair = (a, b, fast.state.fast_path)
        for auth, status in [
            (None, 401),
            ("Bearer nope", 401),
            ("Basic key-two", 401),
            ("Bearer", 401),
            ("Bearer key-one-and-more", 401),
            ("Bearer key-two", 200),
            ("bearer   key-one", 200),
        ]:
            headers = {"content-type": "application/json", **({"authorization": auth} if auth else {})}
            assert both(pair, body, headers)[0] == status, auth
        assert fast.state.fast_path["fast"] == 2  # the two valid keys; every refusal is FastAPI's


def test_fast_request_takes_only_what_the_model_takes_unchanged() -> None:
    assert fast_request(b'{"history": [1, "a"], "diversity": 1}') == {
        "history": ["1", "a"],
        "k": 10,
        "exclude": [],
        "explain_items": False,
        "diversity": 1.0,
    }
    for body in INVALID + PASSED_ON:
        assert fast_request(body) is None, body[:80]


ids = st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=70)
fields = {
    "history": st.lists(ids, max_size=20),
    "exclude": st.lists(ids, max_size=5),
    "k": st.integers(min_value=-2, max_value=1002) | st.floats(allow_nan=False) | st.booleans(),
    "explain": st.booleans() | st.integers(0, 1),
    "diversity": st.floats(min_value=-0.5, max_value=1.5) | st.integers(-1, 2) | st.booleans(),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional=fields))
def test_random_bodies_get_the_same_answer_both_ways(
    urls: tuple[str, str, dict[str, int]], body: dict[str, object]
) -> None:
    import json

    both(urls, json.dumps(body).encode(), {"content-type": "application/json"})

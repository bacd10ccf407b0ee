"""Keyed pseudonyms, generalization hierarchies and Datafly-style k-anonymity."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.privacy.anonymize import (
    FEATURE_OF,
    QI_FIELDS,
    AnonymizationReport,
    age_band,
    generalize_value,
    k_anonymize,
    pseudonymize,
    region,
)
from fedrec.privacy.errors import PrivacyError

SECRET = bytes(range(32))
OUT_COLUMNS = ["age_band", "gender", "occupation", "region"]
ML100K_USERS = Path("/work/shared/data/ml-100k/u.user")


# ---------------------------------------------------------------- pseudonyms


def test_pseudonyms_match_a_reference_hmac() -> None:
    ids = ["1", "42", "user-é", ""]
    expected = [hmac.new(SECRET, i.encode(), hashlib.sha256).hexdigest()[:32] for i in ids]
    assert pseudonymize(ids, SECRET) == expected
    assert pseudonymize(["1"], SECRET)[0] == pseudonymize(("1",), SECRET)[0]  # deterministic
    assert pseudonymize(["1"], bytes(32)) != pseudonymize(["1"], SECRET)  # keyed
    assert pseudonymize([], SECRET) == []


def test_dictionary_attack_over_the_id_space_recovers_nothing() -> None:
    id_space = [str(i) for i in range(1, 100_001)]
    targets = set(pseudonymize(id_space[::97], SECRET))  # 1 031 published pseudonyms
    wrong_key = bytes(32)
    guesses: set[str] = set()
    for candidate in id_space:
        raw = candidate.encode()
        sha = hashlib.sha256(raw).hexdigest()
        guesses.update(
            (
                sha,
                sha[:32],
                hashlib.md5(raw).hexdigest(),
                hashlib.sha1(raw).hexdigest()[:32],
                hmac.new(wrong_key, raw, hashlib.sha256).hexdigest()[:32],
                hmac.new(b"", raw, hashlib.sha256).hexdigest()[:32],
            )
        )
    assert len(targets) == 1031
    assert targets.isdisjoint(guesses)
    # The same attack with the real key finds every one: the key is the only thing protecting ids.
    assert targets <= set(pseudonymize(id_space, SECRET))


def test_pseudonyms_are_distinct_over_many_ids() -> None:
    ids = [f"u{i}" for i in range(50_000)]
    pseudonyms = pseudonymize(ids, SECRET)
    assert len(set(pseudonyms)) == 50_000
    assert all(len(p) == 32 and int(p, 16) >= 0 for p in pseudonyms[:100])


@pytest.mark.parametrize(
    ("ids", "secret", "message"),
    [
        (["1"], b"short", "at least 16 bytes"),
        (["1"], "a string secret of 32 characters", "at least 16 bytes"),
        ("12345", SECRET, "not a single string"),
        (["1", 2], SECRET, "position 1 is a int"),
    ],
)
def test_pseudonymize_bad_input(ids: object, secret: object, message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        pseudonymize(ids, secret)  # type: ignore[arg-type]


# ---------------------------------------------------------------- hierarchies


@pytest.mark.parametrize(
    ("age", "level0", "level1"),
    [
        (1, "<18", "<25"),  # ML-1M codes: 1, 18, 25, 35, 45, 50, 56
        (17.9, "<18", "<25"),
        (18, "18-24", "<25"),
        (24.9, "18-24", "<25"),
        (25, "25-34", "25-44"),
        (35, "35-44", "25-44"),
        (44, "35-44", "25-44"),
        (45, "45-49", "45+"),
        (50, "50-55", "45+"),
        (55, "50-55", "45+"),
        (56, "56+", "45+"),
        (73, "56+", "45+"),
        (0, "<18", "<25"),
    ],
)
def test_age_bands(age: float, level0: str, level1: str) -> None:
    assert (age_band(age), age_band(age, 1), age_band(age, 2)) == (level0, level1, "*")
    assert generalize_value("age", age, 0) == level0


@pytest.mark.parametrize(
    ("zip_code", "level0"),
    [
        ("02139", "0"),
        ("94110-1234", "9"),
        (" 55455", "5"),
        ("T8H1N", "other"),
        ("v5k 2m6", "other"),
        (12345, "1"),
    ],
)
def test_regions(zip_code: str, level0: str) -> None:
    assert (region(zip_code), region(zip_code, 1)) == (level0, "*")


def test_categorical_fields() -> None:
    assert generalize_value("gender", " m ", 0) == "M"
    assert generalize_value("gender", "F", 0) == "F"
    assert generalize_value("gender", "nonbinary", 0) == "NONBINARY"
    assert generalize_value("occupation", " Writer ", 0) == "writer"
    assert generalize_value("gender", "M", 1) == generalize_value("occupation", "writer", 1) == "*"


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan, pd.NA, "", "  "])
def test_missing_values_are_star_at_every_level(missing: object) -> None:
    for name, top in (("age", 2), ("gender", 1), ("occupation", 1), ("zip", 1)):
        assert [generalize_value(name, missing, level) for level in range(top + 1)] == ["*"] * (top + 1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: generalize_value("postcode", "1", 0), "Unknown quasi-identifier 'postcode'"),
        (lambda: age_band(30, 3), r"age must be an integer in 0\.\.2, got 3"),
        (lambda: region("1", -1), r"zip must be an integer in 0\.\.1, got -1"),
        (lambda: generalize_value("gender", "M", 2), r"gender must be an integer in 0\.\.1"),
        (lambda: age_band(-1), "finite number ≥ 0, got -1.0"),
        (lambda: age_band(math.inf), "finite number"),
        (lambda: generalize_value("age", "old", 0), "Age must be a number, got a str"),
    ],
)
def test_bad_generalization_input(call: object, message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        call()  # type: ignore[operator]


def test_public_constants() -> None:
    assert QI_FIELDS == ("age", "gender", "occupation", "zip")
    assert [FEATURE_OF[f] for f in QI_FIELDS] == OUT_COLUMNS


# ---------------------------------------------------------------- k-anonymity, hand-made frames


def _frame(rows: Sequence[tuple[object, ...]], index: Sequence[object] | None = None) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(QI_FIELDS), index=index)


def test_already_k_anonymous_frame_is_kept_at_level_0() -> None:
    raw = _frame(
        [
            (30, "M", "writer", "12345"),
            (31, "m", "Writer", "19999"),
            (40, "F", "artist", "55555"),
            (41, "F", "artist", "56789"),
        ],
        index=[10, 20, 30, 40],
    )
    out, report = k_anonymize(raw, k=2)
    assert list(out.columns) == OUT_COLUMNS and list(out.index) == [10, 20, 30, 40]
    assert out.values.tolist() == [
        ["25-34", "M", "writer", "1"],
        ["25-34", "M", "writer", "1"],
        ["35-44", "F", "artist", "5"],
        ["35-44", "F", "artist", "5"],
    ]
    assert report == AnonymizationReport(
        k_requested=2,
        k_reached=2,
        suppressed_fraction=0.0,
        unique_before=1.0,
        unique_after=0.0,
        levels={"age": 0, "gender": 0, "occupation": 0, "zip": 0},
        n_users=4,
    )


def test_generalizes_the_field_with_most_distinct_values() -> None:
    raw = _frame(
        [
            (20, "M", "a", "11111"),
            (22, "M", "a", "12222"),
            (30, "F", "b", "21111"),
            (33, "F", "b", "22222"),
            (60, "M", "c", "31111"),
            (61, "M", "c", "T8H1N"),
        ]
    )
    # Level 0: the last two users are unique (regions "3" and "other"): 2/6 > 20% may not be
    # suppressed; zip has 4 distinct values (age 3, occupation 3, gender 2) so it goes up first.
    out, report = k_anonymize(raw, k=2, max_suppression=0.2)
    assert report.levels == {"age": 0, "gender": 0, "occupation": 0, "zip": 1}
    assert out.values.tolist() == [
        ["18-24", "M", "a", "*"],
        ["18-24", "M", "a", "*"],
        ["25-34", "F", "b", "*"],
        ["25-34", "F", "b", "*"],
        ["56+", "M", "c", "*"],
        ["56+", "M", "c", "*"],
    ]
    assert (report.k_reached, report.suppressed_fraction, report.unique_after) == (2, 0.0, 0.0)


def test_ties_go_to_the_first_field_and_age_climbs_two_levels() -> None:
    raw = _frame([(20, "M", "a", "1"), (30, "M", "a", "1"), (40, "M", "a", "1"), (50, "M", "a", "1")])
    out, report = k_anonymize(raw, k=2, max_suppression=0.0)
    # Level 0 ages are all distinct; level 1 leaves "<25" and "45+" alone; level 2 merges all.
    assert report.levels == {"age": 2, "gender": 0, "occupation": 0, "zip": 0}
    assert out.values.tolist() == [["*", "M", "a", "1"]] * 4
    assert report.k_reached == 4


def test_small_groups_within_the_budget_are_suppressed() -> None:
    rows = [(30, "M", "a", "1")] * 3 + [(40, "F", "b", "2")] * 3 + [(70, "F", "z", "9")]
    out, report = k_anonymize(_frame(rows), k=3, max_suppression=0.2)  # 1/7 ≤ 20%
    assert report.levels == dict.fromkeys(QI_FIELDS, 0)
    assert out.values.tolist()[-1] == ["*", "*", "*", "*"]
    assert out.values.tolist()[:6] == [["25-34", "M", "a", "1"]] * 3 + [["35-44", "F", "b", "2"]] * 3
    assert report.suppressed_fraction == pytest.approx(1 / 7)
    assert report.k_reached == 3  # the lone "*" row is reported as suppressed, not as a group of 1
    assert report.unique_before == pytest.approx(1 / 7) and report.unique_after == pytest.approx(1 / 7)


def test_missing_columns_and_values_are_star() -> None:
    raw = pd.DataFrame({"age": [30, 31, None, np.nan], "gender": ["M", "M", None, np.nan]})
    out, report = k_anonymize(raw, k=2)
    assert out.values.tolist() == [["25-34", "M", "*", "*"]] * 2 + [["*", "*", "*", "*"]] * 2
    assert report.levels == dict.fromkeys(QI_FIELDS, 0) and report.suppressed_fraction == 0.0
    # Raw uniqueness is over the columns that exist; the two missing rows tie with each other.
    assert report.unique_before == 0.5


def test_frame_without_any_quasi_identifier_column() -> None:
    raw = pd.DataFrame({"ratings": [1, 2, 3]}, index=["u1", "u2", "u3"])
    out, report = k_anonymize(raw, k=3)
    assert out.values.tolist() == [["*"] * 4] * 3 and list(out.index) == ["u1", "u2", "u3"]
    assert (report.k_reached, report.unique_before, report.suppressed_fraction) == (3, 0.0, 0.0)


def test_fewer_users_than_k_are_all_suppressed() -> None:
    out, report = k_anonymize(_frame([(30, "M", "a", "1"), (40, "F", "b", "2")]), k=3, max_suppression=0.0)
    assert out.values.tolist() == [["*"] * 4] * 2
    assert report.levels == {"age": 2, "gender": 1, "occupation": 1, "zip": 1}
    assert (report.suppressed_fraction, report.k_reached) == (1.0, 0)


def test_k_1_is_a_no_op_at_level_0() -> None:
    raw = _frame([(30, "M", "writer", "12345"), (70, "F", "artist", "T8H1N")])
    out, report = k_anonymize(raw, k=1)
    assert out.values.tolist() == [["25-34", "M", "writer", "1"], ["56+", "F", "artist", "other"]]
    assert report.levels == dict.fromkeys(QI_FIELDS, 0)
    assert (report.k_reached, report.unique_before, report.unique_after) == (1, 1.0, 1.0)


def test_empty_frame() -> None:
    out, report = k_anonymize(_frame([]), k=5)
    assert list(out.columns) == OUT_COLUMNS and len(out) == 0
    assert report == AnonymizationReport(5, 0, 0.0, 0.0, 0.0, dict.fromkeys(QI_FIELDS, 0), 0)


def test_report_is_json_without_identifiers() -> None:
    raw = _frame([(30, "M", "writer", "12345")] * 5, index=[f"secret-user-{i}" for i in range(5)])
    _, report = k_anonymize(raw, k=5)
    text = report.to_json()
    assert json.loads(text) == {
        "k_requested": 5,
        "k_reached": 5,
        "suppressed_fraction": 0.0,
        "unique_before": 0.0,
        "unique_after": 0.0,
        "levels": {"age": 0, "gender": 0, "occupation": 0, "zip": 0},
        "n_users": 5,
    }
    assert "secret-user" not in text and "12345" not in text and "writer" not in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "integer k ≥ 1, got 0"),
        ({"k": -3}, "integer k ≥ 1, got -3"),
        ({"k": 2.5}, "integer k ≥ 1, got 2.5"),
        ({"k": True}, "integer k ≥ 1, got True"),
        ({"max_suppression": 1.5}, r"fraction in \[0, 1\], got 1.5"),
        ({"max_suppression": -0.1}, r"fraction in \[0, 1\]"),
    ],
)
def test_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        k_anonymize(_frame([(30, "M", "a", "1")]), **kwargs)  # type: ignore[arg-type]


def test_bad_frames() -> None:
    with pytest.raises(PrivacyError, match="index has duplicates"):
        k_anonymize(_frame([(30, "M", "a", "1")] * 2, index=[7, 7]))
    with pytest.raises(PrivacyError, match="needs a pandas DataFrame, got a list"):
        k_anonymize([(30, "M", "a", "1")])
    with pytest.raises(PrivacyError, match="finite number ≥ 0"):
        k_anonymize(_frame([(-4, "M", "a", "1")]))


# ---------------------------------------------------------------- property


def _check_k_anonymous(raw: pd.DataFrame, k: int, max_suppression: float) -> None:
    out, report = k_anonymize(raw, k=k, max_suppression=max_suppression)
    assert list(out.columns) == OUT_COLUMNS and out.index.equals(raw.index)
    star = (out == "*").all(axis=1)
    counts = out[~star].value_counts()
    assert (counts >= k).all(), counts
    # Every published row is the raw row at the reported levels, or fully suppressed.
    expected = pd.DataFrame(
        {
            FEATURE_OF[f]: [generalize_value(f, v, report.levels[f]) for v in raw.get(f, [None] * len(raw))]
            for f in QI_FIELDS
        },
        index=raw.index,
    )
    changed = (out != expected).any(axis=1)
    assert star[changed].all()
    assert changed.sum() <= round(report.suppressed_fraction * len(raw))
    all_max = report.levels == {"age": 2, "gender": 1, "occupation": 1, "zip": 1}
    assert report.suppressed_fraction <= max_suppression + 1e-12 or all_max
    assert report.k_reached >= k or report.k_reached == 0
    assert report.n_users == len(raw)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([None, float("nan"), 1, 17, 18, 24, 25, 40, 45, 49, 50, 55, 56, 90]),
            st.sampled_from(["M", "F", "m", None, "x"]),
            st.sampled_from(["writer", "artist", "Other", None, "doctor"]),
            st.sampled_from(["12345", "02139", "T8H1N", "", None, "9", "55455", "60601"]),
        ),
        max_size=40,
    ),
    k=st.integers(1, 6),
    max_suppression=st.sampled_from([0.0, 0.05, 0.2, 1.0]),
    drop=st.sets(st.sampled_from(QI_FIELDS), max_size=2),
)
def test_output_is_k_anonymous_for_random_frames(
    rows: list[tuple[object, object, object, object]], k: int, max_suppression: float, drop: set[str]
) -> None:
    raw = _frame(rows).drop(columns=sorted(drop))
    _check_k_anonymous(raw, k, max_suppression)


@pytest.mark.skipif(not ML100K_USERS.exists(), reason="MovieLens-100K not present in /work/shared/data")
def test_movielens_100k_users() -> None:
    users = pd.read_csv(
        ML100K_USERS,
        sep="|",
        header=None,
        names=["user", "age", "gender", "occupation", "zip"],
        dtype={"zip": str},
    ).set_index("user")
    assert len(users) == 943
    _, report = k_anonymize(users, k=5)
    assert report.unique_before == pytest.approx(0.985, abs=0.01)
    assert report.unique_before == 929 / 943
    # Occupation (21 values) then region (11) are recoded; age bands and gender stay exact.
    assert report.levels == {"age": 0, "gender": 0, "occupation": 1, "zip": 1}
    assert (report.k_reached, report.suppressed_fraction, report.unique_after) == (7, 0.0, 0.0)
    _check_k_anonymous(users, 5, 0.05)

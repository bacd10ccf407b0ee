"""Keyed pseudonyms, quasi-identifier generalization and k-anonymity (defence in depth; DP is the guarantee).

Generalization hierarchies (shared with featurization, whose non-anonymized pipeline uses level 0);
``"*"`` means unknown or suppressed, and a missing value (None/NaN/empty) is ``"*"`` at every level:

=========== ================================================ ======================= =====
field       level 0                                          level 1                 2
=========== ================================================ ======================= =====
age         <18 18-24 25-34 35-44 45-49 50-55 56+ (ML-1M)     <25 25-44 45+           \\*
zip         first character if a digit, else "other"         \\*
occupation  value, lower-cased and stripped                  \\*
gender      value, upper-cased and stripped ("M", "F", …)    \\*
=========== ================================================ ======================= =====

Zip codes must be read as strings: an integer zip has lost its leading zeros, so its region is
wrong (it is accepted and converted with ``str`` because there is no way to tell).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives import hashes, hmac

from fedrec.privacy.errors import PrivacyError

SUPPRESSED = "*"
PSEUDONYM_HEX = 32  # 128 bits of HMAC-SHA256: no collisions in practice, shorter ids in files
MIN_SECRET_BYTES = 16

QI_FIELDS: tuple[str, ...] = ("age", "gender", "occupation", "zip")
FEATURE_OF: dict[str, str] = {
    "age": "age_band",
    "gender": "gender",
    "occupation": "occupation",
    "zip": "region",
}
MAX_LEVEL: dict[str, int] = {"age": 2, "gender": 1, "occupation": 1, "zip": 1}

# (upper bound, exclusive; label) for level 0 and level 1 age bands.
_AGE_LEVEL0 = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
_AGE_LEVEL1 = ((25, "<25"), (45, "25-44"))


# ---------------------------------------------------------------- pseudonyms


def pseudonymize(user_ids: Sequence[str], secret: bytes) -> list[str]:
    """HMAC-SHA256(secret, id) as 32 lowercase hex characters, one per id, in order.

    Without ``secret`` a pseudonym cannot be linked back to an id, even by hashing every
    possible id; derive ``secret`` with ``fedrec.privacy.crypto.derive_key(master, "pseudonym-hmac")``.
    """
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise PrivacyError(f"The pseudonym secret must be at least {MIN_SECRET_BYTES} bytes of key material.")
    if isinstance(user_ids, str | bytes):
        raise PrivacyError("pseudonymize() takes a sequence of user ids, not a single string.")
    keyed = hmac.HMAC(secret, hashes.SHA256())
    out: list[str] = []
    for position, user_id in enumerate(user_ids):
        if not isinstance(user_id, str):
            # The id itself is not echoed: error messages end up in logs.
            raise PrivacyError(f"User id at position {position} is a {type(user_id).__name__}, not a string.")
        mac = keyed.copy()
        mac.update(user_id.encode("utf-8"))
        out.append(mac.finalize().hex()[:PSEUDONYM_HEX])
    return out


# ---------------------------------------------------------------- generalization


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return bool(math.isnan(value))
    return isinstance(value, str) and not value.strip()


def _check_level(field_name: str, level: int) -> None:
    top = MAX_LEVEL[field_name]
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level <= top:
        raise PrivacyError(
            f"Generalization level for {field_name} must be an integer in 0..{top}, got {level!r}."
        )


def age_band(age: float | None, level: int = 0) -> str:
    """Age band of ``age`` at ``level`` (0: ML-1M groups, 1: <25/25-44/45+, 2: "*")."""
    _check_level("age", level)
    if _is_missing(age):
        return SUPPRESSED
    try:
        years = float(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PrivacyError(f"Age must be a number, got a {type(age).__name__}.") from None
    if not math.isfinite(years) or years < 0:
        raise PrivacyError(f"Age must be a finite number ≥ 0, got {years}.")
    if level == 2:
        return SUPPRESSED
    bands, last = (_AGE_LEVEL0, "56+") if level == 0 else (_AGE_LEVEL1, "45+")
    for upper, label in bands:
        if years < upper:
            return label
    return last


def region(zip: str | None, level: int = 0) -> str:
    """Region of a postcode: its first character if that is a digit, else "other" (level 1: "*")."""
    _check_level("zip", level)
    if _is_missing(zip):
        return SUPPRESSED
    text = str(zip).strip()
    if level == 1:
        return SUPPRESSED
    first = text[0]
    return first if first in "0123456789" else "other"


def _categorical(field_name: str, value: object, level: int, upper: bool) -> str:
    _check_level(field_name, level)
    if _is_missing(value) or level >= 1:
        return SUPPRESSED
    text = str(value).strip()
    return text.upper() if upper else text.lower()


def generalize_value(field: str, value: Any, level: int) -> str:
    """Generalize one raw quasi-identifier value (``field`` in ``QI_FIELDS``) to ``level``."""
    if field == "age":
        return age_band(value, level)
    if field == "zip":
        return region(value, level)
    if field == "gender":
        return _categorical("gender", value, level, upper=True)
    if field == "occupation":
        return _categorical("occupation", value, level, upper=False)
    raise PrivacyError(f"Unknown quasi-identifier {field!r}; expected one of {list(QI_FIELDS)}.")


# ---------------------------------------------------------------- k-anonymity


@dataclass(frozen=True)
class AnonymizationReport:
    """What :func:`k_anonymize` did; aggregate figures only, no identifiers."""

    k_requested: int
    k_reached: int  # smallest group among non-suppressed users (0 when none are left)
    suppressed_fraction: float  # users whose four values were all set to "*"
    unique_before: float  # fraction of users unique on the raw (age, gender, occupation, zip)
    unique_after: float  # fraction of users unique on the published four columns
    levels: dict[str, int] = field(default_factory=dict)  # QI field → generalization level used
    n_users: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _group_sizes(frame: pd.DataFrame) -> np.ndarray:
    """Size of each row's group of identical rows (all columns), as an int array."""
    if len(frame) == 0:
        return np.zeros(0, dtype=np.int64)
    if frame.shape[1] == 0:
        return np.full(len(frame), len(frame), dtype=np.int64)
    codes = frame.groupby(list(frame.columns), sort=False, dropna=False).ngroup().to_numpy()
    return np.bincount(codes)[codes]


def _unique_fraction(frame: pd.DataFrame) -> float:
    return float(np.mean(_group_sizes(frame) == 1)) if len(frame) else 0.0


def k_anonymize(
    raw: pd.DataFrame, k: int = 5, max_suppression: float = 0.05
) -> tuple[pd.DataFrame, AnonymizationReport]:
    """Globally recode one row per user (Datafly-style) into k-anonymous age_band/gender/occupation/region.

    Starting at level 0, while some combination occurs fewer than ``k`` times: if the users in
    such groups are at most ``max_suppression`` of all users, suppress them (all four "*");
    otherwise raise by one level the field with the most distinct values that can still go up
    (ties: ``QI_FIELDS`` order). Every combination of non-suppressed users then occurs ≥ k times.
    Missing columns count as all "*"; other columns are ignored; the index is preserved.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise PrivacyError(f"k-anonymity needs an integer k ≥ 1, got {k!r}.")
    if isinstance(max_suppression, bool) or not (
        isinstance(max_suppression, int | float) and 0.0 <= max_suppression <= 1.0
    ):
        raise PrivacyError(f"max_suppression must be a fraction in [0, 1], got {max_suppression!r}.")
    if not isinstance(raw, pd.DataFrame):
        raise PrivacyError(f"k_anonymize() needs a pandas DataFrame, got a {type(raw).__name__}.")
    if not raw.index.is_unique:
        raise PrivacyError("k_anonymize() needs one row per user, but the frame's index has duplicates.")
    n_users = len(raw)
    present = [name for name in QI_FIELDS if name in raw.columns]

    # Every level of every field, computed once per distinct raw value.
    ladders: dict[str, list[np.ndarray]] = {}
    for name in QI_FIELDS:
        column = raw[name] if name in present else pd.Series([None] * n_users, index=raw.index, dtype=object)
        values = column.astype(object).to_numpy()
        uniques, inverse = _factorize(values)
        ladders[name] = [
            np.array([generalize_value(name, value, level) for value in uniques], dtype=object)[inverse]
            for level in range(MAX_LEVEL[name] + 1)
        ]

    levels = dict.fromkeys(QI_FIELDS, 0)
    suppressed = np.zeros(n_users, dtype=bool)
    while True:
        current = pd.DataFrame({name: ladders[name][levels[name]] for name in QI_FIELDS})
        small = _group_sizes(current) < k
        n_small = int(small.sum())
        if n_small == 0:
            break
        raisable = [name for name in QI_FIELDS if levels[name] < MAX_LEVEL[name]]
        if n_small <= max_suppression * n_users or not raisable:
            suppressed = small
            break
        widest = max(raisable, key=lambda name: current[name].nunique())  # first on ties
        levels[widest] += 1

    published = pd.DataFrame(
        {FEATURE_OF[name]: ladders[name][levels[name]] for name in QI_FIELDS}, index=raw.index
    ).astype(str)
    published.loc[suppressed, :] = SUPPRESSED
    kept = published.loc[~suppressed]
    k_reached = int(_group_sizes(kept).min()) if len(kept) else 0
    report = AnonymizationReport(
        k_requested=int(k),
        k_reached=k_reached,
        suppressed_fraction=float(suppressed.mean()) if n_users else 0.0,
        unique_before=_unique_fraction(raw[present].astype(object)),
        unique_after=_unique_fraction(published),
        levels=levels,
        n_users=n_users,
    )
    return published, report


def _factorize(values: np.ndarray) -> tuple[list[object], np.ndarray]:
    """Distinct values (missing ones folded into one None) and each row's index into them."""
    index: dict[object, int] = {}
    uniques: list[object] = []
    inverse = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        key = None if _is_missing(value) else value
        slot = index.get(key)
        if slot is None:
            slot = index[key] = len(uniques)
            uniques.append(key)
        inverse[row] = slot
    return uniques, inverse

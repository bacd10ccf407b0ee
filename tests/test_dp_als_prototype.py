"""The private-ALS prototype's accounting claim (scripts/dp_als_prototype.py, docs/PRIVACY_UTILITY.md
"Private ALS"): each user's per-round release has L2 norm exactly 1 whatever the history, and the sums
the prototype's server noises are the sums of those per-user releases (so σ_r is calibrated at
sensitivity 1). Small data; the prototype is an experiment script, imported from scripts/."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def als():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("dp_als_prototype", SCRIPTS / "dp_als_prototype.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(SCRIPTS))


def _histories(users: int, m: int, rng: np.random.Generator) -> sp.csr_matrix:
    rows, cols = [], []
    for u in range(users):
        n = 1 if u == 0 else int(rng.integers(1, m + 1))  # a one-item user and a whole-catalogue user
        n = m if u == 1 else n
        c = rng.choice(m, size=n, replace=False)
        rows += [u] * n
        cols += list(c)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(users, m))


@pytest.mark.parametrize("a_mode,shares", [("shared", (0.9, 0.0, 0.1)), ("full", (0.5, 0.4, 0.1))])
@pytest.mark.parametrize("k", [0, 3])
def test_each_users_release_has_norm_one_and_the_server_sums_are_their_sum(als, a_mode, shares, k):
    rng = np.random.default_rng(0)
    users, m, d = 12, 9, 4
    xb = _histories(users, m, rng)
    xs = als._sample_k(xb, k, rng)  # the round's sampled items, weights 1/√n
    assert (np.diff(xs.indptr) <= (k or m)).all()
    u = rng.normal(size=(users, d))
    uh = u / np.linalg.norm(u, axis=1, keepdims=True)
    total = 0.0
    for i in range(users):
        cols, w = xs.indices[xs.indptr[i] : xs.indptr[i + 1]], xs.data[xs.indptr[i] : xs.indptr[i + 1]]
        r = als.user_release(cols, w, uh[i], m, shares, a_mode)
        assert math.isclose(float(np.linalg.norm(r)), 1.0, rel_tol=1e-12)
        total = total + r
    b, g, a = als.round_statistics(xs, uh, a_mode)
    a_sh, b_sh, c_sh = shares
    parts = [math.sqrt(a_sh) * b.ravel()]
    if a_mode == "full":
        assert a is not None
        parts.append(math.sqrt(b_sh) * als._tri(a).ravel())
    else:
        assert a is None
    parts.append(math.sqrt(c_sh) * als._tri(g))
    np.testing.assert_allclose(np.concatenate(parts), total, rtol=1e-5, atol=1e-5)  # A is float32 products


def test_full_mode_without_a_share_is_refused(als):
    xb = _histories(4, 5, np.random.default_rng(1))
    with pytest.raises(ValueError, match="positive share b"):
        als.dp_als(xb, d=2, rounds=1, sigma_round=1.0, shares=(0.9, 0.0, 0.1), a_mode="full", k=0, w0=0.1,
                   lam=1.0, lam_u=0.1, pop_hat=np.ones(5), rng=np.random.default_rng(0))  # fmt: skip

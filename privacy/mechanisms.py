"""The two small Gaussian mechanisms that cover what a tenant releases besides its update or item release.

Adjacency (:data:`RELATION`): **add/remove one user** of one tenant. Every ε the project records is
for that relation, and every data-dependent value a ClientApp sends is covered by a charged mechanism
(``fedrec.privacy.transcript`` is the inventory):

* **the noisy user count** ñ = max(1, round(n + N(0, σ_c²))), sensitivity 1 (one user more or less
  changes n by one), σ_c = :data:`COUNT_SIGMA`. Drawn ONCE per tenant and run from ``secrets``,
  charged as round 0 of the tenant's budget and ledger (``mechanism`` = :data:`COUNT_MECHANISM`)
  before it leaves the tenant, and reused afterwards (post-processing: no further cost). The server
  uses ñ only: FedAvg weights, SecAgg+ weights, ``auto``'s choice, the release fit, reports; the
  tenant plans its own sampling rate and steps from ñ too, so those figures are public functions of a
  DP output. ε of this mechanism alone (δ = 1e-5, PRV) ≈ 0.17; it composes with everything else
  in the tenant's accountant.
* **the noisy evaluation sums** (``--eval-privacy dp``): the final test evaluation only, each user
  contributing at most 1 to each released sum (users, hits, NDCG, RR, …), so the vector of
  ``d`` sums has L2 sensitivity √d; Gaussian noise σ_e·√d with σ_e = :data:`EVAL_SIGMA` on each,
  charged as one ledger entry (``mechanism`` = :data:`EVAL_MECHANISM`) in the round after training.
  The coverage mask and intra-list diversity are not released under DP. ``--eval-privacy exact``
  (simulation research) sends exact sums and every report says they are NOT covered by ε.

Both are reserved in the tenant's calibration from the start (:func:`reserved_segments`), so the
DP-SGD / release noise is calibrated for the cap *including* them and a run never caps early
because of them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedrec.privacy.accounting import Segment

#: The neighbouring relation every recorded ε is for (ledger ``relation``, privacy.json ``adjacency``).
RELATION = "add-remove-one-user"
#: One line for reports.
RELATION_TEXT = "add/remove one user of one tenant (unbounded DP; user counts are noised, not public)"
#: σ of the noisy user count (sensitivity 1).
COUNT_SIGMA = 20.0
#: How far ñ may honestly stray above the manifest count in server-side sanity bounds (6 σ_c).
COUNT_SLACK = math.ceil(6 * COUNT_SIGMA)
#: The budget/ledger round of the count (before every training round).
COUNT_ROUND = 0
COUNT_MECHANISM = "gaussian-count"
#: σ_e of the evaluation sums, in units of their L2 sensitivity.
EVAL_SIGMA = 10.0
EVAL_MECHANISM = "gaussian-eval-sums"
#: The ledger mechanisms that are not a training round or an item release (count, DP evaluation).
SIDE_MECHANISMS = (COUNT_MECHANISM, EVAL_MECHANISM)


def is_side_entry(entry: dict[str, object]) -> bool:
    """Whether a ledger entry charges the noisy count or the DP evaluation (not training or a release)."""
    return entry.get("mechanism") in SIDE_MECHANISMS


#: ``eval-privacy`` values.
EVAL_PRIVACY = ("dp", "exact")
#: The evaluation-sum keys released under DP (each a sum of per-user values in [0, 1]); the rest of the
#: record is public constants (k, negatives) or withheld (coverage mask, ILD).
EVAL_DP_SUMS = (
    "full.users",
    "full.hits",
    "full.ndcg",
    "full.rr",
    "sampled.users",
    "sampled.hits",
    "sampled.ndcg",
    "sampled.rr",
    "sets.users",
    "sets.recall",
    "sets.ndcg",
    "sets.hit",
)
EVAL_PUBLIC = ("negatives", "full.k", "sampled.k", "sets.k")
#: What the tenant sends in place of the withheld sums (the server's merge needs the keys).
EVAL_ZEROED = ("full.ild", "full.lists", "sampled.ild", "sampled.lists")


def noisy_count(n: int, rng: np.random.Generator | None = None) -> int:
    """ñ = max(1, round(n + N(0, σ_c²))) from a fresh ``secrets`` seed (never a public one)."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    return max(1, round(n + float(rng.normal(0.0, COUNT_SIGMA))))


def count_segment() -> Segment:
    return (COUNT_SIGMA, 1.0, 1)


def eval_segment() -> Segment:
    return (EVAL_SIGMA, 1.0, 1)


def reserved_segments(*, dp: bool, eval_privacy: str) -> list[Segment]:
    """What a tenant will spend besides training: the final DP evaluation when it is on."""
    return [eval_segment()] if dp and eval_privacy == "dp" else []


def noisy_eval_record(
    record: Mapping[str, Any], rng: np.random.Generator | None = None
) -> tuple[dict[str, Any], float]:
    """The DP form of an evaluation record (``EvalResult.to_record``) and its L2 sensitivity.

    Each released sum gets N(0, (σ_e·√d)²) and is clamped at 0 (post-processing); the coverage mask is
    dropped and ILD zeroed. Returns (record, √d).
    """
    rng = rng or np.random.default_rng(secrets.randbits(128))
    keys = [k for k in EVAL_DP_SUMS if k in record]
    sens = math.sqrt(len(keys))
    out: dict[str, Any] = {k: record[k] for k in EVAL_PUBLIC if k in record}
    for k in EVAL_ZEROED:
        if k in record:
            out[k] = 0 if isinstance(record[k], int) else 0.0
    for k in keys:
        noisy = max(0.0, float(record[k]) + float(rng.normal(0.0, EVAL_SIGMA * sens)))
        out[k] = round(noisy) if isinstance(record[k], int) else noisy
    return out, sens

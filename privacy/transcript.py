"""The inventory of the transcript: every field of every message a ClientApp sends, with its treatment.

This module is the ONE whitelist. ``fedrec.client.app`` calls :func:`check_reply` on every reply
before it is returned (plain and SecAgg+ paths, the SecAgg+ protocol stages included) and refuses —
raises :class:`TranscriptError`, so nothing is sent — a record or key that is not in
:data:`INVENTORY`, or one whose treatment is ``removed``. ``tests/test_transcript.py`` runs real
federations on neighbouring data (one user added to one tenant) and checks every field of every
reply against this table. ``docs/TRANSCRIPT.md`` prints it.

Treatments (the adjacency is add/remove one user, ``fedrec.privacy.mechanisms.RELATION``):

* ``public``     a function of public inputs only (run config, caps, σ, q, steps, round numbers, the
  SecAgg+ protocol's keys and shares, the wall clock) — or of values already released under a charged
  mechanism (post-processing). Identical between neighbouring federations unless ``varies`` says why not.
* ``protected``  data-dependent, released only through a mechanism that a ledger entry charges (the
  DP-SGD update, the item release, the noisy count ñ, the DP evaluation sums).
* ``exact``      data-dependent and NOT covered by ε: sent only when the run asked for it
  (``eval-privacy exact`` in a simulation, or ``--no-dp``); every report labels it.
* ``removed``    a field earlier versions sent; refused if anything tries to send it again.

How to add a field (e.g. a new reply figure): add one :class:`Field` row to :data:`INVENTORY` with
its message kind, record, key, treatment and one line of why; if it is ``protected``, name the ledger
mechanism that charges it in ``why``; then extend ``tests/test_transcript.py`` if it needs a new path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedrec.privacy.errors import PrivacyError

PUBLIC, PROTECTED, EXACT, REMOVED = "public", "protected", "exact", "removed"
TREATMENTS = (PUBLIC, PROTECTED, EXACT, REMOVED)

#: Message kinds (the ``kind`` of :func:`check_reply`).
TRAIN = "train"  # plain train reply: DP-SGD update or item release (Message API records)
MASKED = "train-masked"  # what the train handler hands to secaggplus_mod (legacy FitRes records)
SECAGG = "secagg"  # what leaves the node under SecAgg+: every stage's reply, after the mod
EVALUATE = "evaluate"
QUERY = "query"
LEDGER = "ledger-entry"  # one entry inside ``ledger-entries`` (a JSON string in a status record)
KINDS = (TRAIN, MASKED, SECAGG, EVALUATE, QUERY, LEDGER)

ANY = "*"  # any key of this record (array records: the shared parameter names)


class TranscriptError(PrivacyError):
    """A reply holds a field the inventory does not allow: it is not sent."""


@dataclass(frozen=True)
class Field:
    kind: str
    record: str  # record name in the RecordDict ("" for a ledger entry's own keys)
    key: str
    treatment: str
    why: str
    varies: str = ""  # public but not identical across runs: why (clock, protocol randomness, ñ)


def _rows() -> list[Field]:
    rows: list[Field] = []

    def add(kinds: Iterable[str], record: str, key: str, treatment: str, why: str, varies: str = "") -> None:
        for kind in kinds:
            rows.append(Field(kind, record, key, treatment, why, varies))

    # --- the figures of a train/release reply: "metrics" (plain) or "fitres.metrics" (SecAgg+)
    for kind, rec in ((TRAIN, "metrics"), (MASKED, "fitres.metrics"), (SECAGG, "fitres.metrics")):
        add([kind], rec, "num-examples", PROTECTED,
            "the aggregation weight: the noisy user count ñ (gaussian-count, round 0) or 0/1",
            "ñ is a fresh Gaussian draw per run")  # fmt: skip
        add([kind], rec, "users", PROTECTED, "the noisy user count ñ (ledger mechanism gaussian-count)",
            "ñ is a fresh Gaussian draw per run")  # fmt: skip
        add(
            [kind],
            rec,
            "epsilon",
            PUBLIC,
            "cumulative ε: the accountant over (σ, q, steps) segments, all public",
        )
        add([kind], rec, "cap", PUBLIC, "the tenant's ε cap (run config)")
        add([kind], rec, "noise-multiplier", PUBLIC, "σ calibrated from cap, δ, q, steps, rounds")
        add([kind], rec, "sample-rate", PUBLIC, "q = 1/⌈ñ/B⌉: from ñ and batch-users")
        add([kind], rec, "steps", PUBLIC, "round(local-epochs/q)")
        add([kind], rec, "loss", REMOVED, "mean training loss: data-dependent and unnoised")
        add([kind], rec, "seconds", REMOVED, "local training time: grows with the tenant's data")
    for kind, rec in ((TRAIN, "status"), (MASKED, "fitres.metrics"), (SECAGG, "fitres.metrics"),
                      (EVALUATE, "status")):  # fmt: skip
        add([kind], rec, "tenant", PUBLIC, "the tenant id (its folder name)")
        add(
            [kind], rec, "status", PUBLIC, "ok | capped | already-charged | rejected: budget/validation state"
        )
        add([kind], rec, "message", PUBLIC,
            "why a round was refused: budget figures, or a validation problem of the DP output")  # fmt: skip
        add([kind], rec, "ledger-entries", PUBLIC,
            "JSON list of ledger entries; each field is checked against the ledger-entry rows")  # fmt: skip
    add([TRAIN], "arrays", ANY, PROTECTED,
        "shared parameters after DP-SGD (Gaussian, Poisson; ledger entry of the round) or the DP item "
        "release 'popularity'/'gram' (ledger mechanism of the release; dp_two_stage: stage 1 'popularity', "
        "stage 2 'gram' over the server's selection, each its own ledger entry)")  # fmt: skip
    add([MASKED], "fitres.parameters", ANY, PROTECTED,
        "the delta / release share handed to secaggplus_mod, which masks it (never leaves in clear)")  # fmt: skip
    add([MASKED, SECAGG], "fitres.num_examples", "num_examples", PROTECTED,
        "the same weight as num-examples (ñ, or 0/1)", "ñ is a fresh Gaussian draw per run")  # fmt: skip
    add([MASKED, SECAGG], "fitres.status", "code", PUBLIC, "Flower status code (always OK)")
    add([MASKED, SECAGG], "fitres.status", "message", PUBLIC, "Flower status message (empty)")
    # --- SecAgg+ protocol stages (flwr secaggplus_mod)
    stage = "secaggplus_configs"
    crypto = "fresh key material / randomness of the protocol"
    add([SECAGG], stage, "pk1", PUBLIC, "stage setup: public key for the pairwise masks", crypto)
    add([SECAGG], stage, "pk2", PUBLIC, "stage setup: public key for encrypting shares", crypto)
    add([SECAGG], stage, "dsts", PUBLIC, "stage share-keys: destination node ids", "node ids per run")
    add([SECAGG], stage, "ctxts", PUBLIC, "stage share-keys: encrypted secret shares", crypto)
    add([SECAGG], stage, "masked_params", PROTECTED,
        "stage collect-masked-vectors: the quantized DP update + masks (uniform alone; the unmasked "
        "sum is the DP updates' weighted sum)", crypto)  # fmt: skip
    add([SECAGG], stage, "nids", PUBLIC, "stage unmask: node ids of the shares", "node ids per run")
    add([SECAGG], stage, "shares", PUBLIC, "stage unmask: secret shares of masks (protocol)", crypto)
    # --- evaluation sums ("sums")
    sums = "sums"
    add([EVALUATE], sums, "negatives", PUBLIC, "sampled negatives per user (run config)")
    for part in ("full", "sampled", "sets"):
        add([EVALUATE], sums, f"{part}.k", PUBLIC, "the cut-off K")
    dp_sums = "eval-privacy dp: Gaussian σ_e·√d on the d released sums (ledger mechanism gaussian-eval-sums)"
    noisy = "Gaussian draw"
    for key in ("full.users", "full.hits", "full.ndcg", "full.rr", "sampled.users", "sampled.hits",
                "sampled.ndcg", "sampled.rr", "sets.users", "sets.recall", "sets.ndcg", "sets.hit"):  # fmt: skip
        add([EVALUATE], sums, key, PROTECTED, dp_sums, noisy)
    for key in ("full.ild", "full.lists", "sampled.ild", "sampled.lists"):
        add([EVALUATE], sums, key, PROTECTED, "0 under eval-privacy dp (withheld); exact sums otherwise")
    for key in ("full.recommended", "sampled.recommended"):
        add([EVALUATE], sums, key, EXACT,
            "the set of recommended items (coverage): only with eval-privacy exact / --no-dp")  # fmt: skip
    # --- the query (approach auto)
    add([QUERY], "status", "tenant", PUBLIC, "the tenant id")
    add([QUERY], "status", "users", PROTECTED, "the noisy user count ñ (gaussian-count)", "Gaussian draw")
    # --- a ledger entry (fedrec.privacy.ledger), as the tenant hands it over
    led = [LEDGER]
    for key, why in (
        ("round", "round number (0: the noisy count; R+1: the DP evaluation)"),
        ("tenant", "tenant id"),
        ("unit", "'user'"),
        ("sample_rate", "q, from ñ"),
        ("noise_multiplier", "σ of the mechanism"),
        ("max_grad_norm", "clipping bound / sensitivity of the mechanism"),
        ("steps", "steps, from ñ"),
        ("delta", "δ (run config)"),
        ("accountant", "prv | rdp"),
        ("epsilon", "cumulative ε (accountant over public segments)"),
        ("cap", "ε cap"),
        ("poisson", "Poisson sampling (true)"),
        ("secure_mode", "Opacus secure_mode (false, stated)"),
        ("status", "ok | capped"),
        ("mechanism", "which mechanism this entry charges"),
        ("pop_share", "release: share of the sensitivity given to popularity"),
        ("noise_mode", "release / cohort round: local or distributed"),
        ("shares", "release / cohort round: noise shares (SecAgg+ threshold, decided by the tenant)"),
        ("local_noise_multiplier", "release / cohort round: this tenant's own σ share"),
        ("epsilon_if_alone", "release / cohort round: ε if the server saw this share alone"),
        ("dp_mode", "'cohort': a round of one noisy clipped gradient sum (run config dp-mode)"),
        ("relation", "the neighbouring relation the ε is for"),
        ("count_noise_multiplier", "σ_c of the noisy count the 'users' field holds"),
        ("purpose", "release-init: 'mlp-init' (the release initialises the MLP)"),
        ("release_share", "release-init: the share of the cap the release was calibrated to (run config)"),
        ("stage", "dp_two_stage: 1 = the selecting DP popularity release, 2 = the Gram on the selection"),
        (
            "selected_items",
            "dp_two_stage stage 2: how many items the Gram covers — the size of the server's "
            "selection: min(gram-limit, catalogue), or the M rule's pick from the stage-1 DP release "
            "(post-processing) capped there: run config, the public catalogue and a released DP output",
        ),
    ):
        add(led, "", key, PUBLIC, why)
    add(led, "", "users", PROTECTED, "the noisy user count ñ (gaussian-count), never the exact n",
        "Gaussian draw")  # fmt: skip
    add(led, "", "timestamp", PUBLIC, "UTC time of the charge", "wall clock")
    add(led, "", "prev_hash", PUBLIC, "hash chain (a function of the entries above)", "covers ñ and time")
    add(led, "", "hash", PUBLIC, "hash chain (a function of this entry)", "covers ñ and time")
    return rows


#: The whole inventory: one row per (message kind, record, key).
INVENTORY: tuple[Field, ...] = tuple(_rows())
_INDEX: dict[tuple[str, str, str], Field] = {(f.kind, f.record, f.key): f for f in INVENTORY}


def lookup(kind: str, record: str, key: str) -> Field | None:
    """The inventory row for ``key`` of ``record`` in a ``kind`` reply (``*`` rows match any key)."""
    return _INDEX.get((kind, record, key)) or _INDEX.get((kind, record, ANY))


def reply_fields(content: Any) -> list[tuple[str, str]]:
    """(record, key) of every value in a Flower ``RecordDict`` (array, metric and config records)."""
    out: list[tuple[str, str]] = []
    for name, rec in content.items():
        out.extend((str(name), str(key)) for key in rec)
    return out


def ledger_entries_in(content: Any) -> list[dict[str, Any]]:
    """The ledger entries a reply carries (``ledger-entries`` in any config record)."""
    out: list[dict[str, Any]] = []
    for rec in content.config_records.values():
        if "ledger-entries" in rec:
            out.extend(json.loads(str(rec["ledger-entries"]) or "[]"))
    return out


def problems(kind: str, content: Any, *, exact_allowed: bool) -> list[str]:
    """Every field of a reply the inventory refuses (empty: the reply may be sent)."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    found: list[str] = []
    for record, key in reply_fields(content):
        row = lookup(kind, record, key)
        if row is None:
            found.append(f"{record}.{key}: not in the transcript inventory for {kind} replies")
        elif row.treatment == REMOVED:
            found.append(f"{record}.{key}: removed from {kind} replies ({row.why})")
        elif row.treatment == EXACT and not exact_allowed:
            found.append(f"{record}.{key}: exact (not covered by ε) and this run did not ask for it")
    for entry in ledger_entries_in(content):
        for key in entry:
            if lookup(LEDGER, "", key) is None:
                found.append(f"ledger entry field {key!r} is not in the transcript inventory")
    return found


def check_reply(kind: str, content: Any, *, exact_allowed: bool) -> None:
    """Raise :class:`TranscriptError` (the reply is not sent) if any field is not allowed."""
    found = problems(kind, content, exact_allowed=exact_allowed)
    if found:
        raise TranscriptError(f"refusing to send a {kind} reply: {found[0]}" + (
            f" (and {len(found) - 1} more)" if len(found) > 1 else ""))  # fmt: skip


def table(rows: Iterable[Field] = INVENTORY) -> list[dict[str, str]]:
    """The inventory as plain dicts (docs, the audit report)."""
    return [
        {
            "kind": f.kind,
            "record": f.record or "(entry)",
            "key": f.key,
            "treatment": f.treatment,
            "why": f.why,
            "varies": f.varies,
        }
        for f in rows
    ]


def by_treatment(kind: str) -> Mapping[str, list[str]]:
    """{treatment: ['record.key', …]} for one message kind."""
    out: dict[str, list[str]] = {t: [] for t in TREATMENTS}
    for f in INVENTORY:
        if f.kind == kind:
            out[f.treatment].append(f"{f.record}.{f.key}" if f.record else f.key)
    return out

"""``fedrec prepare``: partition a dataset into tenants, anonymize each, encrypt each at rest.

Output (read by the ClientApp through :mod:`fedrec.client.vault` and by the ServerApp)::

    FED_DIR/federation.json          format, tenant ids, source, partition, n_items, created
    FED_DIR/catalog.json             the public item side + the federation's user-feature vocabulary
    FED_DIR/tenant-<i>/partition.enc the tenant's UserSplit, AES-256-GCM (fedrec.privacy.crypto)
    FED_DIR/tenant-<i>/manifest.json counts, anonymization report, partition summary (MAC'd)
    FED_DIR/keys/tenant-<i>.key      the tenant's master key, 0600 (or --keys-dir)

Per tenant, before anything is written: its users' quasi-identifiers are k-anonymized within the
tenant (``fedrec.privacy.anonymize.k_anonymize``), user ids become keyed HMAC pseudonyms under a secret
derived from the tenant's own key, and only order + (hour, weekday) context of interactions is
kept (``UserSplit`` never holds timestamps). User-feature codes index the federation vocabulary:
per feature, the sorted union of the generalized values any tenant publishes (any level), so a
code means the same value in every tenant; code 0 is unknown/suppressed ("*").

Writing is atomic: the whole FED_DIR is built in a hidden temp folder beside it and renamed into
place at the end (each file itself temp + fsync + rename), so an interrupted prepare leaves no
folder that looks complete. Keys in an outside ``--keys-dir`` are staged the same way and moved
in just before the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedrec.client.vault import (
    CATALOG_FILE,
    FEDERATION_FILE,
    KEYS_DIR,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    PARTITION_FILE,
    load_tenant,
    manifest_bytes,
    read_manifest,
    seal_manifest,
    write_atomic,
)
from fedrec.privacy.anonymize import SUPPRESSED, AnonymizationReport, k_anonymize, pseudonymize
from fedrec.privacy.crypto import (
    KeyInfo,
    decrypt_file,
    derive_key,
    encrypt_file,
    generate_key_file,
    read_key_file,
    reencrypt_file,
    retire_key_file,
    vault_file_id,
)
from fedrec.privacy.errors import VaultError
from fedrec.shared_model.data import SPLIT_SCHEMA_VERSION, USER_FEATURES, Catalog, UserSplit
from fedrec.simulations.data.dataset import PreparedData
from fedrec.simulations.data.partition import (
    PartitionSpec,
    parse_partition,
    partition_users,
    summarize_tenant,
)
from fedrec.simulations.errors import DataError

FEDERATION_FORMAT = "fedrec-federation"
FEDERATION_VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    """How to cut a dataset into tenants and anonymize them."""

    tenants: int  # number of tenants N (ids tenant-0 … tenant-N-1)
    partition: str = "iid"  # iid | dirichlet:A | by:FIELD
    k_anonymity: int = 5  # every published quasi-identifier combination occurs ≥ k times per tenant
    max_suppression: float = 0.05  # share of a tenant's users that may be suppressed instead of generalizing
    size_skew: float = 0.0  # tenant i gets a share ∝ 1/(i+1)^S of the users (iid, dirichlet)
    min_users: int = 10  # refuse a partition leaving any tenant with fewer users
    seed: int = 0  # partition randomness
    chunk_size: int = 1 << 20  # AES-GCM chunk of partition.enc (bytes)

    def __post_init__(self) -> None:
        if self.k_anonymity < 1:
            raise DataError(f"--k-anonymity must be at least 1, got {self.k_anonymity}")
        if not 0.0 <= self.max_suppression <= 1.0:
            raise DataError(f"--max-suppression must be a fraction in [0, 1], got {self.max_suppression}")


@dataclass(frozen=True)
class TenantPlan:
    """One tenant before encryption (in memory only)."""

    tenant_id: str
    users: np.ndarray = field(repr=False)  # (n,) dense user indices into the PreparedData
    published: pd.DataFrame = field(repr=False)  # k-anonymized age_band/gender/occupation/region
    report: AnonymizationReport
    summary: dict[str, Any]  # partition summary: counts, top genres


@dataclass(frozen=True)
class FederationPlan:
    """Partition + anonymization of a dataset, ready to encrypt (in memory only)."""

    spec: PartitionSpec
    catalog: Catalog  # the federation catalogue (global user-feature vocabulary)
    tenants: tuple[TenantPlan, ...]


@dataclass(frozen=True)
class PrepareResult:
    fed_dir: Path
    keys_dir: Path
    plan: FederationPlan
    seconds: float


# ------------------------------------------------------------------ planning (pure)


def plan_federation(data: PreparedData, cfg: PrepareConfig) -> FederationPlan:
    """Partition ``data`` into tenants and k-anonymize each tenant's quasi-identifiers."""
    spec = parse_partition(cfg.partition)
    parts = partition_users(
        data.split,
        data.catalog,
        cfg.tenants,
        spec,
        seed=cfg.seed,
        size_skew=cfg.size_skew,
        min_users=cfg.min_users,
    )
    tenants = []
    for i, users in enumerate(parts):
        raw = data.users_raw.iloc[users]
        published, report = k_anonymize(raw, k=cfg.k_anonymity, max_suppression=cfg.max_suppression)
        summary = summarize_tenant(data.split.subset(users), data.catalog)
        tenants.append(TenantPlan(f"tenant-{i}", users, published, report, summary))
    vocab = {
        feat: tuple(sorted({v for t in tenants for v in t.published[feat].tolist() if v != SUPPRESSED}))
        for feat in USER_FEATURES
    }
    return FederationPlan(spec=spec, catalog=replace(data.catalog, user_vocab=vocab), tenants=tuple(tenants))


def tenant_split(data: PreparedData, plan: FederationPlan, tenant: TenantPlan, secret: bytes) -> UserSplit:
    """The tenant's UserSplit: its users, federation feature codes, keyed pseudonyms."""
    codes = np.zeros((len(tenant.users), len(USER_FEATURES)), dtype=np.int32)  # (n, 4)
    for j, feat in enumerate(USER_FEATURES):
        index = {v: c + 1 for c, v in enumerate(plan.catalog.user_vocab[feat])}
        codes[:, j] = [index.get(v, 0) for v in tenant.published[feat].tolist()]
    pseudonyms = pseudonymize([data.user_ids[u] for u in tenant.users], secret)
    return replace(data.split.subset(tenant.users), user_features=codes, pseudonyms=tuple(pseudonyms))


def build_manifest(
    tenant: TenantPlan, plan: FederationPlan, cfg: PrepareConfig, key: KeyInfo, file_id: str, n_items: int
) -> dict[str, Any]:
    """The tenant's manifest (no identifiers), sealed with a MAC under ``key``."""
    counts = {name: tenant.summary[name] for name in ("users", "train_interactions", "users_with_test")}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tenant": tenant.tenant_id,
        "file": PARTITION_FILE,
        "schema_version": SPLIT_SCHEMA_VERSION,
        "key_id": key.key_id,
        "vault_file_id": file_id,
        "n_items": n_items,
        "counts": counts,
        "anonymization": asdict(tenant.report),
        "partition": {
            "scheme": str(plan.spec),
            "size_skew": cfg.size_skew,
            "seed": cfg.seed,
            "top_genres": tenant.summary["top_genres"],
        },
        "created": _now(),
        "rotated": None,
    }
    return seal_manifest(manifest, key)


# ------------------------------------------------------------------ writing


def prepare_federation(
    data: PreparedData,
    out: Path,
    cfg: PrepareConfig,
    *,
    keys_dir: Path | None = None,
    overwrite: bool = False,
    on_tenant: Callable[[str], None] | None = None,
    plan: FederationPlan | None = None,
) -> PrepareResult:
    """Plan and write a federation folder (see the module docstring); returns what was written.

    ``plan`` (from :func:`plan_federation` of the same data and config) skips planning here.
    """
    start = time.perf_counter()
    out = Path(out)
    external_keys = _external_keys_dir(out, keys_dir)
    check_fed_out(out, overwrite=overwrite)
    if plan is None:
        plan = plan_federation(data, cfg)
    tenant_ids = [t.tenant_id for t in plan.tenants]
    if external_keys is not None:
        clashes = [t for t in tenant_ids if (external_keys / f"{t}.key").exists()]
        if clashes and not overwrite:
            raise DataError(
                f"{external_keys} already holds a key for {clashes[0]}; choose another --keys-dir or pass "
                "--overwrite (old keys are moved to retired/)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    stage: Path | None = None
    try:
        if external_keys is not None:
            external_keys.mkdir(parents=True, exist_ok=True, mode=0o700)
            stage = Path(tempfile.mkdtemp(prefix=".fedrec-keys.", suffix=".partial", dir=external_keys))
            key_stage = stage
        else:
            key_stage = tmp / KEYS_DIR
            key_stage.mkdir(mode=0o700)
        os.chmod(key_stage, 0o700)
        write_atomic(tmp / CATALOG_FILE, _json_bytes(plan.catalog.to_json(), indent=None))
        for tenant in plan.tenants:
            _write_tenant(data, plan, cfg, tenant, tmp / tenant.tenant_id, key_stage)
            if on_tenant is not None:
                on_tenant(tenant.tenant_id)
        federation = {
            "format": FEDERATION_FORMAT,
            "version": FEDERATION_VERSION,
            "tenants": tenant_ids,
            "source": data.source,
            "partition": str(plan.spec),
            "n_items": data.catalog.n_items,
            "created": _now(),
        }
        write_atomic(tmp / FEDERATION_FILE, _json_bytes(federation))
        if external_keys is not None and stage is not None:
            _commit_keys(stage, external_keys, tenant_ids)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return PrepareResult(
        fed_dir=out,
        keys_dir=external_keys if external_keys is not None else out / KEYS_DIR,
        plan=plan,
        seconds=time.perf_counter() - start,
    )


def _write_tenant(
    data: PreparedData,
    plan: FederationPlan,
    cfg: PrepareConfig,
    tenant: TenantPlan,
    folder: Path,
    key_stage: Path,
) -> None:
    key = generate_key_file(key_stage / f"{tenant.tenant_id}.key", tenant.tenant_id)
    split = tenant_split(data, plan, tenant, derive_key(key.key, "pseudonym-hmac"))
    folder.mkdir(mode=0o700)
    path = folder / PARTITION_FILE
    encrypt_file(
        path,
        split.to_bytes(),
        key,
        tenant_id=tenant.tenant_id,
        file_name=PARTITION_FILE,
        schema_version=SPLIT_SCHEMA_VERSION,
        chunk_size=cfg.chunk_size,
    )
    manifest = build_manifest(tenant, plan, cfg, key, vault_file_id(path), data.catalog.n_items)
    write_atomic(folder / MANIFEST_FILE, manifest_bytes(manifest))


def _commit_keys(stage: Path, keys_dir: Path, tenant_ids: list[str]) -> None:
    """Move staged keys into ``keys_dir``, retiring keys of the same tenants found there."""
    for tenant in tenant_ids:
        target = keys_dir / f"{tenant}.key"
        if target.exists():
            retire_key_file(target)
        os.link(stage / f"{tenant}.key", target)  # never clobbers
    _fsync_dir(keys_dir)


def _external_keys_dir(out: Path, keys_dir: Path | None) -> Path | None:
    """``keys_dir`` when it lies outside ``out``; None for the default ``out/keys``."""
    if keys_dir is None:
        return None
    keys, fed = Path(keys_dir).resolve(), out.resolve()
    if keys == fed / KEYS_DIR:
        return None
    if keys == fed or fed in keys.parents:
        raise DataError(f"--keys-dir {keys_dir} lies inside --out {out}; keys go to {out}/keys or outside it")
    if keys in fed.parents:
        raise DataError(f"--out {out} lies inside --keys-dir {keys_dir}; keep data and keys apart")
    return Path(keys_dir)


def check_fed_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing non-empty --out, and with --overwrite anything but an earlier federation."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if not (out / FEDERATION_FILE).is_file():
        raise DataError(
            f"--overwrite refuses to replace {out}: it is not a federation folder (no {FEDERATION_FILE})"
        )


# ------------------------------------------------------------------ key rotation


def rotate_tenant_key(
    fed_dir: Path, tenant_id: str, *, keys_dir: Path | None = None
) -> tuple[KeyInfo, Path | None]:
    """Re-encrypt a tenant's partition under a fresh key and retire the old one.

    Returns the new key and where the old key file went (None when a resumed rotation had
    already retired it).

    The new key is generated as ``<tenant>.key.next`` beside the current one; the partition is
    re-encrypted (in memory, atomically replaced), the manifest re-sealed, the old key moved to
    ``retired/`` and the new key renamed into place. An interrupted rotation resumes where it
    stopped when run again. Pseudonyms are not re-derived (the original ids are not kept).
    """
    tenant_dir = Path(fed_dir) / tenant_id
    keys = Path(keys_dir) if keys_dir is not None else Path(fed_dir) / KEYS_DIR
    current, pending = keys / f"{tenant_id}.key", keys / f"{tenant_id}.key.next"
    partition = tenant_dir / PARTITION_FILE
    if not tenant_dir.is_dir():
        raise VaultError(f"Tenant {tenant_id!r} has no folder {tenant_dir}.")
    if pending.exists() and not current.exists():  # interrupted after retiring the old key
        done = read_key_file(pending)
        read_manifest(tenant_dir, done)  # the rotation had finished everything else
        _move_key(pending, current)
        return done, None
    old = read_key_file(current)
    new: KeyInfo | None = None
    manifest: dict[str, Any] | None = None
    if pending.exists():  # resume an interrupted rotation
        new = read_key_file(pending)
        try:
            manifest = read_manifest(tenant_dir, new)  # the manifest was already re-sealed
        except VaultError:
            if _opens_with(partition, new, tenant_id):
                manifest = read_manifest(tenant_dir, old)  # partition done, manifest not yet
                manifest = _resealed(manifest, new, partition)
            else:  # the pending key never encrypted anything
                retire_key_file(pending)
                new = None
    if new is None:
        manifest = dict(load_tenant(tenant_dir, current, expected_tenant=tenant_id).manifest)
        new = generate_key_file(pending, tenant_id)
        reencrypt_file(
            partition,
            old,
            new,
            tenant_id=tenant_id,
            file_name=PARTITION_FILE,
            schema_version=manifest["schema_version"],
        )
        manifest = _resealed(manifest, new, partition)
    assert manifest is not None
    retired = retire_key_file(current)
    _move_key(pending, current)
    return new, retired


def _move_key(source: Path, target: Path) -> None:
    os.link(source, target)  # never clobbers a key
    source.unlink()
    _fsync_dir(target.parent)


def _resealed(manifest: dict[str, Any], new: KeyInfo, partition: Path) -> dict[str, Any]:
    """Point ``manifest`` at the re-encrypted partition and seal it with ``new``; write it."""
    updated = {**manifest, "key_id": new.key_id, "vault_file_id": vault_file_id(partition), "rotated": _now()}
    sealed = seal_manifest(updated, new)
    write_atomic(partition.parent / MANIFEST_FILE, manifest_bytes(sealed))
    return sealed


def _opens_with(partition: Path, key: KeyInfo, tenant_id: str) -> bool:
    try:
        decrypt_file(
            partition, key, tenant_id=tenant_id, file_name=PARTITION_FILE, schema_version=SPLIT_SCHEMA_VERSION
        )
    except VaultError:
        return False
    return True


def federation_tenants(fed_dir: Path) -> list[str]:
    """Tenant ids listed in ``fed_dir/federation.json``."""
    path = Path(fed_dir) / FEDERATION_FILE
    try:
        doc = json.loads(path.read_bytes())
        tenants = doc["tenants"]
        if doc.get("format") != FEDERATION_FORMAT or not all(isinstance(t, str) for t in tenants):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{path} is missing or not a fedrec federation file; run `fedrec prepare` first"
        ) from None
    return list(tenants)


# ------------------------------------------------------------------ helpers


def _json_bytes(obj: object, *, indent: int | None = 2) -> bytes:
    return (json.dumps(obj, indent=indent, allow_nan=False) + "\n").encode("utf-8")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

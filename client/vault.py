"""The secure loader: a tenant folder + its key → the tenant's ``UserSplit``, decrypted in memory only.

Tenant folder (written by ``fedrec prepare``)::

    FED_DIR/tenant-<i>/partition.enc    UserSplit.to_bytes(), chunked AES-256-GCM (fedrec.privacy.crypto)
    FED_DIR/tenant-<i>/manifest.json    tenant id, schema, counts, reports; no identifiers; MAC'd
    FED_DIR/keys/tenant-<i>.key         the tenant's master key (or a keys dir the operator chooses)

The manifest carries an HMAC-SHA256 (``mac``) under a key derived from the tenant's master key
(fedrec.privacy.crypto.derive_key, purpose "manifest-mac"), so an edited manifest is detected, and it records the
random id of the vault file it describes, so an older ``partition.enc`` put back in place
(rollback) or one copied from another folder is refused before anything is decrypted.

:func:`load_tenant` checks, in order: folder and tenant id, key file (mode, format, owner
tenant), manifest (JSON, key id, MAC, format, tenant, file, schema), vault file id, then decrypts
and authenticates every chunk and checks the decoded split against the manifest's counts. Any
failure raises :class:`VaultError` naming the tenant and the file; nothing decrypted is returned
or kept, and plaintext is never written anywhere.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import constant_time, hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from fedrec.privacy.crypto import KeyInfo, decrypt_file, derive_key, read_key_file, vault_file_id
from fedrec.privacy.errors import VaultError
from fedrec.shared_model.data import SPLIT_SCHEMA_VERSION, UserSplit

PARTITION_FILE = "partition.enc"
MANIFEST_FILE = "manifest.json"
FEDERATION_FILE = "federation.json"
CATALOG_FILE = "catalog.json"
KEYS_DIR = "keys"
MANIFEST_FORMAT = "fedrec-tenant-manifest"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KiB; refuse to parse anything huge


def _cache_budget(default_mb: float = 512.0) -> int:
    """``FEDREC_VAULT_CACHE_MB`` in bytes (default 512 MiB; an unreadable or infinite value → default)."""
    try:
        mb = float(os.environ.get("FEDREC_VAULT_CACHE_MB", default_mb))
    except ValueError:
        mb = default_mb
    if not math.isfinite(mb):
        mb = default_mb
    return int(max(0.0, mb) * 2**20)


#: Decrypted tenants kept per process by :func:`load_tenant_cached`: at most ``CACHE_MAX_BYTES`` of
#: partition data (``FEDREC_VAULT_CACHE_MB``; 0 turns the cache off) and at most ``CACHE_MAX_TENANTS``
#: tenants, least recently used evicted first. A simulation worker serves many tenants in turn (100
#: tenants on 2 Ray workers), so a cache of a few tenants would decrypt every tenant again in every
#: round; a 1 000-user tenant is ~0.5 MiB, so the default holds every tenant of such a run. The most
#: recently loaded tenant always stays (it is in memory for training anyway), even if it alone is larger.
CACHE_MAX_BYTES = _cache_budget()
CACHE_MAX_TENANTS = 4096

#: Fields of a manifest (all required, no others).
MANIFEST_FIELDS = frozenset(
    {
        "format",
        "version",
        "tenant",
        "file",
        "schema_version",
        "key_id",
        "vault_file_id",
        "n_items",
        "counts",
        "anonymization",
        "partition",
        "created",
        "rotated",
        "mac",
    }
)
COUNT_FIELDS = ("users", "train_interactions", "users_with_test")


@dataclass(frozen=True)
class TenantData:
    """One tenant's decrypted partition (in memory only; treat the arrays as read-only)."""

    tenant_id: str
    split: UserSplit = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)


def tenant_id_of(partition_id: int) -> str:
    """Tenant id of a simulation partition id: ``tenant-<i>``."""
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or partition_id < 0:
        raise VaultError(f"A partition id must be an integer ≥ 0, got {partition_id!r}.")
    return f"tenant-{partition_id}"


def tenant_paths(fed_dir: Path, partition_id: int, keys_dir: Path | None = None) -> tuple[Path, Path]:
    """(tenant folder, key file) of simulation partition ``partition_id`` in federation ``fed_dir``."""
    tenant = tenant_id_of(partition_id)
    fed_dir = Path(fed_dir)
    tenant_dir = fed_dir / tenant
    if not tenant_dir.is_dir():
        raise VaultError(
            f"Tenant {tenant!r} (partition id {partition_id}) has no folder {tenant_dir}; "
            f"is {fed_dir} a federation made by `fedrec prepare` with more than {partition_id} tenant(s)?"
        )
    keys = Path(keys_dir) if keys_dir is not None else fed_dir / KEYS_DIR
    return tenant_dir, keys / f"{tenant}.key"


# ------------------------------------------------------------------ manifest MAC


def _manifest_key(key: KeyInfo) -> bytes:
    return derive_key(key.key, "manifest-mac")


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "mac"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return b"fedrec-manifest-v1\x00" + text.encode("ascii")


def manifest_mac(manifest: dict[str, Any], key: KeyInfo) -> str:
    """HMAC-SHA256 (hex) of the manifest without its ``mac`` field, under the tenant's manifest key."""
    mac = crypto_hmac.HMAC(_manifest_key(key), hashes.SHA256())
    mac.update(_canonical(manifest))
    return mac.finalize().hex()


def seal_manifest(manifest: dict[str, Any], key: KeyInfo) -> dict[str, Any]:
    """A copy of ``manifest`` with its ``mac`` set for ``key`` (whose id must be the manifest's key id)."""
    if manifest.get("key_id") != key.key_id:
        raise VaultError(
            f"Manifest of tenant {manifest.get('tenant')!r} names another key than {key.key_id}."
        )
    sealed = {k: v for k, v in manifest.items() if k != "mac"}
    sealed["mac"] = manifest_mac(sealed, key)
    return sealed


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written to disk (indented JSON, sorted keys)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_atomic(path: Path, payload: bytes, *, mode: int = 0o644) -> None:
    """Write ``payload`` to a temp file beside ``path``, fsync, rename over it, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------ loading


def read_manifest(tenant_dir: Path, key: KeyInfo) -> dict[str, Any]:
    """Read and authenticate ``tenant_dir/manifest.json`` with ``key``; any problem → VaultError."""
    tenant = Path(tenant_dir).name
    path = Path(tenant_dir) / MANIFEST_FILE
    where = f"Manifest {path} of tenant {tenant!r}"
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise VaultError(f"{where} cannot be read ({exc.strerror}).") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise VaultError(f"{where} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a fedrec manifest.")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise VaultError(f"{where} is corrupted: it is not valid JSON.") from None
    if not isinstance(manifest, dict) or set(manifest) != MANIFEST_FIELDS:
        raise VaultError(f"{where} is corrupted: it must hold exactly the fields {sorted(MANIFEST_FIELDS)}.")
    if manifest["key_id"] != key.key_id:
        raise VaultError(
            f"{where} says the partition is encrypted with key id {manifest['key_id']}, but the key file "
            f"holds key id {key.key_id} (a retired, rotated or wrong key?)."
        )
    mac = manifest["mac"]
    try:
        expected = manifest_mac(manifest, key)
    except ValueError:  # NaN/inf smuggled in: not something prepare writes
        raise VaultError(f"{where} is corrupted: it holds non-finite numbers.") from None
    if not isinstance(mac, str) or not constant_time.bytes_eq(mac.encode(), expected.encode()):
        raise VaultError(
            f"{where} failed authentication: it was edited, corrupted or belongs to another key."
        )
    if manifest["format"] != MANIFEST_FORMAT or manifest["version"] != MANIFEST_VERSION:
        raise VaultError(
            f"{where} has format {manifest['format']!r} v{manifest['version']}; "
            f"this fedrec reads {MANIFEST_FORMAT!r} v{MANIFEST_VERSION}."
        )
    if manifest["tenant"] != tenant:
        raise VaultError(f"{where} describes tenant {manifest['tenant']!r}; the folder was moved or renamed.")
    if manifest["file"] != PARTITION_FILE:
        raise VaultError(f"{where} names the partition file {manifest['file']!r}, not {PARTITION_FILE!r}.")
    if manifest["schema_version"] != SPLIT_SCHEMA_VERSION:
        raise VaultError(
            f"{where} has partition schema {manifest['schema_version']}; this fedrec reads "
            f"schema {SPLIT_SCHEMA_VERSION} (re-run `fedrec prepare`)."
        )
    counts = manifest["counts"]
    if not isinstance(counts, dict) or not all(
        isinstance(counts.get(name), int) and counts[name] >= 0 for name in COUNT_FIELDS
    ):
        raise VaultError(f"{where} has malformed counts (need {', '.join(COUNT_FIELDS)}).")
    return manifest


def load_tenant(tenant_dir: Path, key_file: Path, *, expected_tenant: str | None = None) -> TenantData:
    """Decrypt and validate one tenant's partition in memory; every problem raises :class:`VaultError`."""
    tenant_dir = Path(tenant_dir)
    tenant = tenant_dir.name
    if expected_tenant is not None and tenant != expected_tenant:
        raise VaultError(
            f"Folder {tenant_dir} holds tenant {tenant!r}, not the expected {expected_tenant!r}."
        )
    if not tenant_dir.is_dir():
        raise VaultError(f"Tenant {tenant!r} has no folder {tenant_dir}.")
    try:
        key = read_key_file(key_file)
    except VaultError as exc:
        raise VaultError(f"Cannot load tenant {tenant!r}: {exc}") from None
    if key.tenant != tenant:
        raise VaultError(
            f"Key file {key_file} belongs to tenant {key.tenant!r}, not to tenant {tenant!r} ({tenant_dir})."
        )
    manifest = read_manifest(tenant_dir, key)
    path = tenant_dir / PARTITION_FILE
    where = f"Partition {path} of tenant {tenant!r}"
    if vault_file_id(path) != manifest["vault_file_id"]:
        raise VaultError(
            f"{where} is not the file its manifest describes (vault file id differs): it was rolled back "
            "to an older version, replaced or copied from elsewhere."
        )
    plaintext = decrypt_file(
        path, key, tenant_id=tenant, file_name=PARTITION_FILE, schema_version=manifest["schema_version"]
    )
    try:
        split = UserSplit.from_bytes(plaintext)
    except (ValueError, KeyError, TypeError, AssertionError, OSError, EOFError, zipfile.BadZipFile):
        raise VaultError(
            f"{where} decrypted, but does not hold a valid partition (schema mismatch?)."
        ) from None
    finally:
        del plaintext
    _check_against_manifest(split, manifest, where)
    return TenantData(tenant_id=tenant, split=split, manifest=manifest)


def _check_against_manifest(split: UserSplit, manifest: dict[str, Any], where: str) -> None:
    counts = manifest["counts"]
    found = {
        "users": split.n_users,
        "train_interactions": split.n_train,
        "users_with_test": int((split.test_item >= 0).sum()),
    }
    if any(found[name] != counts[name] for name in COUNT_FIELDS) or split.n_items != manifest["n_items"]:
        raise VaultError(f"{where} does not match its manifest's counts or item count.")
    if len(split.pseudonyms) != split.n_users:
        raise VaultError(f"{where} lacks one pseudonym per user.")
    items = (split.train_items, split.val_item, split.test_item)
    if any(len(a) and (a.max() >= split.n_items or a.min() < -1) for a in items) or (
        split.n_train and split.train_items.min() < 0
    ):
        raise VaultError(f"{where} holds item indices outside the catalogue.")
    if split.user_features.size and split.user_features.min() < 0:
        raise VaultError(f"{where} holds negative user feature codes.")


# ------------------------------------------------------------------ per-process cache

_cache: OrderedDict[tuple[object, ...], tuple[TenantData, int]] = OrderedDict()
_cache_lock = threading.Lock()


def tenant_nbytes(data: TenantData) -> int:
    """Bytes held by a decrypted partition: its arrays plus its pseudonyms (what the cache accounts)."""
    split = data.split
    arrays = sum(int(v.nbytes) for v in vars(split).values() if hasattr(v, "nbytes"))
    return arrays + sum(len(p) + 49 for p in split.pseudonyms)  # 49: CPython's str overhead


def cache_stats() -> dict[str, int]:
    """How many decrypted tenants this process holds, and their bytes."""
    with _cache_lock:
        return {"tenants": len(_cache), "bytes": sum(size for _, size in _cache.values())}


def load_tenant_cached(tenant_dir: Path, key_file: Path, *, expected_tenant: str | None = None) -> TenantData:
    """:func:`load_tenant`, memoized in memory per process (never on disk).

    Keyed by the resolved folder and key file, the key id and the inode/size/mtime of the partition
    and manifest, so a rotated key or a rewritten folder is decrypted (and validated) afresh; the
    entry it replaces is dropped at once. Least recently used tenants are evicted beyond
    ``CACHE_MAX_BYTES`` / ``CACHE_MAX_TENANTS`` (the newest entry always stays).
    """
    tenant_dir, key_file = Path(tenant_dir), Path(key_file)
    try:
        key_id = read_key_file(key_file).key_id
        stats = [os.stat(tenant_dir / name) for name in (PARTITION_FILE, MANIFEST_FILE)]
    except (OSError, VaultError):
        return load_tenant(tenant_dir, key_file, expected_tenant=expected_tenant)  # raises the precise error
    where = (str(tenant_dir.resolve()), str(key_file.resolve()))
    cache_key: tuple[object, ...] = (
        *where,
        key_id,
        expected_tenant,
        *((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats),
    )
    with _cache_lock:
        hit = _cache.get(cache_key)
        if hit is not None:
            _cache.move_to_end(cache_key)
            return hit[0]
    data = load_tenant(tenant_dir, key_file, expected_tenant=expected_tenant)
    if CACHE_MAX_BYTES <= 0:
        return data
    with _cache_lock:
        for stale in [k for k in _cache if k[:2] == where and k != cache_key]:
            del _cache[stale]  # an older version of this tenant (rotated key, rewritten folder)
        _cache[cache_key] = (data, tenant_nbytes(data))
        total = sum(size for _, size in _cache.values())
        while len(_cache) > 1 and (total > CACHE_MAX_BYTES or len(_cache) > CACHE_MAX_TENANTS):
            _, (_, size) = _cache.popitem(last=False)
            total -= size
    return data


def clear_cache() -> None:
    """Forget every decrypted tenant held by :func:`load_tenant_cached`."""
    with _cache_lock:
        _cache.clear()

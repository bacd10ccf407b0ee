"""Encryption at rest for tenant folders: per-tenant master keys, HKDF subkeys, AES-256-GCM files.

Key file (``FED_DIR/keys/<tenant>.key``), JSON, mode 0600, written atomically::

    {"tenant": "tenant-0", "key_id": "<32 hex>", "created": "<ISO 8601 UTC>", "key": "<base64 of 32 bytes>"}

Vault file (``partition.enc``)::

    header  = MAGIC (8) | format version u16 | key_id (16 raw bytes) | file id (16, random)
              | chunk count u64 | chunk size u32 | total plaintext length u64       (62 bytes)
    chunk i = nonce (12, os.urandom) | AES-256-GCM ciphertext of plaintext[i*size:(i+1)*size] | tag (16)

Every chunk's associated data binds the whole header, the tenant id, the file name, the chunk
index, the chunk count, the schema version and the key id. So a flipped bit anywhere, a
truncated or extended file, swapped chunks, a file moved between tenants or renamed, or a
header edit all fail authentication. The random file id (fresh on every write) stops chunks of
two versions of the same file from being spliced together. Replacing a whole file by an older
complete version (rollback) cannot be detected from the file alone; compare
:func:`vault_file_id` with one recorded elsewhere (e.g. a manifest) for that. There is always
at least one chunk (an empty plaintext gives one empty, authenticated chunk), so even the
header of an empty file is authenticated.

The AES key is not the master key: it is ``derive_key(master, "partition-encryption")``.
Nonces are random (96 bits); keep well under 2**32 chunks per key (≈ 4 PB at 1 MiB chunks),
and rotate keys with :func:`reencrypt_file` long before that.

Retired keys are moved, not shredded (:func:`retire_key_file`): overwriting a file does not
reliably erase it on SSDs or journaling/copy-on-write file systems, and an operator may still
need the old key to restore a backup. Deleting ``keys/retired/`` is the operator's decision.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrec.privacy.errors import VaultError

KEY_BYTES = 32  # AES-256 / HMAC-SHA256 key length
KEY_ID_BYTES = 16  # key ids are 32 hex characters
NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16  # 128-bit GCM tag
MAGIC = b"FRVAULT\x00"
FORMAT_VERSION = 1
MAX_CHUNK_SIZE = 1 << 30  # AES-GCM allows ~64 GiB per message; 1 GiB keeps memory use sane
PURPOSES = ("partition-encryption", "pseudonym-hmac", "manifest-mac")

FILE_ID_BYTES = 16
_HEADER = struct.Struct(">8sH16s16sQIQ")  # magic, version, key id, file id, chunk count, chunk size, length
_KEY_FIELDS = frozenset({"tenant", "key_id", "created", "key"})


@dataclass(frozen=True)
class KeyInfo:
    """A tenant's master key. ``repr`` never shows the key bytes."""

    tenant: str
    key_id: str  # 32 lowercase hex characters, random, public (written into every vault header)
    key: bytes = field(repr=False)  # 32 secret bytes
    created: str = ""  # ISO 8601 UTC time of generation ("" when unknown)

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not self.tenant:
            raise VaultError("A key must name a non-empty tenant id.")
        if not _is_key_id(self.key_id):
            raise VaultError(f"Key of tenant {self.tenant!r} has an invalid key id (need 32 hex characters).")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise VaultError(f"Key {self.key_id} of tenant {self.tenant!r} is not {KEY_BYTES} bytes long.")


def _is_key_id(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 2 * KEY_ID_BYTES:
        return False
    return all(c in "0123456789abcdef" for c in value)


# ---------------------------------------------------------------- key files


def generate_key_file(path: str | os.PathLike[str], tenant_id: str) -> KeyInfo:
    """Create a new random master key for ``tenant_id`` at ``path`` (mode 0600); never overwrites."""
    target = Path(path)
    info = KeyInfo(
        tenant=tenant_id,
        key_id=secrets.token_hex(KEY_ID_BYTES),
        key=os.urandom(KEY_BYTES),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if target.exists():
        raise VaultError(
            f"Key file {target} for tenant {tenant_id!r} already exists; refusing to overwrite it."
        )
    document = {
        "tenant": info.tenant,
        "key_id": info.key_id,
        "created": info.created,
        "key": base64.b64encode(info.key).decode("ascii"),
    }
    payload = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # independent of the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # link() is an atomic rename that fails if the target appeared meanwhile (no clobbering).
        os.link(tmp, target)
    except FileExistsError:
        raise VaultError(
            f"Key file {target} for tenant {tenant_id!r} already exists; refusing to overwrite it."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return info


def read_key_file(path: str | os.PathLike[str]) -> KeyInfo:
    """Load a key file, refusing one that group/others can access, is malformed or has a wrong-length key."""
    source = Path(path)
    try:
        mode = source.stat().st_mode
    except OSError as exc:
        raise VaultError(f"Key file {source} cannot be read ({exc.strerror}).") from None
    if mode & 0o077:
        raise VaultError(
            f"Key file {source} is accessible by group or others (mode {mode & 0o777:04o}); "
            "run `chmod 600` on it after checking nobody else copied it."
        )
    try:
        document = json.loads(source.read_bytes())
    except (OSError, ValueError) as exc:
        raise VaultError(
            f"Key file {source} is not a readable JSON key file ({type(exc).__name__})."
        ) from None
    if not isinstance(document, dict) or set(document) != _KEY_FIELDS:
        raise VaultError(f"Key file {source} must hold exactly the fields {sorted(_KEY_FIELDS)}.")
    tenant, key_id, created, key_b64 = (document[k] for k in ("tenant", "key_id", "created", "key"))
    if not isinstance(tenant, str) or not tenant:
        raise VaultError(f"Key file {source} does not name a tenant.")
    if not _is_key_id(key_id):
        raise VaultError(f"Key file {source} of tenant {tenant!r} has an invalid key id.")
    if not isinstance(created, str) or not isinstance(key_b64, str):
        raise VaultError(f"Key file {source} of tenant {tenant!r} has non-string fields.")
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(
            f"Key file {source} of tenant {tenant!r} has a key that is not valid base64."
        ) from None
    if len(key) != KEY_BYTES:
        raise VaultError(
            f"Key file {source} of tenant {tenant!r} holds a {len(key)}-byte key; AES-256 needs {KEY_BYTES}."
        )
    return KeyInfo(tenant=tenant, key_id=key_id, key=key, created=created)


def retire_key_file(path: str | os.PathLike[str]) -> Path:
    """Move a key file into ``retired/`` beside it (folder 0700, file 0600) and return its new path.

    The name gets a UTC timestamp suffix so retiring the same name twice never overwrites.
    """
    source = Path(path)
    if not source.is_file():
        raise VaultError(f"Key file {source} does not exist, so it cannot be retired.")
    retired_dir = source.parent / "retired"
    retired_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(retired_dir, 0o700)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = retired_dir / f"{source.name}.{stamp}"
    os.chmod(source, 0o600)
    os.link(source, target)  # fails rather than overwrite
    source.unlink()
    _fsync_dir(retired_dir)
    _fsync_dir(source.parent)
    return target


# ---------------------------------------------------------------- subkeys


def derive_key(master: bytes, purpose: str) -> bytes:
    """HKDF-SHA256 subkey (32 bytes) of ``master`` for one named purpose (see ``PURPOSES``)."""
    if not isinstance(master, bytes) or len(master) != KEY_BYTES:
        raise VaultError(f"A master key must be {KEY_BYTES} bytes to derive subkeys from it.")
    if purpose not in PURPOSES:
        raise VaultError(f"Unknown key purpose {purpose!r}; expected one of {list(PURPOSES)}.")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fedrec/v1/" + purpose.encode())
    return hkdf.derive(master)


# ---------------------------------------------------------------- vault files


def _lp(data: bytes) -> bytes:
    """Length-prefixed bytes, so concatenated fields cannot be confused with each other."""
    return struct.pack(">I", len(data)) + data


def _associated_data(
    header: bytes, tenant_id: str, file_name: str, index: int, count: int, schema_version: int, key_id: str
) -> bytes:
    return b"".join(
        (
            b"fedrec-vault-aad-v1",
            _lp(header),
            _lp(tenant_id.encode("utf-8")),
            _lp(file_name.encode("utf-8")),
            struct.pack(">QQq", index, count, schema_version),
            _lp(key_id.encode("ascii")),
        )
    )


def _check_identity(tenant_id: str, file_name: str, schema_version: int) -> None:
    if not isinstance(tenant_id, str) or not tenant_id:
        raise VaultError("A vault file needs a non-empty tenant id.")
    if not isinstance(file_name, str) or not file_name:
        raise VaultError(f"A vault file of tenant {tenant_id!r} needs a non-empty file name.")
    if (
        isinstance(schema_version, bool)
        or not isinstance(schema_version, int)
        or not 0 <= schema_version < 2**31
    ):
        raise VaultError(
            f"Schema version for {file_name} of tenant {tenant_id!r} must be an integer in 0..2**31-1."
        )


def encrypt_file(
    path: str | os.PathLike[str],
    plaintext: bytes,
    key: KeyInfo,
    *,
    tenant_id: str,
    file_name: str,
    schema_version: int,
    chunk_size: int = 1 << 20,
) -> None:
    """Encrypt ``plaintext`` into ``path`` (chunked AES-256-GCM), replacing it atomically."""
    _check_identity(tenant_id, file_name, schema_version)
    if key.tenant != tenant_id:
        raise VaultError(f"Key {key.key_id} belongs to tenant {key.tenant!r}, not to tenant {tenant_id!r}.")
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or not 1 <= chunk_size <= MAX_CHUNK_SIZE
    ):
        raise VaultError(
            f"Chunk size for {file_name} of tenant {tenant_id!r} must be in 1..{MAX_CHUNK_SIZE}."
        )
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise VaultError(
            f"Plaintext for {file_name} of tenant {tenant_id!r} must be bytes, "
            f"not {type(plaintext).__name__}."
        )
    data = memoryview(plaintext).cast("B")
    count = max(1, -(-len(data) // chunk_size))
    file_id = os.urandom(FILE_ID_BYTES)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, bytes.fromhex(key.key_id), file_id, count, chunk_size, len(data)
    )
    aes = AESGCM(derive_key(key.key, "partition-encryption"))
    sealed = bytearray(count * (NONCE_BYTES + TAG_BYTES) + len(data))  # chunks encrypted in place
    sealed_view = memoryview(sealed)
    offset = 0
    for index in range(count):
        chunk = data[index * chunk_size : (index + 1) * chunk_size]
        nonce = os.urandom(NONCE_BYTES)
        aad = _associated_data(header, tenant_id, file_name, index, count, schema_version, key.key_id)
        sealed_view[offset : offset + NONCE_BYTES] = nonce
        offset += NONCE_BYTES
        aes.encrypt_into(nonce, chunk, aad, sealed_view[offset : offset + len(chunk) + TAG_BYTES])
        offset += len(chunk) + TAG_BYTES
    _atomic_write(Path(path), [header, sealed])


def decrypt_file(
    path: str | os.PathLike[str], key: KeyInfo, *, tenant_id: str, file_name: str, schema_version: int
) -> bytes:
    """Authenticate and decrypt a whole vault file in memory; any problem raises :class:`VaultError`."""
    _check_identity(tenant_id, file_name, schema_version)
    source = Path(path)
    where = f"Vault file {source} ({file_name}) of tenant {tenant_id!r}"
    try:
        blob = source.read_bytes()
    except OSError as exc:
        raise VaultError(f"{where} cannot be read ({exc.strerror}).") from None
    if len(blob) < _HEADER.size:
        raise VaultError(f"{where} is truncated: it is shorter than a vault header.")
    header = blob[: _HEADER.size]
    magic, version, raw_key_id, _file_id, count, chunk_size, total = _HEADER.unpack(header)
    if magic != MAGIC:
        raise VaultError(f"{where} is not a fedrec vault file (bad magic bytes).")
    if version != FORMAT_VERSION:
        raise VaultError(f"{where} has vault format {version}; this fedrec reads format {FORMAT_VERSION}.")
    expected_key_id = raw_key_id.hex()
    if key.key_id != expected_key_id:
        raise VaultError(
            f"{where} was encrypted with key id {expected_key_id}, but key {key.key_id} "
            f"of tenant {key.tenant!r} was given."
        )
    if key.tenant != tenant_id:
        raise VaultError(
            f"{where} cannot be opened with key {key.key_id}, which belongs to tenant {key.tenant!r}."
        )
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE or count != max(1, -(-total // chunk_size)):
        raise VaultError(f"{where} has an inconsistent header (chunk count, chunk size and length disagree).")
    expected_size = _HEADER.size + count * (NONCE_BYTES + TAG_BYTES) + total
    if len(blob) != expected_size:
        state = "truncated" if len(blob) < expected_size else "longer than its header says (bytes appended)"
        raise VaultError(f"{where} is {state}: {len(blob)} bytes instead of {expected_size}.")
    aes = AESGCM(derive_key(key.key, "partition-encryption"))
    sealed_view = memoryview(blob)
    chunks: list[bytes] = []
    offset = _HEADER.size
    for index in range(count):
        length = min(chunk_size, total - index * chunk_size)
        nonce = sealed_view[offset : offset + NONCE_BYTES]
        sealed = sealed_view[offset + NONCE_BYTES : offset + NONCE_BYTES + length + TAG_BYTES]
        offset += NONCE_BYTES + length + TAG_BYTES
        aad = _associated_data(header, tenant_id, file_name, index, count, schema_version, key.key_id)
        try:
            chunks.append(aes.decrypt(nonce, sealed, aad))
        except InvalidTag:
            chunks.clear()  # nothing decrypted so far is returned or kept
            raise VaultError(
                f"{where} failed authentication at chunk {index + 1} of {count}: it was modified, "
                "reordered, renamed or moved from another tenant, or the schema version or key is wrong."
            ) from None
    return b"".join(chunks)


def reencrypt_file(
    path: str | os.PathLike[str],
    old: KeyInfo,
    new: KeyInfo,
    *,
    tenant_id: str,
    file_name: str,
    schema_version: int,
) -> None:
    """Key rotation: decrypt with ``old`` in memory, atomically replace the file encrypted with ``new``."""
    if old.key_id == new.key_id:
        raise VaultError(
            f"Re-encrypting {file_name} of tenant {tenant_id!r} needs a new key id, not {old.key_id}."
        )
    plaintext = decrypt_file(
        path, old, tenant_id=tenant_id, file_name=file_name, schema_version=schema_version
    )
    chunk_size = _HEADER.unpack(Path(path).read_bytes()[: _HEADER.size])[5]
    encrypt_file(
        path,
        plaintext,
        new,
        tenant_id=tenant_id,
        file_name=file_name,
        schema_version=schema_version,
        chunk_size=chunk_size,
    )


def vault_file_id(path: str | os.PathLike[str]) -> str:
    """The random id (32 hex) of one written version of a vault file; unauthenticated until decrypted."""
    source = Path(path)
    try:
        with source.open("rb") as handle:
            header = handle.read(_HEADER.size)
    except OSError as exc:
        raise VaultError(f"Vault file {source} cannot be read ({exc.strerror}).") from None
    if len(header) < _HEADER.size or header[:8] != MAGIC:
        raise VaultError(f"Vault file {source} is not a fedrec vault file (bad or missing header).")
    file_id: bytes = _HEADER.unpack(header)[3]
    return file_id.hex()


# ---------------------------------------------------------------- atomic I/O


def _atomic_write(target: Path, parts: list[bytes | bytearray]) -> None:
    """Write to a 0600 temp file in the same folder, fsync, rename over ``target``, fsync the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

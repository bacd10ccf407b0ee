"""Tenant data vault: key files, HKDF subkeys, chunked AES-256-GCM files, rotation, atomicity."""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pytest

from fedrec.privacy import crypto
from fedrec.privacy.crypto import (
    KeyInfo,
    decrypt_file,
    derive_key,
    encrypt_file,
    generate_key_file,
    read_key_file,
    reencrypt_file,
    retire_key_file,
)
from fedrec.privacy.errors import VaultError

HEADER = crypto._HEADER.size  # 62 bytes
OVERHEAD = crypto.NONCE_BYTES + crypto.TAG_BYTES  # 28 bytes per chunk
MARKER = b"PLAINTEXT-MARKER-7f3a9c"
CHUNK = 64


def _plaintext(n_bytes: int) -> bytes:
    """Deterministic bytes with a distinctive marker repeated through every chunk."""
    body = (MARKER + bytes(range(256))) * (n_bytes // (len(MARKER) + 256) + 1)
    return body[:n_bytes]


def _chunk_spans(n_bytes: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each sealed chunk (nonce | ciphertext | tag) in the vault file."""
    count = max(1, -(-n_bytes // chunk))
    spans, offset = [], HEADER
    for i in range(count):
        size = OVERHEAD + min(chunk, n_bytes - i * chunk)
        spans.append((offset, offset + size))
        offset += size
    return spans


@pytest.fixture
def key_a(tmp_path: Path) -> KeyInfo:
    return generate_key_file(tmp_path / "keys" / "tenant-a.key", "tenant-a")


@pytest.fixture
def key_b(tmp_path: Path) -> KeyInfo:
    return generate_key_file(tmp_path / "keys" / "tenant-b.key", "tenant-b")


def _encrypt(path: Path, data: bytes, key: KeyInfo, chunk: int = CHUNK, **kw: object) -> None:
    args: dict[str, object] = {"tenant_id": key.tenant, "file_name": "partition.enc", "schema_version": 1}
    args.update(kw)
    encrypt_file(path, data, key, chunk_size=chunk, **args)  # type: ignore[arg-type]


def _decrypt(path: Path, key: KeyInfo, **kw: object) -> bytes:
    args: dict[str, object] = {"tenant_id": key.tenant, "file_name": "partition.enc", "schema_version": 1}
    args.update(kw)
    return decrypt_file(path, key, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- key files


def test_key_file_is_0600_json_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "t.key"
    info = generate_key_file(path, "t")
    assert path.stat().st_mode & 0o777 == 0o600
    document = json.loads(path.read_text())
    assert set(document) == {"tenant", "key_id", "created", "key"}
    assert document["tenant"] == "t" and document["key_id"] == info.key_id and len(info.key_id) == 32
    assert base64.b64decode(document["key"]) == info.key and len(info.key) == 32
    assert read_key_file(path) == info
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_key_repr_hides_key_bytes(key_a: KeyInfo) -> None:
    text = repr(key_a) + str(key_a)
    assert key_a.key_id in text
    assert key_a.key.hex() not in text and base64.b64encode(key_a.key).decode() not in text
    assert "key=" not in text.replace("key_id=", "")


def test_generate_refuses_to_overwrite(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "keys" / "tenant-a.key"
    before = path.read_bytes()
    with pytest.raises(VaultError, match="already exists"):
        generate_key_file(path, "tenant-a")
    assert path.read_bytes() == before


def test_key_file_readable_by_others_is_refused(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "keys" / "tenant-a.key"
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(VaultError, match=f"mode {mode:04o}"):
            read_key_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not a readable JSON"),
        (b"[]", "exactly the fields"),
        (b'{"tenant": "t"}', "exactly the fields"),
        (b'{"tenant": "t", "key_id": "zz", "created": "", "key": ""}', "invalid key id"),
        (
            b'{"tenant": "", "key_id": "' + b"0" * 32 + b'", "created": "", "key": ""}',
            "does not name a tenant",
        ),
        (b'{"tenant": "t", "key_id": "' + b"0" * 32 + b'", "created": "", "key": "!!"}', "not valid base64"),
        (
            b'{"tenant": "t", "key_id": "'
            + b"0" * 32
            + b'", "created": "", "key": "'
            + base64.b64encode(b"k" * 16)
            + b'"}',
            "16-byte key",
        ),
    ],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(VaultError, match=message):
        read_key_file(path)


def test_missing_key_file_is_a_vault_error(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="cannot be read"):
        read_key_file(tmp_path / "absent.key")


def test_derive_key_separates_purposes_and_masters() -> None:
    master = bytes(range(32))
    enc, mac = derive_key(master, "partition-encryption"), derive_key(master, "pseudonym-hmac")
    assert len(enc) == len(mac) == 32 and enc != mac and master not in (enc, mac)
    assert derive_key(master, "partition-encryption") == enc  # deterministic
    assert derive_key(bytes(32), "partition-encryption") != enc
    with pytest.raises(VaultError, match="Unknown key purpose"):
        derive_key(master, "other")
    with pytest.raises(VaultError, match="32 bytes"):
        derive_key(b"short", "pseudonym-hmac")


# ---------------------------------------------------------------- round trips and format


@pytest.mark.parametrize("n_bytes", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK, 10 * CHUNK + 7])
def test_round_trip(tmp_path: Path, key_a: KeyInfo, n_bytes: int) -> None:
    data, path = _plaintext(n_bytes), tmp_path / "partition.enc"
    _encrypt(path, data, key_a)
    count = max(1, -(-n_bytes // CHUNK))
    assert path.stat().st_size == HEADER + count * OVERHEAD + n_bytes
    assert _decrypt(path, key_a) == data


def test_default_chunk_size_round_trip(tmp_path: Path, key_a: KeyInfo) -> None:
    data, path = os.urandom(3 * (1 << 20) + 5), tmp_path / "partition.enc"
    encrypt_file(path, data, key_a, tenant_id="tenant-a", file_name="partition.enc", schema_version=3)
    assert path.stat().st_size == HEADER + 4 * OVERHEAD + len(data)
    assert (
        decrypt_file(path, key_a, tenant_id="tenant-a", file_name="partition.enc", schema_version=3) == data
    )


def test_header_fields(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(200), key_a)
    magic, version, key_id, file_id, count, chunk, total = crypto._HEADER.unpack(path.read_bytes()[:HEADER])
    assert file_id.hex() == crypto.vault_file_id(path)
    assert (magic, version, key_id.hex(), count, chunk, total) == (
        b"FRVAULT\x00",
        1,
        key_a.key_id,
        4,
        64,
        200,
    )


def test_no_plaintext_in_ciphertext_file(tmp_path: Path, key_a: KeyInfo) -> None:
    data, path = _plaintext(5000), tmp_path / "partition.enc"
    assert data.count(MARKER) > 10
    _encrypt(path, data, key_a)
    blob = path.read_bytes()
    assert MARKER not in blob and MARKER[:8] not in blob
    assert key_a.key not in blob and derive_key(key_a.key, "partition-encryption") not in blob


def test_nonces_are_unique_over_many_chunks(tmp_path: Path, key_a: KeyInfo) -> None:
    nonces: list[bytes] = []
    for name in ("a.enc", "b.enc"):  # the same plaintext twice must not reuse nonces either
        path = tmp_path / name
        _encrypt(path, _plaintext(4000), key_a, chunk=1)
        blob = path.read_bytes()
        nonces += [blob[start : start + 12] for start, _ in _chunk_spans(4000, 1)]
    assert len(nonces) == 8000 and len(set(nonces)) == 8000


# ---------------------------------------------------------------- tampering


def test_flipped_bit_in_every_chunk_is_detected(tmp_path: Path, key_a: KeyInfo) -> None:
    data, path = _plaintext(5 * CHUNK + 9), tmp_path / "partition.enc"
    _encrypt(path, data, key_a)
    original = path.read_bytes()
    spans = _chunk_spans(len(data), CHUNK)
    assert len(spans) == 6
    for index, (start, end) in enumerate(spans):
        for position in (start, start + 12, end - 1):  # nonce, ciphertext, tag
            tampered = bytearray(original)
            tampered[position] ^= 0x01
            path.write_bytes(bytes(tampered))
            with pytest.raises(VaultError, match=rf"tenant 'tenant-a'.*chunk {index + 1} of 6") as info:
                _decrypt(path, key_a)
            assert "partition.enc" in str(info.value)
    path.write_bytes(original)
    assert _decrypt(path, key_a) == data


@pytest.mark.parametrize("offset", range(8, HEADER))  # every header byte after the magic
def test_header_tamper_is_detected(tmp_path: Path, key_a: KeyInfo, offset: int) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(3 * CHUNK), key_a)
    tampered = bytearray(path.read_bytes())
    tampered[offset] ^= 0x80
    path.write_bytes(bytes(tampered))
    with pytest.raises(VaultError, match="tenant 'tenant-a'"):
        _decrypt(path, key_a)


def test_header_tamper_with_consistent_sizes_fails_authentication(tmp_path: Path, key_a: KeyInfo) -> None:
    """Rewrite chunk size + count so the file length still matches: only the AAD catches it."""
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(4 * CHUNK), key_a)  # 4 chunks of 64 = 368 bytes of sealed chunks
    blob = path.read_bytes()
    magic, version, key_id, file_id, _count, _chunk, total = crypto._HEADER.unpack(blob[:HEADER])
    # Keep total and count, change only the chunk size: ceil(256 / 65) is still 4 chunks and the
    # expected file length is unchanged, so only the header bound into every chunk's AAD catches it.
    forged = crypto._HEADER.pack(magic, version, key_id, file_id, 4, 65, total)
    path.write_bytes(forged + blob[HEADER:])
    with pytest.raises(VaultError, match="failed authentication at chunk 1 of 4"):
        _decrypt(path, key_a)


def test_bad_magic(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"x", key_a)
    path.write_bytes(b"NOTVAULT" + path.read_bytes()[8:])
    with pytest.raises(VaultError, match=r"tenant 'tenant-a' is not a fedrec vault file \(bad magic"):
        _decrypt(path, key_a)


def test_unknown_format_version(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"x", key_a)
    blob = bytearray(path.read_bytes())
    blob[8:10] = struct.pack(">H", 2)
    path.write_bytes(bytes(blob))
    with pytest.raises(VaultError, match="vault format 2"):
        _decrypt(path, key_a)


@pytest.mark.parametrize("cut", [1, 16, 28, 64 + 28, 3 * (64 + 28)])
def test_truncation_is_detected(tmp_path: Path, key_a: KeyInfo, cut: int) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(3 * CHUNK + 5), key_a)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(VaultError, match="tenant 'tenant-a' is truncated"):
        _decrypt(path, key_a)


def test_truncated_to_less_than_a_header(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"abc", key_a)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(VaultError, match="shorter than a vault header"):
        _decrypt(path, key_a)


def test_dropping_the_last_chunk_and_fixing_the_header_is_detected(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(3 * CHUNK), key_a)
    blob = path.read_bytes()
    magic, version, key_id, file_id, _, chunk, _ = crypto._HEADER.unpack(blob[:HEADER])
    header = crypto._HEADER.pack(magic, version, key_id, file_id, 2, chunk, 2 * CHUNK)
    path.write_bytes(header + blob[HEADER : HEADER + 2 * (CHUNK + OVERHEAD)])
    with pytest.raises(VaultError, match="failed authentication at chunk 1 of 2"):
        _decrypt(path, key_a)


@pytest.mark.parametrize("extra", [b"\x00", os.urandom(28), os.urandom(64 + 28)])
def test_appended_bytes_are_detected(tmp_path: Path, key_a: KeyInfo, extra: bytes) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(2 * CHUNK), key_a)
    path.write_bytes(path.read_bytes() + extra)
    with pytest.raises(VaultError, match="longer than its header says"):
        _decrypt(path, key_a)


def test_swapped_chunks_are_detected(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, _plaintext(4 * CHUNK), key_a)  # four full, equal-size chunks
    blob = path.read_bytes()
    (a0, a1), (b0, b1) = _chunk_spans(4 * CHUNK, CHUNK)[1:3]
    path.write_bytes(blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:])
    with pytest.raises(VaultError, match="failed authentication at chunk 2 of 4"):
        _decrypt(path, key_a)


def test_chunks_of_two_versions_cannot_be_spliced(tmp_path: Path, key_a: KeyInfo) -> None:
    """Same tenant, name, key, length and chunk index: only the per-write file id tells them apart."""
    path, old_copy = tmp_path / "partition.enc", tmp_path / "old.bin"
    _encrypt(path, b"A" * (2 * CHUNK), key_a)
    old_copy.write_bytes(path.read_bytes())
    first_id = crypto.vault_file_id(path)
    _encrypt(path, b"B" * (2 * CHUNK), key_a)
    assert crypto.vault_file_id(path) != first_id
    new, old = path.read_bytes(), old_copy.read_bytes()
    start, end = _chunk_spans(2 * CHUNK, CHUNK)[1]
    path.write_bytes(new[:start] + old[start:end])
    with pytest.raises(VaultError, match="failed authentication at chunk 2 of 2"):
        _decrypt(path, key_a)


def test_vault_file_id_of_a_non_vault_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.bin"
    path.write_bytes(b"hello")
    with pytest.raises(VaultError, match="not a fedrec vault file"):
        crypto.vault_file_id(path)


def test_files_swapped_between_tenants_are_refused(tmp_path: Path, key_a: KeyInfo, key_b: KeyInfo) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path_a, path_b = tmp_path / "a" / "partition.enc", tmp_path / "b" / "partition.enc"
    _encrypt(path_a, b"secret of A " * 20, key_a)
    _encrypt(path_b, b"secret of B " * 20, key_b)
    blob_a, blob_b = path_a.read_bytes(), path_b.read_bytes()
    path_a.write_bytes(blob_b)
    path_b.write_bytes(blob_a)
    with pytest.raises(VaultError, match=f"tenant 'tenant-a' was encrypted with key id {key_b.key_id}"):
        _decrypt(path_a, key_a)
    with pytest.raises(VaultError, match=f"tenant 'tenant-b' was encrypted with key id {key_a.key_id}"):
        _decrypt(path_b, key_b)


def test_tenant_id_is_bound_even_under_the_same_key(tmp_path: Path, key_a: KeyInfo) -> None:
    """A file moved to another tenant fails even if that tenant somehow held the same key bytes."""
    path = tmp_path / "partition.enc"
    _encrypt(path, b"records", key_a)
    impostor = KeyInfo(tenant="tenant-b", key_id=key_a.key_id, key=key_a.key)
    with pytest.raises(VaultError, match="tenant 'tenant-b' failed authentication at chunk 1 of 1"):
        _decrypt(path, impostor)


def test_wrong_file_name_and_schema_version_are_refused(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"records", key_a)
    with pytest.raises(VaultError, match=r"\(manifest.json\) of tenant 'tenant-a' failed authentication"):
        _decrypt(path, key_a, file_name="manifest.json")
    with pytest.raises(VaultError, match="failed authentication"):
        _decrypt(path, key_a, schema_version=2)
    assert _decrypt(path, key_a) == b"records"


def test_wrong_key_names_the_expected_key_id(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"records", key_a)
    other = generate_key_file(tmp_path / "keys" / "tenant-a-2.key", "tenant-a")
    with pytest.raises(VaultError, match=f"encrypted with key id {key_a.key_id}, but key {other.key_id}"):
        _decrypt(path, other)


def test_same_key_id_with_wrong_key_bytes_fails_authentication(tmp_path: Path, key_a: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"records", key_a)
    forged = KeyInfo(tenant="tenant-a", key_id=key_a.key_id, key=bytes(32))
    with pytest.raises(VaultError, match="failed authentication at chunk 1 of 1"):
        _decrypt(path, forged)


def test_another_tenants_key_is_refused(tmp_path: Path, key_a: KeyInfo, key_b: KeyInfo) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"records", key_a)
    with pytest.raises(
        VaultError, match=f"key id {key_a.key_id}, but key {key_b.key_id} of tenant 'tenant-b'"
    ):
        _decrypt(path, key_b, tenant_id="tenant-a")
    with pytest.raises(VaultError, match="belongs to tenant 'tenant-b', not to tenant 'tenant-a'"):
        _encrypt(tmp_path / "x.enc", b"records", key_b, tenant_id="tenant-a")
    assert not (tmp_path / "x.enc").exists()


def test_non_bytes_plaintext_is_refused(tmp_path: Path, key_a: KeyInfo) -> None:
    with pytest.raises(VaultError, match="must be bytes, not str"):
        _encrypt(tmp_path / "partition.enc", "records", key_a)  # type: ignore[arg-type]
    assert not (tmp_path / "partition.enc").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk": 0}, "Chunk size"),
        ({"chunk": crypto.MAX_CHUNK_SIZE + 1}, "Chunk size"),
        ({"file_name": ""}, "non-empty file name"),
        ({"schema_version": -1}, "Schema version"),
        ({"schema_version": 2**31}, "Schema version"),
    ],
)
def test_bad_encrypt_arguments_write_nothing(
    tmp_path: Path, key_a: KeyInfo, kwargs: dict[str, object], message: str
) -> None:
    path = tmp_path / "partition.enc"
    with pytest.raises(VaultError, match=message):
        _encrypt(path, b"records", key_a, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.glob("*.enc*")) == [] and list(tmp_path.glob(".partition*")) == []


# ---------------------------------------------------------------- rotation and retirement


def test_rotation_keeps_data_and_rejects_the_old_key(tmp_path: Path, key_a: KeyInfo) -> None:
    data, path = _plaintext(5 * CHUNK + 3), tmp_path / "partition.enc"
    _encrypt(path, data, key_a)
    new = generate_key_file(tmp_path / "keys" / "tenant-a.new.key", "tenant-a")
    reencrypt_file(path, key_a, new, tenant_id="tenant-a", file_name="partition.enc", schema_version=1)
    assert _decrypt(path, new) == data
    assert crypto._HEADER.unpack(path.read_bytes()[:HEADER])[5] == CHUNK  # chunk size kept
    with pytest.raises(VaultError, match=f"encrypted with key id {new.key_id}"):
        _decrypt(path, key_a)
    retired = retire_key_file(tmp_path / "keys" / "tenant-a.key")
    assert retired.parent == tmp_path / "keys" / "retired"
    assert retired.stat().st_mode & 0o777 == 0o600 and retired.parent.stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / "keys" / "tenant-a.key").exists()
    assert read_key_file(retired) == key_a


def test_rotation_with_wrong_old_key_leaves_file_untouched(
    tmp_path: Path, key_a: KeyInfo, key_b: KeyInfo
) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"records", key_a)
    before = path.read_bytes()
    new = generate_key_file(tmp_path / "keys" / "tenant-a.new.key", "tenant-a")
    with pytest.raises(VaultError, match=f"encrypted with key id {key_a.key_id}"):
        reencrypt_file(path, key_b, new, tenant_id="tenant-a", file_name="partition.enc", schema_version=1)
    with pytest.raises(VaultError, match="needs a new key id"):
        reencrypt_file(path, key_a, key_a, tenant_id="tenant-a", file_name="partition.enc", schema_version=1)
    assert path.read_bytes() == before


def test_retire_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="does not exist"):
        retire_key_file(tmp_path / "none.key")


# ---------------------------------------------------------------- atomicity


def test_failed_write_leaves_no_final_file(
    tmp_path: Path, key_a: KeyInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    path = tmp_path / "vault" / "partition.enc"
    with pytest.raises(OSError, match="No space left"):
        _encrypt(path, _plaintext(1000), key_a)
    assert list((tmp_path / "vault").iterdir()) == []  # neither the final file nor the temp file


def test_failed_rewrite_keeps_the_previous_file(
    tmp_path: Path, key_a: KeyInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "partition.enc"
    _encrypt(path, b"old records", key_a)
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        _encrypt(path, b"new records", key_a)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.glob("*partition*")] == ["partition.enc"]
    assert _decrypt(path, key_a) == b"old records"


def test_vault_temp_file_is_private(tmp_path: Path, key_a: KeyInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[int] = []
    real_replace = os.replace

    def spying_replace(src: str, dst: str) -> None:
        modes.append(os.stat(src).st_mode & 0o777)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    _encrypt(tmp_path / "partition.enc", b"records", key_a)
    assert modes == [0o600]

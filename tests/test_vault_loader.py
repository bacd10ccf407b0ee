"""The secure loader: round trip, and every tampering refused with the tenant and file named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedrec.client import vault
from fedrec.client.vault import (
    load_tenant,
    load_tenant_cached,
    manifest_bytes,
    seal_manifest,
    tenant_paths,
)
from fedrec.privacy import crypto
from fedrec.privacy.crypto import decrypt_file, encrypt_file, generate_key_file, read_key_file, vault_file_id
from fedrec.privacy.errors import VaultError
from fedrec.shared_model.data import SPLIT_SCHEMA_VERSION
from fedrec.simulations.data.dataset import PreparedData, prepare_dataset
from fedrec.simulations.data.prepare import (
    PrepareConfig,
    PrepareResult,
    prepare_federation,
    rotate_tenant_key,
)
from fedrec.simulations.data.sources import synthetic

CHUNK = 2048  # small chunks: every partition spans several


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return prepare_dataset(synthetic(users=80, items=60, seed=7))


@pytest.fixture(scope="module")
def template(data: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    out = tmp_path_factory.mktemp("template") / "fed"
    return prepare_federation(data, out, PrepareConfig(tenants=2, seed=1, chunk_size=CHUNK))


@pytest.fixture
def fed(template: PrepareResult, tmp_path: Path) -> Path:
    """A fresh copy of the template federation (modes preserved) that a test may damage."""
    vault.clear_cache()
    target = tmp_path / "fed"
    shutil.copytree(template.fed_dir, target)
    return target


def _load(fed: Path, i: int = 0) -> vault.TenantData:
    return load_tenant(*tenant_paths(fed, i), expected_tenant=f"tenant-{i}")


def _refused(fed: Path, i: int, *patterns: str) -> VaultError:
    """Loading tenant i fails with a VaultError naming the tenant and each pattern; nothing is cached."""
    with pytest.raises(VaultError) as info:
        load_tenant_cached(*tenant_paths(fed, i), expected_tenant=f"tenant-{i}")
    message = str(info.value)
    assert f"tenant-{i}" in message
    for pattern in patterns:
        assert pattern in message, message
    assert not vault._cache, "a failed load leaves nothing decrypted behind"
    return info.value


def _spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each sealed chunk in a vault file."""
    blob = path.read_bytes()
    count, size, total = crypto._HEADER.unpack(blob[: crypto._HEADER.size])[4:7]
    spans, offset = [], crypto._HEADER.size
    for i in range(count):
        length = crypto.NONCE_BYTES + min(size, total - i * size) + crypto.TAG_BYTES
        spans.append((offset, offset + length))
        offset += length
    return spans


def test_round_trip_equals_the_in_memory_split(
    fed: Path, data: PreparedData, template: PrepareResult
) -> None:
    for i, plan in enumerate(template.plan.tenants):
        loaded = _load(fed, i)
        expected = data.split.subset(plan.users)
        assert loaded.tenant_id == f"tenant-{i}"
        for name in ("indptr", "train_items", "train_ctx", "val_item", "test_item", "val_ctx", "test_ctx"):
            assert np.array_equal(getattr(loaded.split, name), getattr(expected, name)), name
        assert loaded.split.n_items == data.catalog.n_items
        assert len(set(loaded.split.pseudonyms)) == loaded.split.n_users
        assert loaded.manifest["counts"]["users"] == len(plan.users)


def test_tenant_paths_maps_partition_ids(fed: Path, tmp_path: Path) -> None:
    assert tenant_paths(fed, 1) == (fed / "tenant-1", fed / "keys" / "tenant-1.key")
    assert tenant_paths(fed, 0, tmp_path / "k") == (fed / "tenant-0", tmp_path / "k" / "tenant-0.key")
    with pytest.raises(VaultError, match="'tenant-2' .partition id 2. has no folder"):
        tenant_paths(fed, 2)
    with pytest.raises(VaultError, match="integer ≥ 0"):
        tenant_paths(fed, -1)


def test_every_chunk_with_a_flipped_bit_is_refused(fed: Path) -> None:
    path = fed / "tenant-0" / "partition.enc"
    original = path.read_bytes()
    spans = _spans(path)
    assert len(spans) >= 3
    for start, end in spans:
        for offset in (start, (start + end) // 2, end - 1):  # nonce, ciphertext, tag
            damaged = bytearray(original)
            damaged[offset] ^= 0x01
            path.write_bytes(bytes(damaged))
            _refused(fed, 0, str(path), "failed authentication")
    path.write_bytes(original)
    assert _load(fed, 0).split.n_users > 0


def test_header_bit_flip_is_refused(fed: Path) -> None:
    path = fed / "tenant-0" / "partition.enc"
    damaged = bytearray(path.read_bytes())
    damaged[40] ^= 0x80  # inside the file id: the manifest no longer matches
    path.write_bytes(bytes(damaged))
    _refused(fed, 0, str(path), "vault file id differs")


@pytest.mark.parametrize("cut", [1, crypto.TAG_BYTES, CHUNK + 28])
def test_truncated_partition_is_refused(fed: Path, cut: int) -> None:
    path = fed / "tenant-0" / "partition.enc"
    path.write_bytes(path.read_bytes()[:-cut])
    _refused(fed, 0, str(path), "truncated")


def test_appended_bytes_are_refused(fed: Path) -> None:
    path = fed / "tenant-0" / "partition.enc"
    path.write_bytes(path.read_bytes() + b"\x00" * 7)
    _refused(fed, 0, str(path), "bytes appended")


def test_swapped_chunks_are_refused(fed: Path) -> None:
    path = fed / "tenant-0" / "partition.enc"
    blob = path.read_bytes()
    (a0, a1), (b0, b1) = _spans(path)[:2]  # two full chunks, same length
    path.write_bytes(blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:])
    _refused(fed, 0, str(path), "failed authentication at chunk 1")


def test_partitions_swapped_between_tenants_are_refused(fed: Path) -> None:
    p0, p1 = fed / "tenant-0" / "partition.enc", fed / "tenant-1" / "partition.enc"
    b0, b1 = p0.read_bytes(), p1.read_bytes()
    p0.write_bytes(b1)
    p1.write_bytes(b0)
    _refused(fed, 0, str(p0), "vault file id differs")
    _refused(fed, 1, str(p1), "vault file id differs")


def test_whole_folders_swapped_between_tenants_are_refused(fed: Path) -> None:
    (fed / "tenant-0").rename(fed / "tmp")
    (fed / "tenant-1").rename(fed / "tenant-0")
    (fed / "tmp").rename(fed / "tenant-1")
    _refused(fed, 0, "manifest.json", "key id")  # tenant-1's manifest names tenant-1's key


def test_wrong_key_is_refused(fed: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "keys" / "tenant-0.key"
    generate_key_file(stranger, "tenant-0")
    with pytest.raises(VaultError, match=r"tenant-0.*key id") as info:
        load_tenant(fed / "tenant-0", stranger)
    assert "manifest.json" in str(info.value)


def test_same_key_id_with_other_key_bytes_is_refused(fed: Path) -> None:
    key_file = fed / "keys" / "tenant-0.key"
    doc = json.loads(key_file.read_text())
    doc["key"] = "A" * 43 + "="  # 32 zero bytes, same key id
    key_file.write_text(json.dumps(doc))
    _refused(fed, 0, "manifest.json", "failed authentication")


def test_another_tenants_key_is_refused(fed: Path) -> None:
    with pytest.raises(VaultError, match=r"belongs to tenant 'tenant-1', not to tenant 'tenant-0'"):
        load_tenant(fed / "tenant-0", fed / "keys" / "tenant-1.key")


def test_key_readable_by_others_is_refused(fed: Path) -> None:
    os.chmod(fed / "keys" / "tenant-0.key", 0o644)
    _refused(fed, 0, "chmod 600")


def test_unexpected_tenant_is_refused(fed: Path) -> None:
    with pytest.raises(VaultError, match="holds tenant 'tenant-0', not the expected 'tenant-1'"):
        load_tenant(fed / "tenant-0", fed / "keys" / "tenant-0.key", expected_tenant="tenant-1")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.__setitem__("counts", {**m["counts"], "users": 1}), "failed authentication"),
        (lambda m: m.__setitem__("tenant", "tenant-1"), "failed authentication"),
        (lambda m: m.pop("vault_file_id"), "must hold exactly the fields"),
        (lambda m: m.__setitem__("extra", 1), "must hold exactly the fields"),
    ],
)
def test_edited_manifest_is_refused(fed: Path, edit: object, message: str) -> None:
    path = fed / "tenant-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)  # type: ignore[operator]
    path.write_bytes(manifest_bytes(manifest))
    _refused(fed, 0, str(path), message)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b"\xff\xfe"])
def test_corrupted_manifest_is_refused(fed: Path, content: bytes) -> None:
    path = fed / "tenant-0" / "manifest.json"
    path.write_bytes(content)
    _refused(fed, 0, str(path), "corrupted")


def test_missing_manifest_is_refused(fed: Path) -> None:
    (fed / "tenant-0" / "manifest.json").unlink()
    _refused(fed, 0, "manifest.json", "cannot be read")


def test_manifest_sealed_with_the_right_key_but_wrong_counts_is_refused(fed: Path) -> None:
    key = read_key_file(fed / "keys" / "tenant-0.key")
    path = fed / "tenant-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["counts"]["train_interactions"] += 1
    path.write_bytes(manifest_bytes(seal_manifest(manifest, key)))
    _refused(fed, 0, "partition.enc", "does not match its manifest")


def test_rolled_back_partition_is_refused(fed: Path) -> None:
    """Tenant writes a new version (same key); putting the old file back is detected."""
    folder, key = fed / "tenant-0", read_key_file(fed / "keys" / "tenant-0.key")
    path = folder / "partition.enc"
    old = path.read_bytes()
    identity = {"tenant_id": "tenant-0", "file_name": "partition.enc", "schema_version": SPLIT_SCHEMA_VERSION}
    encrypt_file(path, decrypt_file(path, key, **identity), key, **identity)  # type: ignore[arg-type]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["vault_file_id"] = vault_file_id(path)
    (folder / "manifest.json").write_bytes(manifest_bytes(seal_manifest(manifest, key)))
    assert _load(fed, 0).split.n_users > 0
    path.write_bytes(old)
    _refused(fed, 0, str(path), "rolled back")


def test_rotation_rejects_the_old_key_and_keeps_the_data(fed: Path) -> None:
    before = _load(fed, 1)
    old_key = fed / "keys" / "tenant-1.key"
    old_id = read_key_file(old_key).key_id
    new, retired = rotate_tenant_key(fed, "tenant-1")
    assert retired is not None and retired.parent == fed / "keys" / "retired"
    assert new.key_id != old_id and read_key_file(old_key).key_id == new.key_id
    after = _load(fed, 1)
    assert np.array_equal(after.split.train_items, before.split.train_items)
    assert after.split.pseudonyms == before.split.pseudonyms
    assert after.manifest["rotated"] is not None
    with pytest.raises(VaultError, match=f"holds key id {old_id}"):
        load_tenant(fed / "tenant-1", retired)
    assert _load(fed, 0).split.n_users > 0  # other tenants untouched


def test_interrupted_rotation_resumes(fed: Path) -> None:
    """Crash after the partition was re-encrypted but before the manifest was re-sealed."""
    before = _load(fed, 0)
    keys = fed / "keys"
    old = read_key_file(keys / "tenant-0.key")
    pending = generate_key_file(keys / "tenant-0.key.next", "tenant-0")
    crypto.reencrypt_file(
        fed / "tenant-0" / "partition.enc",
        old,
        pending,
        tenant_id="tenant-0",
        file_name="partition.enc",
        schema_version=SPLIT_SCHEMA_VERSION,
    )
    _refused(fed, 0)  # half-rotated: refused, never half-loaded
    new, _ = rotate_tenant_key(fed, "tenant-0")
    assert new.key_id == pending.key_id and not (keys / "tenant-0.key.next").exists()
    assert np.array_equal(_load(fed, 0).split.train_items, before.split.train_items)


def test_cache_decrypts_once_and_notices_rotation(fed: Path) -> None:
    paths = tenant_paths(fed, 0)
    first = load_tenant_cached(*paths)
    assert load_tenant_cached(*paths) is first
    rotate_tenant_key(fed, "tenant-0")
    second = load_tenant_cached(*paths)
    assert second is not first
    assert np.array_equal(second.split.train_items, first.split.train_items)
    vault.clear_cache()
    assert load_tenant_cached(*paths) is not second


def test_repr_shows_no_data(fed: Path) -> None:
    text = repr(_load(fed, 0))
    assert text == "TenantData(tenant_id='tenant-0')"


@pytest.fixture(scope="module")
def six(data: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation of six tenants: more than a worker of a 2-worker simulation used to keep."""
    out = tmp_path_factory.mktemp("six") / "fed"
    return prepare_federation(data, out, PrepareConfig(tenants=6, seed=2, chunk_size=CHUNK)).fed_dir


def _cached(fed: Path, i: int) -> vault.TenantData:
    return load_tenant_cached(*tenant_paths(fed, i), expected_tenant=f"tenant-{i}")


def test_cache_keeps_every_tenant_of_a_run_within_its_budget(six: Path) -> None:
    vault.clear_cache()
    first = [_cached(six, i) for i in range(6)]
    for _round in range(2):  # round-robin over all tenants, as a simulation worker sees them
        assert all(_cached(six, i) is first[i] for i in range(6))
    stats = vault.cache_stats()
    assert stats["tenants"] == 6
    assert stats["bytes"] == sum(vault.tenant_nbytes(d) for d in first)
    assert stats["bytes"] >= sum(d.split.train_items.nbytes for d in first)
    vault.clear_cache()
    assert vault.cache_stats() == {"tenants": 0, "bytes": 0}


def test_cache_evicts_least_recently_used_beyond_its_byte_budget(
    six: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.clear_cache()
    sizes = [vault.tenant_nbytes(_load(six, i)) for i in range(3)]
    monkeypatch.setattr(vault, "CACHE_MAX_BYTES", sizes[0] + sizes[1])  # room for tenants 0 and 1
    t0, t1 = _cached(six, 0), _cached(six, 1)
    assert _cached(six, 0) is t0  # tenant 0 is now the most recently used
    _cached(six, 2)  # over budget: tenant 1 (least recently used) goes
    assert vault.cache_stats()["bytes"] <= sizes[0] + sizes[1] + sizes[2]
    assert _cached(six, 0) is t0
    assert _cached(six, 1) is not t1  # decrypted afresh
    assert vault.cache_stats()["bytes"] <= vault.CACHE_MAX_BYTES or vault.cache_stats()["tenants"] == 1
    vault.clear_cache()


def test_cache_keeps_the_newest_tenant_even_above_budget_and_can_be_turned_off(
    six: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.clear_cache()
    monkeypatch.setattr(vault, "CACHE_MAX_BYTES", 1)
    t0 = _cached(six, 0)
    assert _cached(six, 0) is t0 and vault.cache_stats()["tenants"] == 1
    _cached(six, 1)
    assert vault.cache_stats()["tenants"] == 1 and _cached(six, 0) is not t0
    monkeypatch.setattr(vault, "CACHE_MAX_BYTES", 0)
    vault.clear_cache()
    assert _cached(six, 0) is not _cached(six, 0)
    assert vault.cache_stats()["tenants"] == 0


def test_cache_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDREC_VAULT_CACHE_MB", "64")
    assert vault._cache_budget() == 64 * 2**20
    monkeypatch.setenv("FEDREC_VAULT_CACHE_MB", "0")
    assert vault._cache_budget() == 0
    for bad in ("lots", "inf", "nan"):
        monkeypatch.setenv("FEDREC_VAULT_CACHE_MB", bad)
        assert vault._cache_budget() == 512 * 2**20


def test_rotation_drops_the_stale_decrypted_copy(fed: Path) -> None:
    paths = tenant_paths(fed, 0)
    load_tenant_cached(*paths)
    _cached(fed, 1)
    rotate_tenant_key(fed, "tenant-0")
    load_tenant_cached(*paths)
    assert vault.cache_stats()["tenants"] == 2  # the new tenant-0 and tenant-1, not the old tenant-0

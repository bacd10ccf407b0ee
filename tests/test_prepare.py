"""``fedrec prepare``: layout, anonymization on the output, atomic writing, keys, and no plaintext on disk."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fedrec.client.vault import load_tenant, tenant_paths
from fedrec.privacy.anonymize import pseudonymize
from fedrec.privacy.crypto import derive_key, read_key_file
from fedrec.privacy.errors import VaultError
from fedrec.shared_model.data import USER_FEATURES, Catalog
from fedrec.simulations.cli.prepare import register
from fedrec.simulations.data.dataset import PreparedData, prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, PrepareResult, plan_federation, prepare_federation
from fedrec.simulations.data.sources import load, synthetic
from fedrec.simulations.errors import DataError

ML100K = Path("/work/shared/data/ml-100k")


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return prepare_dataset(synthetic(users=120, items=80, seed=11))


@pytest.fixture(scope="module")
def result(data: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    out = tmp_path_factory.mktemp("prep") / "fed"
    return prepare_federation(data, out, PrepareConfig(tenants=3, k_anonymity=4, seed=2))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_layout_is_exactly_the_contract(result: PrepareResult) -> None:
    fed = result.fed_dir
    tenants = [f"tenant-{i}" for i in range(3)]
    expected = {"federation.json", "catalog.json"}
    expected |= {f"{t}/{name}" for t in tenants for name in ("partition.enc", "manifest.json")}
    expected |= {f"keys/{t}.key" for t in tenants}
    assert _files(fed) == expected, "no temp files, nothing else"
    assert not list(fed.parent.glob(".*partial")), "no staging folder left behind"
    for t in tenants:
        assert stat.S_IMODE((fed / "keys" / f"{t}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((fed / "keys").stat().st_mode) == 0o700
    federation = json.loads((fed / "federation.json").read_text())
    assert federation["format"] == "fedrec-federation" and federation["version"] == 1
    assert federation["tenants"] == tenants
    assert federation["partition"] == "iid"
    assert federation["n_items"] == result.plan.catalog.n_items
    assert set(federation) == {"format", "version", "tenants", "source", "partition", "n_items", "created"}


def test_catalog_vocab_is_the_union_of_published_values(result: PrepareResult, data: PreparedData) -> None:
    catalog = Catalog.from_json(json.loads((result.fed_dir / "catalog.json").read_text()))
    assert catalog.item_ids == data.catalog.item_ids
    for feat in USER_FEATURES:
        used = {v for t in result.plan.tenants for v in t.published[feat] if v != "*"}
        assert catalog.user_vocab[feat] == tuple(sorted(used))


def test_k_anonymity_holds_on_the_decrypted_output(result: PrepareResult) -> None:
    for i, plan in enumerate(result.plan.tenants):
        split = load_tenant(*tenant_paths(result.fed_dir, i)).split
        combos = Counter(tuple(row) for row in split.user_features.tolist() if any(row))
        assert combos, "some users keep quasi-identifiers"
        assert min(combos.values()) >= 4
        manifest = json.loads((result.fed_dir / f"tenant-{i}" / "manifest.json").read_text())
        report = manifest["anonymization"]
        assert report["k_reached"] == min(combos.values()) == plan.report.k_reached
        suppressed = sum(1 for row in split.user_features.tolist() if not any(row))
        assert suppressed <= round(report["suppressed_fraction"] * split.n_users)
        assert report["unique_after"] == 0.0


def test_feature_codes_decode_to_the_published_values(result: PrepareResult) -> None:
    catalog = result.plan.catalog
    for i, plan in enumerate(result.plan.tenants):
        split = load_tenant(*tenant_paths(result.fed_dir, i)).split
        for j, feat in enumerate(USER_FEATURES):
            vocab = ("*", *catalog.user_vocab[feat])
            assert [vocab[c] for c in split.user_features[:, j]] == plan.published[feat].tolist()


def test_pseudonyms_are_keyed_hmacs_that_a_dictionary_attack_cannot_invert(
    result: PrepareResult, data: PreparedData
) -> None:
    for i, plan in enumerate(result.plan.tenants):
        split = load_tenant(*tenant_paths(result.fed_dir, i)).split
        key = read_key_file(result.fed_dir / "keys" / f"tenant-{i}.key")
        ids = [data.user_ids[u] for u in plan.users]
        assert list(split.pseudonyms) == pseudonymize(ids, derive_key(key.key, "pseudonym-hmac"))
        # Without the key, hashing the whole id space (plain or with the public key id) finds nothing.
        guesses = set()
        for uid in data.user_ids:
            for h in (hashlib.sha256(uid.encode()), hashlib.sha256((key.key_id + uid).encode())):
                guesses.add(h.hexdigest()[:32])
        assert not guesses & set(split.pseudonyms)


def test_two_prepares_use_fresh_keys_and_pseudonyms(data: PreparedData, tmp_path: Path) -> None:
    cfg = PrepareConfig(tenants=2, seed=2)
    a = prepare_federation(data, tmp_path / "a", cfg)
    b = prepare_federation(data, tmp_path / "b", cfg)
    pa = load_tenant(*tenant_paths(a.fed_dir, 0)).split.pseudonyms
    pb = load_tenant(*tenant_paths(b.fed_dir, 0)).split.pseudonyms
    assert len(pa) == len(pb) and not set(pa) & set(pb)


def test_manifest_holds_counts_report_and_summary(result: PrepareResult) -> None:
    manifest = json.loads((result.fed_dir / "tenant-1" / "manifest.json").read_text())
    plan = result.plan.tenants[1]
    assert manifest["tenant"] == "tenant-1" and manifest["schema_version"] == 1
    assert manifest["counts"] == {
        "users": len(plan.users),
        "train_interactions": plan.summary["train_interactions"],
        "users_with_test": plan.summary["users_with_test"],
    }
    assert manifest["partition"]["scheme"] == "iid"
    assert manifest["partition"]["top_genres"] == plan.summary["top_genres"]
    assert manifest["key_id"] == read_key_file(result.fed_dir / "keys" / "tenant-1.key").key_id


def test_existing_output_is_refused_unless_overwrite(
    result: PrepareResult, data: PreparedData, tmp_path: Path
) -> None:
    cfg = PrepareConfig(tenants=2)
    with pytest.raises(DataError, match="already exists and is not empty"):
        prepare_federation(data, result.fed_dir, cfg)
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a federation folder"):
        prepare_federation(data, stranger, cfg, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "precious"
    again = prepare_federation(data, tmp_path / "fed", cfg)
    replaced = prepare_federation(data, again.fed_dir, PrepareConfig(tenants=3), overwrite=True)
    assert json.loads((replaced.fed_dir / "federation.json").read_text())["tenants"][-1] == "tenant-2"


def test_interrupted_prepare_leaves_nothing_that_looks_complete(data: PreparedData, tmp_path: Path) -> None:
    def crash(tenant_id: str) -> None:
        if tenant_id == "tenant-1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_federation(data, tmp_path / "fed", PrepareConfig(tenants=3), on_tenant=crash)
    assert list(tmp_path.iterdir()) == []


def test_outside_keys_dir_holds_the_keys_and_clashes_are_refused(data: PreparedData, tmp_path: Path) -> None:
    keys = tmp_path / "vault-keys"
    cfg = PrepareConfig(tenants=2)
    res = prepare_federation(data, tmp_path / "fed", cfg, keys_dir=keys)
    assert res.keys_dir == keys and not (res.fed_dir / "keys").exists()
    assert sorted(p.name for p in keys.iterdir()) == ["tenant-0.key", "tenant-1.key"]
    assert load_tenant(*tenant_paths(res.fed_dir, 1, keys)).split.n_users > 0
    with pytest.raises(DataError, match="already holds a key for tenant-0"):
        prepare_federation(data, tmp_path / "fed2", cfg, keys_dir=keys)
    assert not (tmp_path / "fed2").exists()
    with pytest.raises(DataError, match="lies inside --out"):
        prepare_federation(data, tmp_path / "fed3", cfg, keys_dir=tmp_path / "fed3" / "secret")
    old = read_key_file(keys / "tenant-0.key")
    prepare_federation(data, res.fed_dir, cfg, keys_dir=keys, overwrite=True)
    assert [p.name.startswith("tenant-") for p in (keys / "retired").iterdir()] == [True, True]
    with pytest.raises(VaultError):
        load_tenant(res.fed_dir / "tenant-0", next((keys / "retired").glob("tenant-0.key.*")))
    assert read_key_file(keys / "tenant-0.key").key_id != old.key_id


def test_partition_schemes_reach_the_manifest(data: PreparedData) -> None:
    plan = plan_federation(data, PrepareConfig(tenants=2, partition="dirichlet:0.3", seed=4))
    assert str(plan.spec) == "dirichlet:0.3"
    assert sum(len(t.users) for t in plan.tenants) == data.split.n_users
    with pytest.raises(DataError, match="unknown --partition"):
        plan_federation(data, PrepareConfig(tenants=2, partition="nope"))


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)  # a group, as in the real fedrec app
    register(app)
    return app


def test_cli_prepare_and_rotate(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "fed"
    args = ["prepare", "--data", "synthetic", "--synth-users", "60", "--synth-items", "40"]
    res = runner.invoke(_app(), [*args, "--tenants", "2", "--partition", "iid", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "tenant-1" in res.output and (out / "tenant-1" / "partition.enc").is_file()
    res = runner.invoke(_app(), ["rotate-key", str(out), "--tenant", "tenant-1"])
    assert res.exit_code == 0, res.output
    assert "tenant-1: re-encrypted with key" in res.output
    assert len(list((out / "keys" / "retired").iterdir())) == 1
    res = runner.invoke(_app(), ["rotate-key", str(out), "--tenant", "tenant-9"])
    assert isinstance(res.exception, DataError) and "has no tenant 'tenant-9'" in str(res.exception)
    res = runner.invoke(
        _app(), [*args, "--tenants", "2", "--partition", "by:zip", "--out", str(tmp_path / "x")]
    )
    assert isinstance(res.exception, DataError) and not (tmp_path / "x").exists()


# ------------------------------------------------------------------ no plaintext on disk (ml-100k)


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="needs ../shared/data/ml-100k")
def test_no_plaintext_on_disk_after_prepare_on_ml100k(tmp_path: Path) -> None:
    raw = load(str(ML100K))
    data = prepare_dataset(raw)
    res = prepare_federation(data, tmp_path / "fed", PrepareConfig(tenants=5))
    fed = res.fed_dir
    scanned = {
        p: p.read_bytes() for p in fed.rglob("*") if p.is_file() and "keys" not in p.relative_to(fed).parts
    }
    assert len(scanned) == 2 + 2 * 5

    # Secrets and what only the keys can reveal: key bytes (raw, base64, hex, subkeys) and pseudonyms.
    secrets: list[bytes] = []
    for i in range(5):
        key = read_key_file(fed / "keys" / f"tenant-{i}.key")
        for material in (
            key.key,
            derive_key(key.key, "partition-encryption"),
            derive_key(key.key, "pseudonym-hmac"),
        ):
            secrets += [material, base64.b64encode(material), material.hex().encode()]
        split = load_tenant(*tenant_paths(fed, i)).split
        secrets += [p.encode() for p in split.pseudonyms]
        # The serialized partition (npz) must not appear: take a stretch of its training items.
        secrets.append(split.train_items[:64].tobytes())
    for path, blob in scanned.items():
        for secret in secrets:
            assert secret not in blob, f"secret material in {path}"
        assert b"\x93NUMPY" not in blob and b"PK\x03\x04" not in blob, f"unencrypted array in {path}"

    # No (user, item, rating) row: no tab-separated triple, and no ml-100k line prefix anywhere.
    rows = {"\t".join(line.split("\t")[:3]).encode() for line in (ML100K / "u.data").read_text().splitlines()}
    for path, blob in scanned.items():
        assert not re.search(rb"\d+\t\d+\t\d", blob), f"interaction row in {path}"
        assert not any(row in blob for row in list(rows)[:2000])

    # No original user id as a token in any JSON except the public catalogue (item ids, vocab).
    user_ids = set(data.user_ids)

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [*node.keys(), *(s for v in node.values() for s in strings(v))]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    for path, blob in scanned.items():
        if path.suffix != ".json":
            continue
        doc = json.loads(blob)
        if path.name == "catalog.json":
            assert set(doc) == {"item_ids", "titles", "genre_names", "genres", "years", "user_vocab"}
            assert doc["item_ids"] == list(data.catalog.item_ids)  # the public item side only
            continue
        assert not set(strings(doc)) & user_ids, f"user id token in {path}"
        assert not any(isinstance(v, list) and len(v) > 10 for v in _values(doc)), f"long list in {path}"

    # The loader gets back exactly the in-memory split of every tenant.
    for i, plan in enumerate(res.plan.tenants):
        loaded = load_tenant(*tenant_paths(fed, i)).split
        assert np.array_equal(loaded.train_items, data.split.subset(plan.users).train_items)


def _values(node: object) -> list[object]:
    if isinstance(node, dict):
        return [v for value in node.values() for v in (value, *_values(value))]
    if isinstance(node, list):
        return [v for value in node for v in (value, *_values(value))]
    return []

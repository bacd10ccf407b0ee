"""Secure loader throughput: ``load_tenant`` (decrypt + validate + decode) vs the same bytes unencrypted.

    .venv/bin/python scripts/bench_loader.py [--data /work/shared/data/ml-100k] [--tenants 5] [--repeats 20]

Prepares a federation into a temporary folder (removed at the end), then for every tenant times,
best of N: (a) reading partition.enc and decrypting it (``decrypt_file``), (b) the full loader
(manifest MAC + file id + decrypt + ``UserSplit.from_bytes`` + checks), against (c) reading a
plaintext copy of the same serialized split from a file in the same temporary folder and decoding
it. The plaintext copy exists only for this benchmark, in a private temp dir, and is deleted.
Prints one JSON line: prepare seconds, bytes, MB/s of each path and the ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fedrec.client.vault import PARTITION_FILE, load_tenant, tenant_paths
from fedrec.privacy.crypto import decrypt_file, read_key_file
from fedrec.shared_model.data import SPLIT_SCHEMA_VERSION, UserSplit
from fedrec.simulations.data.dataset import prepare_dataset
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import load


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _read_plain(path: Path) -> UserSplit:
    return UserSplit.from_bytes(path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/ml-100k")
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    data = prepare_dataset(load(args.data))
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        root = Path(tmp)
        result = prepare_federation(data, root / "fed", PrepareConfig(tenants=args.tenants))
        total = {"bytes": 0, "decrypt": 0.0, "loader": 0.0, "plain": 0.0}
        for i in range(args.tenants):
            tenant_dir, key_file = tenant_paths(result.fed_dir, i)
            key = read_key_file(key_file)
            tenant = tenant_dir.name
            path = tenant_dir / PARTITION_FILE
            plaintext = decrypt_file(
                path, key, tenant_id=tenant, file_name=PARTITION_FILE, schema_version=SPLIT_SCHEMA_VERSION
            )
            plain_path = root / f"plain-{i}.npz"  # benchmark only; removed with the temp dir
            plain_path.write_bytes(plaintext)
            total["bytes"] += len(plaintext)
            decrypt = partial(
                decrypt_file,
                path,
                key,
                tenant_id=tenant,
                file_name=PARTITION_FILE,
                schema_version=SPLIT_SCHEMA_VERSION,
            )
            total["decrypt"] += _best(decrypt, args.repeats)
            total["loader"] += _best(partial(load_tenant, tenant_dir, key_file), args.repeats)
            total["plain"] += _best(partial(_read_plain, plain_path), args.repeats)
    mb = total["bytes"] / 1e6
    print(
        json.dumps(
            {
                "source": data.source,
                "tenants": args.tenants,
                "load_and_split_s": round(load_s, 3),
                "prepare_s": round(result.seconds, 3),
                "partition_mb": round(mb, 3),
                "decrypt_mb_s": round(mb / total["decrypt"], 1),
                "loader_mb_s": round(mb / total["loader"], 1),
                "plain_read_decode_mb_s": round(mb / total["plain"], 1),
                "loader_s_all_tenants": round(total["loader"], 4),
                "plain_s_all_tenants": round(total["plain"], 4),
                "loader_over_plain": round(total["loader"] / total["plain"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

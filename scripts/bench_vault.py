"""Vault throughput: decrypting a ~50 MB partition vs reading the same bytes unencrypted.

    .venv/bin/python scripts/bench_vault.py [--mb 50] [--repeats 5] [--chunk-kib 1024]

Uses random bytes (no real data) and a key that only ever lives in memory; both files go to a
temporary folder that is removed at the end. Prints one JSON line with the best-of-N figures.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from privacy.crypto import KeyInfo, decrypt_file, encrypt_file


def _best(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=int, default=50, help="plaintext size in MB (10**6 bytes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is reported")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="vault chunk size in KiB")
    args = parser.parse_args()

    data = os.urandom(args.mb * 10**6)
    key = KeyInfo(tenant="bench", key_id=secrets.token_hex(16), key=os.urandom(32))
    ids = {"tenant_id": "bench", "file_name": "partition.enc", "schema_version": 1}
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as folder:
        plain, vault = Path(folder) / "plain.bin", Path(folder) / "partition.enc"
        plain.write_bytes(data)
        encrypt_seconds = _best(
            lambda: encrypt_file(vault, data, key, chunk_size=args.chunk_kib * 1024, **ids),  # type: ignore[arg-type]
            args.repeats,
        )
        assert decrypt_file(vault, key, **ids) == data  # type: ignore[arg-type]
        read_seconds = _best(plain.read_bytes, args.repeats)
        decrypt_seconds = _best(lambda: decrypt_file(vault, key, **ids), args.repeats)  # type: ignore[arg-type]
        overhead = vault.stat().st_size - len(data)
    mb = len(data) / 1e6
    print(
        json.dumps(
            {
                "plaintext_mb": mb,
                "chunk_kib": args.chunk_kib,
                "file_overhead_bytes": overhead,
                "read_plain_mb_s": round(mb / read_seconds, 1),
                "decrypt_mb_s": round(mb / decrypt_seconds, 1),
                "encrypt_mb_s": round(mb / encrypt_seconds, 1),
                "decrypt_vs_read": round(decrypt_seconds / read_seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()

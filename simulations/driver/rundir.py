"""Atomic run directories: a run writes into a hidden temp dir and renames it into place at the end,
so a failed or interrupted run never leaves a RUN_DIR that looks complete."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedrec.simulations.errors import DataError


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to clobber an existing non-empty output directory unless asked."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")


@contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on failure it is removed."""
    check_out_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

"""Link the repository's folders into ``build/typecheck/fedrec/`` so mypy sees the installed layout.

setuptools installs ``server/`` as ``fedrec.server`` (and so on) through ``[tool.setuptools.package-dir]``;
an editable install serves that mapping with an import hook that mypy cannot follow. This tree of
symlinks gives mypy the same module names without moving any folder. ``make typecheck`` runs it.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(root: Path = ROOT) -> Path:
    mapping = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-dir"
    ]
    top = root / "build" / "typecheck" / "fedrec"
    top.mkdir(parents=True, exist_ok=True)
    for entry in top.iterdir():
        if entry.is_symlink():
            entry.unlink()
    for f in (root / mapping["fedrec"]).iterdir():
        if f.suffix in (".py", ".typed"):
            (top / f.name).symlink_to(f.resolve())
    for name, folder in mapping.items():
        if name != "fedrec":
            (top / name.split(".", 1)[1]).symlink_to((root / folder).resolve(), target_is_directory=True)
    return top


if __name__ == "__main__":
    print(build(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))

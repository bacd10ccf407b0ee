"""The package's shape: one ``fedrec`` namespace mapped onto the design card's folders, the import rules
of DESIGN.md ("who may import whom"), and no import circle anywhere (function-level and TYPE_CHECKING
imports included: a circle hidden inside a function is still a circle a reader has to untangle)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]

#: DESIGN.md's table: which top-level parts each part may import (besides itself).
ALLOWED = {
    "shared_model": set(),
    "privacy": {"shared_model"},  # only the audit may read shared_model; checked below
    "client": {"shared_model", "privacy"},
    "server": {"shared_model", "privacy"},
    "simulations": {"shared_model", "privacy", "client", "server"},
}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from the source folders."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIR.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "fedrec" and parts:
                name = ".".join(["fedrec", *parts])
            elif pkg == "fedrec":
                name = "fedrec"
            else:
                name = ".".join([pkg, *parts])
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The fedrec modules ``name`` imports, resolved to modules (``from pkg import mod`` → ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedrec"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("fedrec"):
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 and bits[1] in ALLOWED else None


def test_every_source_folder_is_an_installed_package() -> None:
    packages = set(SETUPTOOLS["packages"])
    on_disk = set()
    for pkg, folder in PACKAGE_DIR.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join([pkg, *rel]))
    assert on_disk == packages, f"pyproject's packages differ from the folders: {on_disk ^ packages}"
    assert all(name == "fedrec" or name.startswith("fedrec.") for name in packages)


def test_no_module_imports_a_top_level_name_of_ours() -> None:
    bare = {"server", "client", "privacy", "shared_model", "simulations"}
    offenders = []
    for name, path in {**MODULES, **{p.stem: p for p in (REPO / "tests").glob("*.py")}}.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in bare]
    assert not offenders, offenders


def test_parts_import_only_what_the_design_allows() -> None:
    broken = []
    for name, deps in GRAPH.items():
        part = _part(name)
        if part is None:
            continue
        for dep in deps:
            other = _part(dep)
            if other is None or other == part:
                continue
            ok = other in ALLOWED[part]
            if part == "privacy":  # DESIGN.md: "nothing of ours (audit may read shared_model)"
                ok = name == "fedrec.privacy.audit" and other == "shared_model"
            if not ok:
                broken.append(f"{name} → {dep}")
    assert not broken, "imports against DESIGN.md's package table:\n" + "\n".join(sorted(broken))


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components over the module graph; any component > 1 is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_graph_sees_real_edges() -> None:
    """Guard against a vacuous pass: the CLI's entry module must import the command modules."""
    assert "fedrec.simulations.cli.run" in GRAPH["fedrec.simulations.cli.main"]
    assert "fedrec.shared_model.model" in GRAPH["fedrec.client.train"]

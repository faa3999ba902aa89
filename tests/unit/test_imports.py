"""The import direction, pinned: entry points import the package, never the other way round; the
store, the media store and the caption model import nothing above them; leaf modules import
nothing of ours. Read from the source (every import, function-level ones too), not by importing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

ENTRY_POINTS = {"imgapi", "jobs"}
LEAVES = {
    "imgapi_core.errors",
    "imgapi_core.logs",
    "imgapi_core.numbers",
    "imgapi_core.settings",
    "imgapi_core.timestamps",
}
# What each layer may import of ours (a prefix allows the package and its modules).
ALLOWED = {
    "imgapi_core.store": {"imgapi_core.store", *LEAVES},
    "imgapi_core.media": {"imgapi_core.media", *LEAVES},
    # The model's CLI reads the service's settings (one source for CAPTION_MODEL and HF_TOKEN).
    "models": {"models", "imgapi_core.settings"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    files = [REPO / "imgapi.py", REPO / "jobs.py"]
    for package in ("imgapi_core", "models"):
        files += sorted((REPO / package).rglob("*.py"))
    return {module_name(path): path for path in files}


def imports_of(path: Path, name: str) -> set[str]:
    found: set[str] = set()
    modules = our_modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from pkg import module` imports that module (and only the package's __init__,
            # which is not what the rules are about); `from module import name` the module.
            submodules = {f"{target}.{alias.name}" for alias in node.names}
            found.update(submodules & modules.keys())
            if not submodules <= modules.keys():
                found.add(target)
    ours = {"imgapi_core", "models", *ENTRY_POINTS}
    return {imp for imp in found if imp.split(".")[0] in ours and imp in modules}


def within(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


MODULES = our_modules()


@pytest.mark.parametrize("name", sorted(set(MODULES) - ENTRY_POINTS))
def test_nothing_imports_an_entry_point(name: str) -> None:
    assert imports_of(MODULES[name], name) & ENTRY_POINTS == set()


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if any(within(n, {layer}) for layer in ALLOWED))
)
def test_lower_layers_import_nothing_above_them(name: str) -> None:
    layer = next(layer for layer in ALLOWED if within(name, {layer}))
    above = {imp for imp in imports_of(MODULES[name], name) if not within(imp, ALLOWED[layer])}
    assert above == set(), f"{name} imports {sorted(above)}"


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_modules_import_nothing_of_ours(name: str) -> None:
    assert imports_of(MODULES[name], name) == set()


def test_routes_do_not_import_the_app_that_assembles_them() -> None:
    for name in MODULES:
        if within(name, {"imgapi_core.routes"}):
            assert "imgapi_core.app" not in imports_of(MODULES[name], name), name


def test_the_checker_sees_imports() -> None:
    """The rules above would pass on a parser that found nothing: it must find these."""
    assert "imgapi_core.store" in imports_of(MODULES["imgapi_core.store.sqlite"], "x")
    assert "imgapi_core.settings" in imports_of(MODULES["models.__main__"], "models.__main__")
    assert {"imgapi_core.app"} <= imports_of(MODULES["imgapi"], "imgapi")

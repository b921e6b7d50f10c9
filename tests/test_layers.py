"""The layers of DESIGN.md, kept honest: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mirror"
# Each module may import only the modules of lower layers (and of its own layer).
# Modules of sub-packages are named with dots: "security.users".
LAYERS = [
    {
        "errors",
        "reference",
        "singleflight",
        "breaker",
        "storage.locks",
        "storage.accesstimes",
        "cpus",
        "config",
        "logs",
        "metrics",
        "security.rules",
        "numbers",
        "fills.gate",
        "storage.base",
    },
    {
        "manifest",
        "images",
        "upstream.auth",
        "upstream.redirects",
        "storage.memo",
        "storage.disk",
        "storage.s3",
        "storage.redis",
        "storage.disk_records",
        "security.users",
        "security.tokens",
        "security.limits",
        "web.tls",
    },
    {
        "upstream.client",
        "fills.fill",
        "fills.blobs",
        "admin.inventory",
        "admin.integrity",
        "fills.foreign",
        "holdings",
        "replicas.uses",
        "replicas.shared",
        "replicas.records",
        "replicas.eviction",
        "replicas.peers",
        "replicas.blobs",
        "replicas.pins",
        "admin.fleet",
    },
    {"referrers", "service"},
    {
        "warm",
        "layout",
        "replicas.publish",
        "web.access_log",
        "web.auth",
        "admin.operations",
        "web.admin",
        "web.peers",
        "web.pull_routes",
    },
    {"web.app", "web.server"},
    {"cli.main", "cli.admin", "__main__"},
]
# The modules that may import Starlette: the web layer.
WEB = {"web.app", "web.access_log", "web.auth", "web.admin", "web.peers", "web.pull_routes"}


def _modules() -> dict[str, Path]:
    """Every module of the package, sub-packages included, by dotted name."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        if path.stem == "__init__":
            continue
        modules[".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = path
    return modules


def _resolve(name: str, known: set[str]) -> str:
    """A module of the package, or the package it names (``security``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or name


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names if not node.module else [None]:
                full = [*target, alias.name] if alias is not None else target
                names.add(_resolve(".".join(full), known))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mirror."):
            names.add(_resolve(node.module.removeprefix("mirror."), known))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mirror."):
                    names.add(_resolve(alias.name.removeprefix("mirror."), known))
    return names


def test_no_module_imports_a_higher_layer() -> None:
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    modules = _modules()
    assert set(modules) == set(level), "every module belongs to a layer"
    wrong = [
        f"{name} imports {other}"
        for name, path in modules.items()
        for other in _imports(name, path, set(modules))
        if other in level and level[other] > level[name]
    ]
    assert wrong == []


def test_relative_imports_in_sub_packages_are_resolved() -> None:
    modules = _modules()
    known = set(modules)
    assert "singleflight" in _imports("security.users", modules["security.users"], known)
    assert "security.users" in _imports("web.auth", modules["web.auth"], known)
    assert "storage.disk" in _imports("service", modules["service"], known)


def test_only_the_web_layer_knows_starlette() -> None:
    for name, path in _modules().items():
        if name in WEB:
            continue
        assert "starlette" not in path.read_text(), name

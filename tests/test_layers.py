"""The layers of DESIGN.md, kept honest: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mirror"
# Each module may import only the modules of lower layers (and of its own layer).
LAYERS = [
    {"errors", "reference", "singleflight", "breaker", "locks", "config", "logs", "metrics"},
    {"manifest", "images", "auth", "store"},
    {"upstream", "fill", "blobs"},
    {"service"},
    {"warm", "layout", "access"},
    {"app"},
    {"cli", "__main__"},
]


def _imports(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mirror."):
            names.add(node.module.split(".")[1])
    return names


def test_no_module_imports_a_higher_layer() -> None:
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert set(modules) == set(level), "every module belongs to a layer"
    wrong = [
        f"{name} imports {other}"
        for name, path in modules.items()
        for other in _imports(path)
        if level[other] > level[name]
    ]
    assert wrong == []


def test_only_the_web_layer_knows_starlette() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("app", "access"):
            continue
        assert "starlette" not in path.read_text(), path.name

"""The package's layers point down, and nothing hides an import circle.

Every `import` in the package (function-level ones included: a circle broken by a lazy import still counts) is read
from the source. A module may import its own package's modules and any module of a lower layer, never one of its
own layer in another package, nor one above it:

    utils, configs  <  models, losses  <  checkpoints, decoding  <  data  <  generate, convert, train, parity  <
    bench  <  cli
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "big_vision_lite"
LAYERS = {
    "utils": 0, "configs": 0,
    "models": 1, "losses": 1,
    "checkpoints": 2, "decoding": 2,
    "data": 3,
    "generate": 4, "convert": 4, "train": 4, "parity": 4, "launch": 4,
    "bench": 5,
    "cli": 6,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules (or packages) it imports anywhere in its source."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[module] = {name for name in found if name.startswith("big_vision_lite.")} - {module}
    return graph


def _top(module: str) -> str:
    return module.split(".")[1]


GRAPH = _imports()


def test_every_part_of_the_package_has_a_layer():
    assert {_top(m) for m in GRAPH if m != "big_vision_lite"} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "big_vision_lite"))
def test_imports_point_down(module):
    own = _top(module)
    wrong = sorted(name for name in GRAPH[module] if _top(name) != own and LAYERS[_top(name)] >= LAYERS[own])
    assert not wrong, f"{module} (layer {LAYERS[own]}) imports {wrong} from its own layer or above"


def test_no_import_circles():
    modules = set(GRAPH)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for n in GRAPH[m] if (t := resolve(n)) and t != m and not m.startswith(t + ".")} for m in GRAPH}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_the_checker_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """A check that cannot fail proves nothing: a function-level import of the CLI from a model is caught."""
    fake = tmp_path / "big_vision_lite" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from big_vision_lite.cli import main\n    return main\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "big_vision_lite")
    graph = _imports()
    assert graph["big_vision_lite.models.bad"] == {"big_vision_lite.cli", "big_vision_lite.cli.main"}

"""The import graph of quill/: no cycles, and every import points down the layering that
docs/ARCHITECTURE.md describes.

Every `import` and `from ... import` statement counts, wherever it stands: at module level, inside
a function, or under `if TYPE_CHECKING:`. Deferring an import to a function changes when a module
loads, not what it depends on; the cycles this test exists for (kernel builds -> model hub ->
GGUF reader -> layers -> kernel builds) ran through such imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

QUILL = Path(__file__).resolve().parent.parent / "quill"

# Bottom first. A module may import from its own layer and the layers below it. Parts are quill's
# top-level modules and packages; "quill" is the package's own __init__ (the public API).
LAYERS = [
    ("errors", "paths", "hardware", "table", "model_limits"),
    ("config", "rope", "sampling_params", "outputs", "cost", "cache", "structured"),
    ("weights", "kernels"),  # checkpoint formats and the quantized-weight format; C kernel builds
    ("layers", "tokenizer"),
    ("models",),  # one file per family, the registry, the loader
    ("engine", "speculative"),  # the engine drives speculation; drafters run the engine's runner
    ("distributed",),  # tensor parallelism: shards, collectives, the ranks past 0 run the engine's runner
    ("optimize", "llm", "quill"),
    ("server", "bench"),
    ("deploy",),  # replicas on Ray Serve: the server's app in front of engines in other processes
    ("cli",),
]

def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports, by any import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` depends on the module; `from module import name` on the module
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    return {module for module in found if module in modules and module != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def part_of(module: str) -> str:
    """quill.engine.runner -> "engine"; quill -> "quill"."""
    return module.split(".")[1] if "." in module else module


def layer_of(part: str) -> int:
    for rank, parts in enumerate(LAYERS):
        if part in parts:
            return rank
    raise AssertionError(f"quill/{part} has no place in LAYERS (tests/test_imports.py): give it one, and describe "
                         "it in docs/ARCHITECTURE.md")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                  if layer_of(part_of(target)) > layer_of(part_of(module)))


def test_the_cycle_finder_sees_cycles_through_deferred_imports(tmp_path):
    """The checker itself can fail: a function-level import closing a loop is a cycle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\n")
    graph = import_graph(package)
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b"})]


def test_quill_has_no_import_cycles():
    found = [sorted(cycle) for cycle in cycles(import_graph(QUILL))]
    assert not found, f"import cycles: {found}"


def test_the_layer_check_sees_an_upward_import():
    graph = {"quill.layers.norm": {"quill.kernels", "quill.engine.runner"}, "quill.kernels": set(),
             "quill.engine.runner": {"quill.layers.norm"}}
    assert upward_imports(graph) == ["quill.layers.norm imports quill.engine.runner"]


def test_imports_point_down_the_layers():
    upward = upward_imports(import_graph(QUILL))
    assert not upward, "imports that point up the layers (see LAYERS):\n" + "\n".join(upward)


@pytest.mark.parametrize("part", sorted({part_of(module) for module in module_names(QUILL)}))
def test_every_part_of_quill_has_a_layer(part):
    layer_of(part)

"""The layers of docs/architecture.md, held by the imports themselves.

Every import statement in ``overlay/`` and ``packer/`` is read (module level, inside functions and
under ``TYPE_CHECKING`` alike) and three rules are checked:

1. no import cycle between modules;
2. a module imports only its own layer and the layers below it, and a layer's helpers (its
   subpackage) never import the layer's public face (the face imports the helpers, not the reverse);
3. the packer uses only ``overlay``'s public faces, and no underscored name from them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Bottom to top. A module belongs to the first layer with a matching pattern ("x.*": below x).
LAYERS: list[tuple[str, list[str]]] = [
    ("errors", ["overlay.errors"]),
    ("keys", ["overlay.ed25519", "overlay.keys"]),
    ("format", ["overlay.format.*", "overlay.bundle", "overlay.control", "overlay.channel"]),
    ("storage", ["overlay.storage.*", "overlay.store"]),
    ("importing", ["overlay.importing.*", "overlay.finder"]),
    ("rebinding", ["overlay.rebinding.*", "overlay.rebind"]),
    ("integrations", ["overlay.integrations.*", "overlay.integrations"]),
    ("transaction", ["overlay.transaction.*", "overlay.upgrade"]),
    ("processes", ["overlay.cluster.*", "overlay.deploy"]),
    ("control plane", ["overlay.serving.*", "overlay.http"]),
    ("runtime", ["overlay.runtime.*", "overlay"]),
    ("packer", ["packer", "packer.*"]),
]
#: Each layer's public face. A layer's own helpers never import it (the face imports them); the
#: layers above may import the face or, where they need one part, the helper itself.
FACES = {"overlay.bundle", "overlay.control", "overlay.channel", "overlay.store", "overlay.finder", "overlay.rebind",
         "overlay.integrations", "overlay.upgrade", "overlay.deploy", "overlay.http", "overlay"}
#: What the packer, on the developer's machine, may use of overlay: the public faces, and the
#: storage layer's file primitives (an atomic write), which load nothing of the store itself.
PACKER_MAY_IMPORT = {"overlay", "overlay.errors", "overlay.keys", "overlay.bundle", "overlay.control", "overlay.channel",
                     "overlay.store", "overlay.storage.fs"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("overlay", "packer"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """(module imported, names imported from it, line) for every import in ``path``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from overlay.format import delta``: the submodule itself
                    yield sub, (), node.lineno
                else:
                    yield base, (alias.name,), node.lineno


def _ours(module: str) -> str | None:
    """The module of ours ``module`` is (or is inside), else None."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def _edges() -> dict[str, set[tuple[str, tuple[str, ...], int]]]:
    graph: dict[str, set[tuple[str, tuple[str, ...], int]]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            ours = _ours(target)
            if ours is not None and ours != name:
                graph[name].add((ours, names, line))
    return graph


EDGES = _edges()


def _layer(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and (module + ".").startswith(pattern[:-1])):
                return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_module_imports_a_cycle():
    graph = {m: {t for t, _, _ in edges} for m, edges in EDGES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert cycles == [], f"import cycles: {cycles}"


def test_each_layer_imports_only_itself_and_the_layers_below():
    wrong = []
    for module, edges in EDGES.items():
        mine = _layer(module)
        for target, _, line in edges:
            theirs = _layer(target)
            if theirs > mine:
                wrong.append(f"{module}:{line} imports {target} ({LAYERS[theirs][0]} is above {LAYERS[mine][0]})")
            elif theirs == mine and target in FACES and module not in FACES and target != "overlay":
                wrong.append(f"{module}:{line} imports its own layer's face {target}: the face imports "
                             "the helpers, not the other way round")
    assert wrong == []


def test_the_packer_uses_only_overlays_public_faces():
    wrong = []
    for module, edges in EDGES.items():
        if not module.startswith("packer"):
            continue
        for target, names, line in edges:
            if target.startswith("overlay"):
                if target not in PACKER_MAY_IMPORT:
                    wrong.append(f"{module}:{line} imports {target}")
                wrong += [f"{module}:{line} imports {target}.{n}" for n in names if n.startswith("_")
                          and n != "__version__"]
    assert wrong == []


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    # The rules above are only as good as the import reader: it must not miss a lazy import.
    source = "def f():\n    from .store import Store\n    import overlay.http\n"
    path = tmp_path / "mod.py"
    path.write_text(source)
    found = {target for target, _, _ in _imports("overlay.something", path)}
    assert found == {"overlay.store", "overlay.http"}

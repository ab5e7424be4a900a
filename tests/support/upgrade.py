"""The push-transaction scenarios: snippet trees, a deployment on a real store, identity snapshots.

Every scenario is a directory of ``tests/transaction/snippets/<scenario>/``: ``v1/``, ``v2/`` (and
sometimes ``v3/``) each hold the whole ``upapp`` package as it is at that version, so a push
"v1 -> v2" reads as two source trees side by side (STYLE.md, item 13).

Snippet code talks to the test through ``upgrade_probe``, a module the ``probe`` fixture
(``tests/transaction/conftest.py``) puts in ``sys.modules``: it counts module-level runs, collects
registrations and holds the events a test uses to pause the apply step.
"""

from __future__ import annotations

import collections
import importlib
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import TESTS
from support.overlay import tree_entries

from overlay.format import delta as _delta
from overlay.bundle import ParentManifest, build_bundle
from overlay.keys import SigningKey

SNIPPETS = TESTS / "transaction" / "snippets"
APP = "upapp"
PROBE = "upgrade_probe"


def snippet_files(scenario: str, version: str) -> dict[str, tuple[str, bytes]]:
    """The bundle entries of ``snippets/<scenario>/<version>/``: ``{name: (kind, bytes)}``."""
    root = SNIPPETS / scenario / version
    if not root.is_dir():
        raise FileNotFoundError(f"no snippet tree {root}")
    return tree_entries(root, root)


def write_tree(scenario: str, version: str, root: Path) -> Path:
    """Copy a snippet tree to ``root`` (an app on disk, for modules imported before any push)."""
    source = SNIPPETS / scenario / version
    for path in source.rglob("*.py"):
        target = root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return root


def make_probe() -> types.ModuleType:
    """A fresh ``upgrade_probe`` module in ``sys.modules`` (the caller's import state removes it)."""
    probe = types.ModuleType(PROBE, "What snippet code reports to the test.")
    probe.runs = collections.Counter()
    probe.registry = []
    probe.events = collections.defaultdict(threading.Event)
    probe.ran = lambda what: probe.runs.update([what])
    sys.modules[PROBE] = probe
    return probe


@dataclass
class Deployment:
    """An installed overlay serving ``upapp`` from a real store, and a signing key to push with."""

    ov: Any  # overlay.Overlay
    key: SigningKey

    def bundle(self, scenario: str, version: str, *, number: int | None = None, delta: bool = False) -> bytes:
        """A signed bundle of a snippet tree; the next free version number unless ``number``."""
        number = number if number is not None else self.ov.store.highest + 1
        files = snippet_files(scenario, version)
        if not delta:
            return build_bundle(files, app_id=APP, version=number, signers=[self.key])
        base = ParentManifest.from_manifest(self.ov.store.active.manifest_bytes)
        data = build_bundle(files, app_id=APP, version=number, signers=[self.key], base=base)
        return _delta.pack(data, base, [self.key])

    def push(self, scenario: str, version: str, **kw: Any) -> Any:
        """Build and apply; returns the ``UpgradeReport``."""
        return self.ov.apply(self.bundle(scenario, version, **kw))

    def module(self, name: str) -> types.ModuleType:
        return sys.modules[f"{APP}.{name}" if name else APP]

    @property
    def store_path(self) -> Path:
        return self.ov.store.path

    def staged(self) -> list[str]:
        return sorted(p.name for p in (self.store_path / "staged").iterdir())

    def tree_shows(self) -> int | None:
        """The version whose files the store's tree holds, exactly (None: no version's)."""
        root = self.ov.tree_root
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        active = self.ov.active
        expected = {e.path: active.read(e.name) for e in active.entries.values()} if active else {}
        return active.version if active is not None and files == expected else None

    def bundles(self) -> list[int]:
        return [v for v, _ in self.ov.store.stored()]


# --------------------------------------------------------------------------- identity snapshots


@dataclass
class Snapshot:
    """Everything an undo must put back, by identity: modules, their dicts, functions, classes."""

    modules: dict[str, types.ModuleType]
    namespaces: dict[str, dict[str, Any]]
    codes: dict[int, tuple[Any, Any, Any, Any]]  # id(fn) -> (fn, __code__, __defaults__, __kwdefaults__)
    classes: dict[int, tuple[type, dict[str, Any]]]
    index: Any


def _functions_and_classes(namespace: dict[str, Any], module: str) -> Iterator[Any]:
    stack = list(namespace.values())
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, types.FunctionType) and value.__module__ == module:
            yield value
            if "__wrapped__" in value.__dict__:
                stack.append(value.__wrapped__)
        elif isinstance(value, type) and value.__module__ == module:
            yield value
            stack.extend(value.__dict__.values())
        elif isinstance(value, (classmethod, staticmethod)):
            stack.append(value.__func__)
        elif isinstance(value, property):
            stack.extend(f for f in (value.fget, value.fset, value.fdel) if f is not None)


def snapshot(finder: Any, package: str = APP) -> Snapshot:
    modules = {n: m for n, m in sys.modules.items() if n == package or n.startswith(package + ".")}
    namespaces = {n: dict(m.__dict__) for n, m in modules.items()}
    codes: dict[int, tuple[Any, Any, Any, Any]] = {}
    classes: dict[int, tuple[type, dict[str, Any]]] = {}
    for name, namespace in namespaces.items():
        for obj in _functions_and_classes(namespace, name):
            if isinstance(obj, type):
                classes[id(obj)] = (obj, dict(obj.__dict__))
            else:
                codes[id(obj)] = (obj, obj.__code__, obj.__defaults__, obj.__kwdefaults__)
    return Snapshot(modules, namespaces, codes, classes, finder.index)


def assert_same(before: Snapshot, finder: Any, package: str = APP) -> None:
    """Fail with the first difference: every object must be the very one the snapshot holds."""
    now = {n: m for n, m in sys.modules.items() if n == package or n.startswith(package + ".")}
    assert now.keys() == before.modules.keys(), "sys.modules gained or lost modules"
    for name, module in before.modules.items():
        assert now[name] is module, f"sys.modules[{name!r}] is another module object"
        namespace = module.__dict__
        old = before.namespaces[name]
        assert namespace.keys() == old.keys(), (
            f"{name} namespace: added {sorted(namespace.keys() - old.keys())}, "
            f"removed {sorted(old.keys() - namespace.keys())}")
        for key, value in old.items():
            assert namespace[key] is value, f"{name}.{key} is another object"
    for fn, code, defaults, kwdefaults in before.codes.values():
        assert fn.__code__ is code, f"{fn.__qualname__}.__code__ is another code object"
        assert fn.__defaults__ is defaults and fn.__kwdefaults__ is kwdefaults, fn.__qualname__
    for cls, attrs in before.classes.values():
        assert dict(cls.__dict__).keys() == attrs.keys(), f"{cls.__qualname__}'s attributes changed"
        for key, value in attrs.items():
            assert cls.__dict__[key] is value, f"{cls.__qualname__}.{key} is another object"
    assert finder.index is before.index, "the finder serves another index"


# ----------------------------------------------------------------------------------- test helpers

THREAD_TIMEOUT = 10


class Modules:
    """``m.core`` is ``sys.modules["upapp.core"]``, looked up at each access; ``m.probe`` the probe."""

    def __getattr__(self, name: str) -> Any:
        if name == "probe":
            return sys.modules["upgrade_probe"]
        return sys.modules[f"{APP}.{name}"]


m = Modules()


def start(deploy: Deployment, scenario: str, version: str = "v1") -> Any:
    """Push ``version`` of a scenario as the first bundle and import every module of it."""
    report = deploy.push(scenario, version)
    for name, (kind, _) in sorted(snippet_files(scenario, version).items()):
        if kind != "data":
            importlib.import_module(name)
    return report


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``target`` in a daemon thread; the dict gets its ``result`` or its ``error``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = target()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(THREAD_TIMEOUT)
    assert not thread.is_alive(), "the thread did not finish"
    if "error" in out:
        raise out["error"]
    return out.get("result")


def live_hooks(ov: Any) -> Any:
    """The hook registry (``overlay.integrations.hooks``) the installed overlay's transaction runs.

    Tests restore ``sys.modules`` between them, so a module imported by name now may be another
    copy than the one the overlay's code holds: this follows the overlay's own references."""
    deploy = type(ov).apply.__globals__["deploy"]
    return deploy.Change.apply.__globals__["hooks"]

"""One bundle version as the import system sees it, and the loader that serves it.

:class:`BundleIndex` maps module names to their kind, file and ``__path__`` in a source tree;
:class:`BundleLoader` loads from whichever index its owner (the finder) serves now, so a module a
push leaves alone keeps its ``__spec__`` and ``__loader__``. Both are immutable per version: a push
builds a new index and the finder switches to it in one assignment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from collections.abc import Iterable
from importlib.machinery import ModuleSpec
from importlib.resources.abc import Traversable, TraversableResources
from pathlib import Path
from typing import NamedTuple, Protocol

from overlay.bundle import Bundle, Entry
from overlay.errors import OverlayImportError
from overlay.format.names import RESERVED_NAMES
from overlay.importing.codecache import CodeCache

logger = logging.getLogger("overlay.finder")

__all__ = ["BundleIndex", "BundleLoader"]

_UNCACHED = CodeCache(None)  # for an index not (yet) attached to a finder: memory only


class IndexOwner(Protocol):
    """What a :class:`BundleLoader` loads from: whatever index its owner serves now."""

    @property
    def index(self) -> BundleIndex | None: ...


def _top(entry: Entry) -> str:
    """The top-level package an entry belongs to (``a`` for ``a.b`` and for ``a/data/x.txt``)."""
    return entry.name.partition("/" if entry.kind == "data" else ".")[0]


class _Module(NamedTuple):
    kind: str              # "module" or "package"
    filename: str          # the file in this process's source tree: __file__ and co_filename
    search: str | None     # the package's directory (its __path__), None for a plain module


class BundleIndex:
    """One bundle version as the import system sees it: module name -> kind, file and ``__path__``.

    Entries outside ``packages`` are left out (and logged), so the index only answers for names
    the app declared. Without ``packages`` it serves the bundle's own top-level packages minus the
    standard library and habanero's; ``OverlayFinder.set_index`` then refuses it unless the finder
    declared them all. Immutable once built, except that an index built without a code cache adopts
    the finder's when it goes live. Prefer ``OverlayFinder.index_for``, which passes both.

    Paths do not depend on the version (a process's source tree stays where it is), so an index built
    from ``previous`` with the names that differ (``changed``) copies the rest: a push that changes
    one module of 1,000 does not redo the other 999.
    """

    def __init__(self, bundle: Bundle, tree_root: str | os.PathLike[str], *,
                 packages: Iterable[str] | None = None, code_cache: CodeCache | None = None,
                 loader: BundleLoader | None = None, previous: BundleIndex | None = None,
                 changed: Iterable[str] | None = None) -> None:
        self.bundle = bundle
        self.root = os.path.abspath(os.fspath(tree_root))
        self.code_cache = code_cache  # None: the finder's cache is adopted when the index goes live
        self.loader = loader if loader is not None else BundleLoader(self)
        self._by_path: dict[str, Entry] | None = None
        if (previous is not None and changed is not None and previous.root == self.root
                and (packages is None or previous.packages == frozenset(packages))):
            self._derive(previous, changed)
        else:
            self._build(packages)
        if self.ignored:
            logger.warning("bundle v%s carries %s, outside the served packages %s; they are not served",
                           bundle.version, ", ".join(sorted(self.ignored)), ", ".join(sorted(self.packages)))

    def _build(self, packages: Iterable[str] | None) -> None:
        entries = self.bundle.entries
        tops = {_top(e) for e in entries.values()}
        # Without a declared list, serve the bundle's own top-level packages, but never Python's or
        # habanero's: a finder only accepts an index whose packages it declared (set_index checks).
        self.packages = frozenset(packages if packages is not None else
                                  (t for t in tops if t not in RESERVED_NAMES and t not in sys.stdlib_module_names))
        self.modules: dict[str, _Module] = {}
        for name, entry in entries.items():
            self._add(name, entry)
        self.ignored = frozenset(tops - self.packages)

    def _derive(self, previous: BundleIndex, changed: Iterable[str]) -> None:
        self.packages = previous.packages
        self.modules = dict(previous.modules)
        ignored = set(previous.ignored)
        entries = self.bundle.entries
        for name in changed:
            self.modules.pop(name, None)
            entry = entries.get(name)
            if entry is not None:
                self._add(name, entry)
                top = _top(entry)
                if top not in self.packages:
                    ignored.add(top)
        # A top-level package no longer in the bundle is no longer "ignored" (rare: check only then).
        if ignored and any(name not in entries for name in changed):
            ignored &= {_top(e) for e in entries.values()}
        self.ignored = frozenset(ignored)

    def _add(self, name: str, entry: Entry) -> None:
        kind = entry.kind
        if kind != "data" and name.partition(".")[0] in self.packages:
            filename = self.root + os.sep + entry.path.replace("/", os.sep)
            search = filename[: -len("/__init__.py")] if kind == "package" else None
            self.modules[name] = _Module(kind, filename, search)

    @property
    def index(self) -> BundleIndex:
        """The index a loader made for this one serves (itself): see :class:`BundleLoader`."""
        return self

    @property
    def version(self) -> int:
        return self.bundle.version

    def module_names(self) -> list[str]:
        """Every module and package this index serves, sorted."""
        return sorted(self.modules)

    def spec(self, name: str) -> ModuleSpec:
        """The spec ``find_spec`` gives for ``name`` (raises ``OverlayImportError`` if not served)."""
        return self._spec(name, self._module(name))

    def _spec(self, name: str, mod: _Module) -> ModuleSpec:
        # The loader has every method of the protocol; typeshed asks for a subclass of importlib.abc.Loader
        spec = ModuleSpec(name, self.loader, origin=mod.filename,  # type: ignore[arg-type]
                          is_package=mod.search is not None)
        spec.has_location = True  # the machinery then sets __file__ (and __cached__) from the spec
        if self.code_cache is not None:
            cached = self.code_cache.path_for(self.bundle.entries[name].sha256)
            if cached is not None:
                spec.cached = cached
        if mod.search is not None:
            spec.submodule_search_locations = [mod.search]
        return spec

    def filename(self, name: str) -> str:
        """The tree file a module compiles as (for the upgrade planner's ``filename_of``)."""
        return self._module(name).filename

    def entry(self, name: str) -> Entry:
        """The bundle entry of a module this index serves."""
        self._module(name)
        return self.bundle.entries[name]

    def entry_at(self, path: str) -> Entry | None:
        """The entry whose tree file is ``path`` (absolute), or None."""
        if self._by_path is None:  # built on first use: most processes never call get_data
            self._by_path = {os.path.join(self.root, *e.path.split("/")): e
                             for e in self.bundle.entries.values()
                             if _top(e) in self.packages}
        return self._by_path.get(os.path.abspath(path))

    def _module(self, name: str) -> _Module:
        mod = self.modules.get(name)
        if mod is None:
            raise OverlayImportError(f"{name!r} is not in bundle v{self.version} of {self.bundle.app_id!r}",
                                     name=name, code="not_in_bundle")
        return mod

    def __repr__(self) -> str:
        return f"<BundleIndex {self.bundle.app_id} v{self.version}: {len(self.modules)} modules at {self.root}>"


class BundleLoader:
    """Loads modules from the index its owner serves now (``owner.index``).

    The finder's loader serves whatever version is active, so a module that a push leaves alone
    keeps its ``__spec__`` and ``__loader__``: a push re-points nothing but what it changed. A
    standalone :class:`BundleIndex` is its own owner.
    """

    def __init__(self, owner: IndexOwner) -> None:
        self.owner = owner

    @property
    def index(self) -> BundleIndex:
        index = self.owner.index
        if index is None:
            raise OverlayImportError("no bundle is active: modules are served from disk", name="",
                                     code="not_in_bundle")
        return index

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object is right

    def exec_module(self, module: types.ModuleType) -> None:
        spec = module.__spec__
        name = spec.name if spec is not None else module.__name__
        before_exec = getattr(self.owner, "before_exec", None)
        if before_exec is not None:
            before_exec()
        exec(self.get_code(name), module.__dict__)

    def get_code(self, fullname: str) -> types.CodeType:
        index = self.index
        mod = index._module(fullname)
        bundle, entry = index.bundle, index.bundle.entries[fullname]
        cache = index.code_cache or _UNCACHED
        return cache.get(entry.sha256, mod.filename, lambda: bundle.read(fullname))

    def get_source(self, fullname: str) -> str:
        return importlib.util.decode_source(self.index.bundle.read(self.index.entry(fullname).name))

    def is_package(self, fullname: str) -> bool:
        return self.index._module(fullname).search is not None

    def get_filename(self, fullname: str) -> str:
        return self.index._module(fullname).filename

    def get_data(self, path: str | os.PathLike[str]) -> bytes:
        """Bytes of a file of the served version (``pkgutil.get_data``): the verified bundle's, read
        back from the store and checked against their hash once the version is committed."""
        index = self.index
        entry = index.entry_at(os.fspath(path))
        if entry is None:
            raise FileNotFoundError(f"{os.fspath(path)} is not a file of bundle v{index.version}")
        return index.bundle.read(entry.name)

    def get_resource_reader(self, fullname: str) -> TraversableResources | None:
        mod = self.index.modules.get(fullname)
        if mod is None or mod.search is None:
            return None
        return _TreeReader(Path(mod.search))

    def __repr__(self) -> str:
        index = getattr(self.owner, "index", None)
        where = f"{index.bundle.app_id} v{index.version}" if index is not None else "no bundle"
        return f"<BundleLoader {where}>"


class _TreeReader(TraversableResources):
    """Resources of a package: its directory in the version's immutable tree (real files)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def files(self) -> Traversable:
        return self._directory

"""The ``sys.meta_path`` finder that serves the app's declared packages from the active bundle.

It follows the import protocol the way CPython's ``zipimport`` does: ``find_spec`` answers with
``importlib.util.spec_from_loader(...)`` or ``None``, and the loader implements ``exec_module``,
``get_code``, ``get_source``, ``is_package``, ``get_filename``, ``get_data`` and a resource reader.
``__file__``, ``__path__``, ``__package__``, ``__spec__`` and ``__loader__`` all come from the spec,
set by the import machinery; nothing here builds module attributes by hand.

``find_spec`` is one dict lookup on an immutable :class:`BundleIndex`: no disk or network I/O, no
lock, and never an exception for a name that is not ours. One exception to "not ours": a module of a
declared package that the bundle lacks (every module, before the first push) is found by the
standard path finder, as it would be anyway, with a loader that also keeps the bytes it executed, so
the first push diffs against what runs rather than against a file the developer has since edited.
Switching versions is one attribute assignment (:meth:`OverlayFinder.set_index`), so an import sees
either the old index or the new one.

Every index points at the store's tree (``<store>/tree``), which holds the active version's files
at paths that do not change from one version to the next: ``__file__`` is a real file with the
module's current content, data files sit beside it, and a module a push leaves alone keeps its
``__file__``, ``__spec__`` and ``__loader__`` (the finder's one loader serves whatever version is
active). As with files edited on disk, a frame still running a replaced function shows the current
file's lines in a traceback. Code is compiled from the bundle in memory, never from the tree.
"""

from __future__ import annotations

import importlib.util
import keyword
import logging
import os
import sys
import types
from collections.abc import Iterable
from importlib.machinery import ModuleSpec, PathFinder, SourceFileLoader
from importlib.resources.abc import Traversable, TraversableResources
from pathlib import Path
from typing import NamedTuple

from ._codecache import CodeCache
from .bundle import Bundle, Entry
from .errors import ConfigError, HabaneroError

logger = logging.getLogger(__name__)

__all__ = ["BundleIndex", "BundleLoader", "OverlayFinder", "OverlayImportError", "check_packages"]

# Names the overlay never serves, whatever the configuration says: habanero itself, and the modules
# site.py runs at start-up (they are not in sys.stdlib_module_names but a bundle must not ship them).
_RESERVED = frozenset({"overlay", "packer", "habanero", "__main__", "sitecustomize", "usercustomize"})


_UNCACHED = CodeCache(None)  # for an index not (yet) attached to a finder: memory only


class OverlayImportError(HabaneroError, ImportError):
    """Raised during an import; also an ``ImportError`` (with ``name=``) so ``except ImportError`` works."""

    default_code = "import_failed"

    def __init__(self, message: str, *, name: str, path: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code, module=name)
        self.name = name
        self.path = path


def check_packages(packages: Iterable[object]) -> tuple[str, ...]:
    """Validate the declared top-level packages; refuse anything that would shadow Python or habanero."""
    names: list[str] = []
    for name in packages:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"packages: {name!r} is not a package name", code="bad_config")
        name = name.strip()
        if "." in name:
            raise ConfigError(f"packages: {name!r} is a dotted name; declare the top-level package "
                              f"{name.partition('.')[0]!r} instead", code="bad_config")
        if not name.isascii() or not name.isidentifier() or keyword.iskeyword(name):
            hint = f" (did you mean {name.replace('-', '_')!r}?)" if "-" in name else ""
            raise ConfigError(f"packages: {name!r} is not an importable package name{hint}; use the "
                              "name you write after `import`, not the distribution name", code="bad_config")
        if name in sys.stdlib_module_names or name in sys.builtin_module_names:
            raise ConfigError(f"packages: {name!r} is part of the standard library; the overlay never "
                              "shadows it (rename your package)", code="bad_config")
        if name in _RESERVED:
            raise ConfigError(f"packages: {name!r} is reserved (habanero's own code or a module site.py "
                              "runs); the overlay never serves it", code="bad_config")
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("packages: declare at least one top-level package to serve", code="bad_config")
    return tuple(names)


def _top(entry: Entry) -> str:
    """The top-level package an entry belongs to (``a`` for ``a.b`` and for ``a/data/x.txt``)."""
    return entry.name.partition("/" if entry.kind == "data" else ".")[0]


class _Module(NamedTuple):
    kind: str              # "module" or "package"
    filename: str          # the file in the store's tree: __file__ and co_filename
    search: str | None     # the package's directory (its __path__), None for a plain module


class BundleIndex:
    """One bundle version as the import system sees it: module name -> kind, file and ``__path__``.

    Entries outside ``packages`` are left out (and logged), so the index only answers for names
    the app declared. Without ``packages`` it serves the bundle's own top-level packages minus the
    standard library and habanero's; ``OverlayFinder.set_index`` then refuses it unless the finder
    declared them all. Immutable once built, except that an index built without a code cache adopts
    the finder's when it goes live. Prefer ``OverlayFinder.index_for``, which passes both.

    Paths do not depend on the version (the store's tree is at a fixed place), so an index built
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
                                  (t for t in tops if t not in _RESERVED and t not in sys.stdlib_module_names))
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
        spec = ModuleSpec(name, self.loader, origin=mod.filename, is_package=mod.search is not None)
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

    def __init__(self, owner: object) -> None:
        self.owner = owner

    @property
    def index(self) -> BundleIndex:
        index = self.owner.index  # type: ignore[attr-defined]
        if index is None:
            raise OverlayImportError("no bundle is active: modules are served from disk", name="",
                                     code="not_in_bundle")
        return index

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object is right

    def exec_module(self, module: types.ModuleType) -> None:
        spec = module.__spec__
        name = spec.name if spec is not None else module.__name__
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
        """Bytes of a file of the served version (``pkgutil.get_data``), from the verified bundle in memory."""
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


class _RecordingLoader(SourceFileLoader):
    """A plain source loader that keeps the bytes of the source it executes."""

    def __init__(self, fullname: str, path: str, record: dict[str, bytes]) -> None:
        super().__init__(fullname, path)
        self._record = record

    def exec_module(self, module: types.ModuleType) -> None:
        self._record[module.__name__] = self.get_data(self.path)
        super().exec_module(module)


class _TreeReader(TraversableResources):
    """Resources of a package: its directory in the version's immutable tree (real files)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def files(self) -> Traversable:
        return self._directory


class OverlayFinder:
    """First on ``sys.meta_path``; answers for declared packages' modules in the active index.

    Everything else (the standard library, third-party packages, names the bundle lacks, and all
    imports while no bundle is active) returns ``None`` and falls through to the usual finders.
    """

    def __init__(self, packages: Iterable[str], *, code_cache: CodeCache | None = None) -> None:
        self.packages = check_packages(packages)
        self.code_cache = code_cache if code_cache is not None else CodeCache(None)
        self._index: BundleIndex | None = None
        self.loader = BundleLoader(self)  # one for every version: see BundleLoader
        self._declared = frozenset(self.packages)
        # The exact source each declared module ran when it came from disk, by module name: the
        # first push diffs against what runs, not against a file the developer has since edited.
        self.disk_sources: dict[str, bytes] = {}

    @property
    def index(self) -> BundleIndex | None:
        return self._index

    def index_for(self, bundle: Bundle, tree_root: str | os.PathLike[str], *,
                  changed: Iterable[str] | None = None) -> BundleIndex:
        """An index over ``bundle`` laid out at ``tree_root``, sharing this finder's code cache and
        loader. With ``changed`` (the entry names that differ from the active index's bundle), it is
        derived from the active index instead of built from scratch."""
        return BundleIndex(bundle, tree_root, packages=self.packages, code_cache=self.code_cache,
                           loader=self.loader, previous=self._index if changed is not None else None,
                           changed=changed)

    def set_index(self, index: BundleIndex | None) -> BundleIndex | None:
        """Make ``index`` the active one (None: serve the code on disk); return the previous one.

        One assignment, so concurrent imports see the old index or the new one, never a mix. The
        upgrade transaction records ``set_index(previous)`` as the undo.
        """
        if index is not None:
            extra = index.packages - set(self.packages)
            if extra:
                raise ConfigError(f"bundle v{index.version} would serve {', '.join(sorted(extra))}, outside "
                                  f"the declared packages {', '.join(self.packages)}; build it with "
                                  "finder.index_for() or declare the package in install()", code="bad_config")
            if index.code_cache is None:
                index.code_cache = self.code_cache
        previous, self._index = self._index, index
        return previous

    def find_spec(self, fullname: str, path: object = None, target: types.ModuleType | None = None,
                  ) -> ModuleSpec | None:
        index = self._index  # read once: a concurrent set_index cannot tear this lookup
        mod = index.modules.get(fullname) if index is not None else None
        if mod is not None:
            return index._spec(fullname, mod)  # type: ignore[union-attr]
        if fullname.partition(".")[0] not in self._declared:
            return None
        return self._from_disk(fullname, path)

    def _from_disk(self, fullname: str, path: object) -> ModuleSpec | None:
        """A declared module the bundle lacks: what the path finder finds, remembering its source.

        The spec is the one the next finder would return; only its loader records the source bytes
        it executes, which costs one read of a file the import reads anyway.
        """
        if path is None and "." in fullname:
            return None  # a submodule is always looked up in its parent's __path__
        spec = PathFinder.find_spec(fullname, path)  # type: ignore[arg-type]
        if spec is not None and type(spec.loader) is SourceFileLoader:
            spec.loader = _RecordingLoader(spec.loader.name, spec.loader.path, self.disk_sources)
        return spec

    def invalidate_caches(self) -> None:
        """Nothing to drop: the index is immutable and replaced whole by ``set_index``."""

    def __repr__(self) -> str:
        version = self._index.version if self._index is not None else None
        return f"<OverlayFinder packages={list(self.packages)} version={version}>"

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

Every index points at this process's source tree (in its slot of the runtime directory, see
``overlay.cluster.registry``), which holds the version this process runs, at paths that change
neither from one version to the next nor from one run to the next: ``__file__`` is a real file with the
module's current content, data files sit beside it, and a module a push leaves alone keeps its
``__file__``, ``__spec__`` and ``__loader__`` (the finder's one loader serves whatever version is
active). As with files edited on disk, a frame still running a replaced function shows the current
file's lines in a traceback. Code is compiled from the bundle in memory, never from the tree.
"""

from __future__ import annotations

import keyword
import os
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from importlib.machinery import ModuleSpec, PathFinder, SourceFileLoader

from overlay.bundle import Bundle
from overlay.errors import ConfigError, OverlayImportError
from overlay.format.names import RESERVED_NAMES
from overlay.importing.codecache import CodeCache
from overlay.importing.index import BundleIndex, BundleLoader

__all__ = ["BundleIndex", "BundleLoader", "OverlayFinder", "OverlayImportError", "check_packages"]



def check_packages(packages: Iterable[object]) -> tuple[str, ...]:
    """Validate the declared top-level packages; refuse anything that would shadow Python or habanero."""
    names: list[str] = []
    for given in packages:
        if not isinstance(given, str) or not given.strip():
            raise ConfigError(f"packages: {given!r} is not a package name", code="bad_config")
        name = given.strip()
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
        if name in RESERVED_NAMES:
            raise ConfigError(f"packages: {name!r} is reserved (habanero's own code or a module site.py "
                              "runs); the overlay never serves it", code="bad_config")
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("packages: declare at least one top-level package to serve", code="bad_config")
    return tuple(names)


class _RecordingLoader(SourceFileLoader):
    """A plain source loader that keeps the bytes of the source it executes."""

    def __init__(self, fullname: str, path: str, finder: OverlayFinder) -> None:
        super().__init__(fullname, path)
        self._finder = finder

    def exec_module(self, module: types.ModuleType) -> None:
        self._finder.disk_sources[module.__name__] = self.get_data(self.path)
        if self._finder.before_exec is not None:
            self._finder.before_exec()
        super().exec_module(module)


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
        #: Called before each module of the app runs (from the bundle or from disk): the runtime
        #: loads framework integrations there, before the app's code registers routes with them.
        self.before_exec: Callable[[], None] | None = None

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

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None,
                  ) -> ModuleSpec | None:
        index = self._index  # read once: a concurrent set_index cannot tear this lookup
        if index is not None:
            mod = index.modules.get(fullname)
            if mod is not None:
                return index._spec(fullname, mod)
        if fullname.partition(".")[0] not in self._declared:
            return None
        return self._from_disk(fullname, path)

    def _from_disk(self, fullname: str, path: Sequence[str] | None) -> ModuleSpec | None:
        """A declared module the bundle lacks: what the path finder finds, remembering its source.

        The spec is the one the next finder would return; only its loader records the source bytes
        it executes, which costs one read of a file the import reads anyway.
        """
        if path is None and "." in fullname:
            return None  # a submodule is always looked up in its parent's __path__
        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and type(spec.loader) is SourceFileLoader:
            spec.loader = _RecordingLoader(spec.loader.name, spec.loader.path, self)
        return spec

    def invalidate_caches(self) -> None:
        """Nothing to drop: the index is immutable and replaced whole by ``set_index``."""

    def __repr__(self) -> str:
        version = self._index.version if self._index is not None else None
        return f"<OverlayFinder packages={list(self.packages)} version={version}>"

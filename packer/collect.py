"""Turn a project's packages into bundle entries, re-reading only the files that changed.

What becomes what, for each configured package (paths are relative to the package's parent)::

    shop/__init__.py            package  shop
    shop/cart.py                module   shop.cart
    shop/templates/index.html   data     shop/templates/index.html   (include/exclude apply)
    shop/my-tool.py             data     shop/my-tool.py             (not an identifier: not importable)
    worker.py                   module   worker                      (a single-file module)

A ``.py`` file whose name is not an identifier (``my-tool.py``), or in a directory whose name is not
one (``shop/my-scripts/``), cannot be imported and ships as data. One that could be imported through
a directory without ``__init__.py`` (``shop/scripts/tool.py``, as ``shop.scripts.tool``) is refused:
the app would import it from habanero's source tree without habanero compiling it first or re-running
it on a push. Add ``shop/scripts/__init__.py`` to ship it as a module, rename it (``tool.py-tpl``) or
exclude it.
Never shipped: ``__pycache__``, ``*.pyc``/``*.pyo``, editor droppings (``*.swp``, ``*.swo``, ``*~``,
``#*#``), hidden files and directories (``.git``, ``.#lock``, ``.env``...). Native code and path hooks
(``.so``, ``.pyd``, ``.pth``...) are skipped with a warning that names them. Symlinks are followed
while their target stays inside the project root; one that points outside is refused.

:class:`SourceSnapshot` keeps every file's bytes keyed by ``(mtime_ns, size, inode)``, so a refresh
re-reads only files whose stat changed, and with ``changed`` paths (from a watcher) it does not even
walk the tree. A file modified within the last two seconds is re-read on every refresh anyway,
because a second write within one file-system timestamp tick would leave its stat unchanged.
"""

from __future__ import annotations

import keyword
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from overlay.bundle import DEFAULT_LIMITS, FORBIDDEN_SUFFIXES, Limits, check_entry_name
from overlay.errors import BadEntryName, ConfigError, TooLarge

from .config import ProjectConfig

__all__ = ["Changes", "SourceSnapshot", "collect"]

log = logging.getLogger(__name__)

Entries = dict[str, tuple[str, bytes]]  # {name: (kind, content)}, what build_bundle takes

_JUNK_SUFFIXES = (".pyc", ".pyo", ".swp", ".swo", "~")
# Bytecode is junk (skipped quietly); these are refused by the bundle, so skipping them is news.
_NATIVE_SUFFIXES = tuple(s for s in FORBIDDEN_SUFFIXES if s not in (".pyc", ".pyo"))


def collect(config: ProjectConfig) -> Entries:
    """Read the configured packages once: ``{name: (kind, bytes)}``, sorted by name.

    Example::

        files = collect(load_config())
        build_bundle(files, app_id="shop", version=1, signers=[key])
    """
    snapshot = SourceSnapshot(config)
    snapshot.refresh()
    return snapshot.files()


@dataclass(frozen=True)
class Changes:
    """What one :meth:`SourceSnapshot.refresh` changed, by entry name; false when nothing did."""

    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    read: int = 0  # files read from disk by this refresh

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.removed)


@dataclass(frozen=True)
class _File:
    key: tuple[int, int, int]  # (mtime_ns, size, inode) when it was read
    content: bytes
    settled: bool  # False while the mtime is too recent to vouch for the content


class SourceSnapshot:
    """The project's sources in memory, refreshed incrementally.

    Example::

        snapshot = SourceSnapshot(config)
        snapshot.refresh()                                # reads everything once
        changes = snapshot.refresh({Path("shop/cart.py").absolute()})   # re-reads one file
        if changes:
            build(config, version=4, signer=key, snapshot=snapshot)
    """

    #: Files younger than this are re-read on every refresh (see the module docstring).
    settle_ns = 2_000_000_000

    def __init__(self, config: ProjectConfig, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.config = config
        self.limits = limits
        self.reads = 0  # files read from disk over this snapshot's life
        self._root = os.path.realpath(config.root)
        self._sources = {name: Path(os.path.abspath(p)) for name, p in config.sources().items()}
        self._files: dict[str, _File] = {}  # by path relative to the package's parent
        self._entries: Entries = {}
        self._layout: list[tuple[str, str, str]] = []  # (name, kind, path), valid for _layout_keys
        self._layout_keys: set[str] | None = None
        self._named: dict[str, tuple[str, str]] = {}  # path -> (name, kind), as in _layout
        self._in_step = False  # _entries are _files as named by _layout
        self._skipped: set[str] = set()
        self._scanned = False

    def files(self) -> Entries:
        """The current entries, ``{name: (kind, content)}`` sorted by name (a copy)."""
        return dict(self._entries)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Files left out because they can never ride in a bundle (native code, path hooks)."""
        return tuple(sorted(self._skipped))

    def watch_paths(self) -> list[Path]:
        """The directories and single files a watcher should watch."""
        return list(self._sources.values())

    def refresh(self, changed: Iterable[str | os.PathLike[str]] | None = None) -> Changes:
        """Bring the snapshot up to date: everything (``None``) or just the ``changed`` paths.

        Paths outside the packages, junk files and unchanged files cost nothing; a changed
        directory (created, renamed, deleted) is rescanned as a whole.
        """
        reads, skipped_before = self.reads, set(self._skipped)
        now = time.time_ns()
        touched: set[str] | None = None  # the relative paths looked at; None: all of them
        if changed is None or not self._scanned:
            fresh: dict[str, _File] = {}
            self._skipped = set()
            for source in self._sources.values():
                self._scan(str(source), source.name, fresh, self._files, now, set())
            self._files, self._scanned = fresh, True
        else:
            touched = set()
            for path in changed:
                touched |= self._refresh_path(Path(path), now)
        news = sorted(self._skipped - skipped_before)
        if news:
            log.warning("skipped %s (native code and path hooks never ride in a bundle): %s",
                        _plural(len(news), "file"), ", ".join(news))
        before = self._entries
        in_step, self._in_step = self._in_step, False  # until the entries match the files (naming may fail)
        if touched is not None and in_step and self._layout_keys == self._files.keys():
            # A save: contents changed, names did not; only the entries it touched need a look.
            self._entries = after = self._reclassify(touched)
            self._in_step = True
            names = sorted(self._named[rel][0] for rel in touched if rel in self._named)
            return Changes(modified=tuple(n for n in names if before[n] != after[n]), read=self.reads - reads)
        self._entries = after = self._classify()
        self._in_step = True
        return Changes(
            added=tuple(n for n in after if n not in before),
            modified=tuple(n for n in after if n in before and before[n] != after[n]),
            removed=tuple(n for n in before if n not in after),
            read=self.reads - reads,
        )

    # ------------------------------------------------------------------------------- reading

    def _refresh_path(self, path: Path, now: int) -> set[str]:
        """Look at ``path`` (and below it) again; returns the relative paths there, before and now."""
        found = self._relative(path)
        if found is None:
            return set()
        base, rel = found
        if any(_is_junk(part) for part in rel.split("/")):
            return set()
        prefix = rel + "/"
        if rel in self._files:  # a file we hold (the usual save): nothing lies below it
            old = {rel: self._files.pop(rel)}
        else:
            old = {k: f for k, f in self._files.items() if k.startswith(prefix)}
            for k in old:
                del self._files[k]
        if self._skipped:
            self._skipped = {s for s in self._skipped if s != rel and not s.startswith(prefix)}
        self._scan(os.path.join(base, rel), rel, self._files, old, now, set())
        if rel in self._files:
            return {rel, *old}
        return {*old, *(k for k in self._files if k.startswith(prefix))}

    def _relative(self, path: Path) -> tuple[Path, str] | None:
        """``(package parent, path relative to it)``, or None when ``path`` is in no package."""
        found = self._inside(Path(os.path.abspath(path)))
        if found is None and path.exists():
            found = self._inside(path.resolve())  # a watcher may report the real path
        return found

    def _inside(self, path: Path) -> tuple[Path, str] | None:
        for source in self._sources.values():
            if path == source or source in path.parents:
                return source.parent, path.relative_to(source.parent).as_posix()
        return None

    def _scan(self, path: str, rel: str, into: dict[str, _File], cache: dict[str, _File], now: int,
              visiting: set[tuple[int, int]]) -> None:
        # Files come and go while we look (an editor's temporary file, a save by rename): a path
        # that vanished is simply not there; the watcher reports its removal separately.
        try:
            st: os.stat_result | None = os.lstat(path)
            if st is not None and stat.S_ISLNK(st.st_mode):
                st = self._follow(path, rel)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                here = (st.st_dev, st.st_ino)
                if here in visiting:
                    log.warning("skipping %s: a symlink loop leads back to one of its parents", rel)
                    return
                with os.scandir(path) as it:
                    children = [(e.name, e.path) for e in it if not _is_junk(e.name)]
                visiting.add(here)
                for name, child in children:
                    self._scan(child, f"{rel}/{name}", into, cache, now, visiting)
                visiting.discard(here)
            elif stat.S_ISREG(st.st_mode):
                self._take(path, rel, st, into, cache, now)
        except (FileNotFoundError, NotADirectoryError):
            return

    def _follow(self, path: str, rel: str) -> os.stat_result | None:
        real = os.path.realpath(path)
        if real != self._root and not real.startswith(self._root + os.sep):
            raise ConfigError(f"{rel} is a symlink to {real}, outside the project {self._root}; "
                              "copy the file into the project or remove the link")
        try:
            return os.stat(path)
        except OSError:
            log.warning("skipping %s: broken symlink", rel)
            return None

    def _take(self, path: str, rel: str, st: os.stat_result, into: dict[str, _File],
              cache: dict[str, _File], now: int) -> None:
        if rel.lower().endswith(_NATIVE_SUFFIXES):
            self._skipped.add(rel)
            return
        if not rel.endswith(".py") and not self._wanted(rel):
            return  # excluded data is never even read
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        old = cache.get(rel)
        if old is not None and old.key == key and old.settled:
            into[rel] = old
            return
        if st.st_size > self.limits.max_entry_bytes:
            raise TooLarge(f"{rel} is {st.st_size} bytes, over the {self.limits.max_entry_bytes} "
                           "byte per-file limit; exclude it in [tool.habanero]", code="entry_too_large")
        with open(path, "rb") as fh:
            content = fh.read()
        self.reads += 1
        into[rel] = _File(key, content, settled=now - st.st_mtime_ns > self.settle_ns)

    # ------------------------------------------------------------------------------ naming

    def _classify(self) -> Entries:
        """The entries, named anew if files came or went (a save only changes contents).

        An entry whose content is the same object as before is the same tuple as before: a
        consumer (the watch's builder) finds what changed by identity.
        """
        files, before = self._files, self._entries
        layout = self._layout if self._layout_keys == files.keys() else None
        if layout is None:
            layout = self._layout = self._name_all()
            self._layout_keys = set(files)
            self._named = {rel: (name, kind) for name, kind, rel in layout}
        entries: Entries = {}
        for name, kind, rel in layout:
            content, old = files[rel].content, before.get(name)
            entries[name] = old if old is not None and old[1] is content and old[0] == kind else (kind, content)
        return entries

    def _reclassify(self, touched: set[str]) -> Entries:
        """The entries after a refresh of ``touched`` files that changed no names (see _classify)."""
        entries, files = dict(self._entries), self._files
        for rel in touched:
            named = self._named.get(rel)
            if named is not None and entries[named[0]][1] is not files[rel].content:
                entries[named[0]] = (named[1], files[rel].content)
        return entries

    def _name_all(self) -> list[tuple[str, str, str]]:
        """``(name, kind, relative path)`` for every shipped file, sorted by name."""
        for name, source in self._sources.items():
            if source.suffix != ".py" and f"{name}/__init__.py" not in self._files:
                raise ConfigError(f"package {name!r} ({source}) has no __init__.py; habanero ships "
                                  "regular packages")
        packages = _package_dirs(self._files)
        entries: dict[str, tuple[str, str]] = {}
        origin: dict[str, str] = {}
        for rel in sorted(self._files):
            named = self._name(rel, packages)
            if named is None:
                continue
            kind, name = named
            if name in origin:
                raise ConfigError(f"{origin[name]} and {rel} both define {kind} {name!r}; Python would "
                                  "import only one of them, so remove the other")
            if (self._entries.get(name) or ("",))[0] != kind:  # validate each name once
                _check_name(name, kind, rel)
            origin[name] = rel
            entries[name] = (kind, rel)
        return [(name, kind, rel) for name, (kind, rel) in sorted(entries.items())]

    def _name(self, rel: str, packages: set[str]) -> tuple[str, str] | None:
        if rel.endswith(".py"):
            directory, _, filename = rel.rpartition("/")
            stem = filename[:-3]
            if not directory:
                return "module", stem
            if directory in packages:
                dotted = directory.replace("/", ".")
                if stem == "__init__":
                    return "package", dotted
                if stem.isidentifier() and not keyword.iskeyword(stem):
                    return "module", f"{dotted}.{stem}"
        return ("data", rel) if self._wanted(rel) else None

    def _wanted(self, rel: str) -> bool:
        """Whether a data file passes the include and exclude globs."""
        include, exclude = self.config.include, self.config.exclude
        if include is not None and not _matches(rel, include):
            return False
        return not _matches(rel, exclude)


def _package_dirs(files: dict[str, _File]) -> set[str]:
    """Directories that are packages: an ``__init__.py`` in them and in every parent up to the top."""
    with_init = {rel[: -len("/__init__.py")] for rel in files if rel.endswith("/__init__.py")}
    return {d for d in with_init
            if all("/".join(d.split("/")[:i]) in with_init for i in range(1, d.count("/") + 1))}


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    filename = rel.rpartition("/")[2]
    return any(fnmatchcase(rel if "/" in p else filename, p) for p in patterns)


def _is_junk(name: str) -> bool:
    return (name.startswith(".") or name == "__pycache__" or name.endswith(_JUNK_SUFFIXES)
            or (len(name) > 1 and name.startswith("#") and name.endswith("#")))


def _check_name(name: str, kind: str, rel: str) -> None:
    try:
        check_entry_name(name, kind)
    except BadEntryName as exc:
        raise BadEntryName(f"cannot ship {rel}: {exc.message}", name=name) from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"

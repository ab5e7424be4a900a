"""The project around the served packages, mirrored at the root of a source tree.

Code often finds its project's files from its own ``__file__``: Django's
``BASE_DIR = Path(__file__).resolve().parent.parent``, Flask's ``root_path``,
``Path(__file__).parent.parent / ".env"``. Once a version is pushed, ``__file__`` of a served module
is in this process's source tree, so such paths start from the tree, not from the project. The tree
root therefore holds, beside the package directories the bundle lays out, one symbolic link per
child of each package's *home* (the ``sys.path`` directory the package is found in on disk when
``install()`` runs), to that child: ``<tree>/db.sqlite3 -> <project>/db.sqlite3``, ``<tree>/media ->
<project>/media``, ``<tree>/.env -> <project>/.env``. ``BASE_DIR / "db.sqlite3"`` opens the
project's database before a push, after one and after a restart alike.

Left out: the served names (``app``, ``app.py``: the tree's own), names the tree holds as something
other than a link (never replaced), and a child whose real path holds the store or the tree or lies
inside them (``.habanero/``: a loop). When two homes have a child of the same name, the first
package's home wins.

The limit: a file the app creates through such a path *after* the mirror was made, whose name the
project did not have then (``BASE_DIR / "new.db"``), is created in the tree root, not in the
project. habanero never deletes it (see ``overlay.storage.tree``); it warns, naming the file: create
it in the project before the app starts, or derive its path from a setting or an environment
variable. A link whose target vanished stays: opening it to write creates the file in the project.

A link is ours when the record of the links the mirror made (beside the tree, ``.<tree>.links``)
lists it with the target it still has: a link the app made at the tree root, or one of ours it
re-pointed, is never touched. One of ours whose project moved (a new release directory) is
re-pointed at the first home. The mirror is refreshed whenever the
tree is laid out or updated: a ``stat`` of the tree root and of each home, and when one of them
changed, a ``scandir`` of each.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from importlib.machinery import PathFinder, all_suffixes

from overlay.storage import fs

__all__ = ["Mirror", "homes_of", "warn_once"]

logger = logging.getLogger("overlay.store")

_warned: set[tuple[str, str]] = set()
#: A directory changed less than this long ago may change again without a new mtime (see _stamp).
_SETTLE_NS = 2_000_000_000


def warn_once(key: str, path: str, message: str, *args: object) -> None:
    """Log ``message`` as a warning the first time this process sees ``(key, path)``."""
    if (key, path) not in _warned:
        _warned.add((key, path))
        logger.warning(message, *args)


def homes_of(packages: Iterable[str]) -> dict[str, str]:
    """Each package's home: the absolute ``sys.path`` directory the path finder finds it in on
    disk now (packages found nowhere on disk have none)."""
    homes: dict[str, str] = {}
    for name in packages:
        try:
            spec = PathFinder.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            home = os.path.dirname(next(iter(spec.submodule_search_locations)))
        elif spec.origin and spec.has_location:
            home = os.path.dirname(spec.origin)
        else:
            continue
        homes[name] = os.path.abspath(home)
    return homes


class Mirror:
    """The links at a tree root to the children of the served packages' homes (see the module
    docstring). ``avoid`` are directories no link may lead into or around (the store)."""

    def __init__(self, homes: Mapping[str, str], *, packages: Iterable[str], avoid: Iterable[str] = ()) -> None:
        self.homes: tuple[str, ...] = tuple(dict.fromkeys(homes.values()))
        suffixes = ("", *all_suffixes())
        self.served = frozenset(name + suffix for name in packages for suffix in suffixes)
        self._avoid = tuple(os.path.realpath(path) for path in avoid)
        self._stamps: dict[str, tuple[int, ...] | None] = {}  # tree root -> _stamp() at its last refresh

    def refresh(self, root: str) -> None:
        """Add the missing links at ``root``, re-point ours that point elsewhere; never fails (a
        link that cannot be made is logged).

        Skipped when neither ``root`` nor any home changed since the last refresh (their inodes and
        mtimes, one ``stat`` each): a push then costs a few microseconds, however large the homes.
        """
        try:
            last = self._stamps.get(root)
            if last is not None and last == _stamp((root, *self.homes)):
                return
            self._refresh(root)
            self._stamps[root] = _stamp((root, *self.homes))
        except OSError as exc:
            warn_once("mirror", root, "could not link the project's files into the source tree %s (%s): code "
                      "that derives paths from __file__ may not find them", root, exc)

    def _refresh(self, root: str) -> None:
        present = {entry.name: entry for entry in os.scandir(root)}
        real_root = os.path.realpath(root)
        wanted = self._wanted((*self._avoid, real_root))
        made = _Record(root)
        for name, entry in present.items():
            if name.startswith(fs.TMP_PREFIX) and entry.is_symlink():
                os.unlink(entry.path)  # a re-pointing that was interrupted
            elif entry.is_symlink():
                target = os.readlink(entry.path)
                if not made.holds(name, target):
                    continue  # the app's own link, or one it re-pointed: never touched
                if name in self.served:  # now a package of the app: the bundle lays it out
                    os.unlink(entry.path)
                    made.forget(name)
                    continue
                desired = wanted.get(name)
                if desired is None:  # gone from the project: keep pointing into it
                    desired = target if os.path.dirname(target) in self.homes else os.path.join(self.homes[0], name)
                if target != desired:
                    _link(desired, entry.path)
                    made.note(name, desired)
            elif name not in self.served and not name.startswith(fs.TMP_PREFIX):
                where = wanted.get(name)
                warn_once("foreign", entry.path, "%s was created in habanero's source tree, not in the project%s; "
                          "habanero leaves it there. Code that derives paths from __file__ finds it instead of "
                          "the project's: create the file in the project directory (%s) before the app starts, "
                          "or derive its path from a setting or an environment variable, then delete it",
                          entry.path, f" (it hides {where})" if where else "", self.homes[0] if self.homes else "?")
        for name, target in wanted.items():
            if name not in present:
                _link(target, os.path.join(root, name))
                made.note(name, target)
        made.save()

    def _wanted(self, avoid: tuple[str, ...]) -> dict[str, str]:
        """Link name -> target, over every home's children, first home first."""
        wanted: dict[str, str] = {}
        for home in self.homes:
            real_home = os.path.realpath(home)
            if any(real_home == a or real_home.startswith(a + os.sep) for a in avoid):
                continue  # the tree itself on sys.path, or a home inside the store
            try:
                children = list(os.scandir(home))
            except OSError as exc:
                warn_once("home", home, "cannot list %s (%s): its files are not linked into the source tree",
                          home, exc)
                continue
            for child in children:
                name = child.name
                if name in self.served or name.startswith(fs.TMP_PREFIX) or _loops(child, real_home, avoid):
                    continue
                if name in wanted:
                    if wanted[name] != child.path and ("collision", name) not in _warned:
                        _warned.add(("collision", name))
                        logger.info("%s and %s have the same name: the source tree links to the first",
                                    wanted[name], child.path)
                    continue
                wanted[name] = child.path
        return wanted


def _stamp(directories: tuple[str, ...]) -> tuple[int, ...] | None:
    """The inode and mtime of each directory, or None when one changed less than ``_SETTLE_NS``
    ago: an mtime has the granularity of the kernel's clock tick, so a change made right after the
    last scan could carry the same one (git's "racy clean" problem)."""
    stamp: list[int] = []
    now = time.time_ns()
    for directory in directories:
        st = os.stat(directory)
        if now - st.st_mtime_ns < _SETTLE_NS:
            return None
        stamp += (st.st_ino, st.st_mtime_ns)
    return tuple(stamp)


class _Record:
    """The links the mirror made at a tree root, name -> target, kept beside the tree
    (``.<tree name>.links``, JSON): a link is the mirror's only if it is listed and still points
    where the mirror pointed it, so a link the app made, or re-pointed, is never touched."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.links")
        try:
            value = json.loads(fs.read_small(self.path, flags=os.O_NOFOLLOW, limit=1 << 20))
        except (OSError, ValueError):
            value = {}
        self.links: dict[str, str] = {k: v for k, v in value.items() if isinstance(v, str)} \
            if isinstance(value, dict) else {}
        self._changed = False

    def holds(self, name: str, target: str) -> bool:
        return self.links.get(name) == target

    def note(self, name: str, target: str) -> None:
        self.links[name] = target
        self._changed = True

    def forget(self, name: str) -> None:
        if self.links.pop(name, None) is not None:
            self._changed = True

    def save(self) -> None:
        if self._changed:
            fs.write_atomic(self.path, json.dumps(self.links, sort_keys=True).encode(), sync=False, sync_dir=False)


def _loops(child: os.DirEntry[str], real_home: str, avoid: tuple[str, ...]) -> bool:
    """Whether ``child`` holds one of ``avoid`` or lies inside one (a plain file holds nothing)."""
    if child.is_symlink():
        real = os.path.realpath(child.path)
    elif child.is_dir(follow_symlinks=False):
        real = os.path.join(real_home, child.name)
    else:
        return False
    return any(a == real or a.startswith(real + os.sep) or real.startswith(a + os.sep) for a in avoid)


def _link(target: str, link: str) -> None:
    """Make ``link`` point at ``target``, replacing a link of ours atomically."""
    tmp = os.path.join(os.path.dirname(link), f"{fs.TMP_PREFIX}{os.urandom(6).hex()}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        os.unlink(tmp)
        raise

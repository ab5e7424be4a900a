"""Compiled code for bundle entries: kept in memory, and on disk in the store like ``__pycache__``.

A restart should not recompile what it ran before, and a push should compile only what changed.
The key is the entry's sha256 (its content), not its path: the same bytes may be served under
another filename (a module moved, a store directory moved, an index laid out elsewhere).
Compiling them there only changes ``co_filename``, so a cached code object is re-pointed at the
new file with ``code.replace`` (cheap, exact) instead of being compiled again.

On disk, one file per source content, ``<sha256>.<cache_tag>[.opt-N].pyc`` in the store's cache
directory, written atomically (temp file, ``os.replace``)::

    importlib.util.MAGIC_NUMBER (4) | b"HBC1" (4) | sha256 of the source (32) | length u32 | marshal

A file is used only when the magic is this interpreter's, the hash is the entry's, the length is
whole, the file belongs to this user and nobody else may write it, and marshal yields a code object.
Anything else is ignored and rewritten. The ownership check matters because a cache file is code
that no signature covers: whoever can write it as another user must not get it executed here.

The disk cache follows ``install(code_cache=...)`` / ``HABANERO_CODE_CACHE``, not
``PYTHONDONTWRITEBYTECODE``: containers often set that flag to keep source trees clean, but the store
is habanero's own state directory, and skipping the cache there would make every restart recompile.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import logging
import marshal
import os
import struct
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)

__all__ = ["CodeCache"]

_TAG = b"HBC1"
_HEADER = struct.Struct(">4s4s32sI")

_counter = itertools.count()

#: How many code objects stay in memory. A module's functions keep the code they need; the module's
#: own code object is garbage once it ran, except that a push compiles a module in the plan and
#: runs it at apply, and a rollback right after runs the code it replaced. Keeping every module's
#: code cost about 2 MiB per process for a 1,000-module app; the disk cache serves the rest.
MEMORY_ENTRIES = 64

_K = TypeVar("_K")


def _keep(memory: dict[_K, types.CodeType], key: _K, code: types.CodeType) -> None:
    """Remember ``code`` under ``key``, forgetting the oldest entry past ``MEMORY_ENTRIES``
    (first in, first out: a plain dict, as cheap as the lookup it saves on 1,000 imports)."""
    memory[key] = code
    if len(memory) > MEMORY_ENTRIES:
        del memory[next(iter(memory))]


# The compiler, behind a module-level name so tests can count compiles by patching it.
_compile = compile


def _retarget(code: types.CodeType, filename: str) -> types.CodeType:
    """The same code object, with ``co_filename`` (and every nested one's) set to ``filename``."""
    consts = tuple(_retarget(c, filename) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


class CodeCache:
    """Code objects by (source sha256, filename): memory (the last few used) first, then the disk,
    then ``compile``.

    ``directory`` None keeps the cache in memory only. ``stats`` counts compiles, memory hits,
    disk hits and retargets, for tests and the benchmark.
    """

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        tag = sys.implementation.cache_tag
        self.directory = Path(directory) if directory is not None and tag else None
        opt = f".opt-{sys.flags.optimize}" if sys.flags.optimize else ""
        self._suffix = f".{tag}{opt}.pyc"
        self._prefix = os.path.join(self.directory, "") if self.directory is not None else ""
        self._listed: set[str] | None = None  # file names seen on first use: misses skip open()
        self._by_key: dict[tuple[str, str], types.CodeType] = {}
        self._by_sha: dict[str, types.CodeType] = {}  # what was compiled here, to retarget elsewhere
        self._write_failed = False
        self._dir_ready = False
        self._lock = threading.Lock()  # guards only the one-time directory setup, never I/O reads
        self.stats = {"compiled": 0, "memory": 0, "disk": 0, "retargeted": 0, "written": 0}

    def path_for(self, sha256: str) -> str | None:
        """Where the compiled code for this source content lives on disk (or None: memory only)."""
        if self.directory is None:
            return None
        return self._prefix + sha256 + self._suffix

    def get(self, sha256: str, filename: str, source: Callable[[], bytes]) -> types.CodeType:
        """The code for the source with this hash, compiled as ``filename``.

        ``source`` is called only when nothing cached fits. A ``SyntaxError`` from compiling it
        propagates, the way the file system's loader lets it.
        """
        key = (sha256, filename)
        code = self._by_key.get(key)
        if code is not None:
            self.stats["memory"] += 1
            return code
        code = self._by_sha.get(sha256)
        if code is None:
            code = self._read(sha256)
            if code is None:
                data = source()
                code = self.compile(data, filename, sha256=sha256)
            else:
                self.stats["disk"] += 1
        if code.co_filename != filename:
            code = _retarget(code, filename)
            self.stats["retargeted"] += 1
        _keep(self._by_key, key, code)
        return code

    def compile(self, source: bytes, filename: str, *, sha256: str | None = None) -> types.CodeType:
        """Compile ``source`` as ``filename`` and remember it (memory and disk) under its hash."""
        code = _compile(source, filename, "exec", dont_inherit=True, optimize=-1)
        self.stats["compiled"] += 1
        sha256 = sha256 or hashlib.sha256(source).hexdigest()
        _keep(self._by_key, (sha256, filename), code)
        _keep(self._by_sha, sha256, code)
        self._write(sha256, code)
        return code

    def compile_module(self, name: str, source: bytes, filename: str) -> types.CodeType:
        """``compile`` in the shape the upgrade planner calls: ``(module name, source, filename)``."""
        sha256 = hashlib.sha256(source).hexdigest()
        return self.get(sha256, filename, lambda: source)

    # -------------------------------------------------------------------------------- disk

    def _read(self, sha256: str) -> types.CodeType | None:
        path = self.path_for(sha256)
        if path is None or sha256 + self._suffix not in self._listing():
            return None
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError:  # usually FileNotFoundError: not cached yet
            return None
        problem = _problem(data, st, sha256)
        code = None
        if problem is None:
            try:
                code = marshal.loads(memoryview(data)[_HEADER.size:])
            except (EOFError, ValueError, TypeError) as exc:
                problem = f"unreadable marshal data ({exc})"
            else:
                if not isinstance(code, types.CodeType):
                    problem, code = "not a code object", None
        if problem is not None:
            logger.info("ignoring compiled-code cache file %s: %s; it will be rewritten", path, problem)
        return code

    def _listing(self) -> set[str]:
        """One directory listing per process: a cold start does not try 500 opens that must fail.

        A file another process writes later is simply not seen; the module compiles instead.
        """
        if self._listed is None:
            try:
                self._listed = set(os.listdir(self.directory))
            except OSError:
                self._listed = set()
        return self._listed

    def _write(self, sha256: str, code: types.CodeType) -> None:
        path = self.path_for(sha256)
        if path is None or self._write_failed:
            return
        body = marshal.dumps(code)
        header = _HEADER.pack(importlib.util.MAGIC_NUMBER, _TAG, bytes.fromhex(sha256), len(body))
        tmp = None
        try:
            self._ensure_dir()
            # Unique per process and call, with the store's ".tmp-" mark for what a crash leaves;
            # O_EXCL refuses a planted file or symlink; 0600: only this user may write it.
            tmp = f"{self._prefix}.tmp-{sha256[:16]}-{os.getpid()}-{next(_counter)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                view = memoryview(header + body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
            tmp = None
            if self._listed is not None:
                self._listed.add(sha256 + self._suffix)
            self.stats["written"] += 1
        except OSError as exc:
            # A cache that cannot be written costs speed, never correctness: say so once.
            self._write_failed = True
            logger.warning("cannot write compiled code to %s (%s); modules will be compiled on "
                           "every start", self.directory, exc)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _ensure_dir(self) -> None:
        if self._dir_ready:
            return
        with self._lock:
            assert self.directory is not None
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir_ready = True


def _problem(data: bytes, st: os.stat_result, sha256: str) -> str | None:
    """Why a cache file must not be used, or None when it may be."""
    if os.name == "posix":
        if st.st_uid != os.getuid():
            return f"owned by uid {st.st_uid}, not this process's uid {os.getuid()}"
        if st.st_mode & 0o022:
            return "writable by group or others"
    if len(data) < _HEADER.size:
        return "truncated header"
    magic, tag, digest, length = _HEADER.unpack_from(data)
    if magic != importlib.util.MAGIC_NUMBER or tag != _TAG:
        return "written by another Python version or another tool"
    if digest.hex() != sha256:
        return "compiled from other source"
    if length != len(data) - _HEADER.size:
        return "truncated body"
    return None

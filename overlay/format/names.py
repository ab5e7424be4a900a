"""Which entry names a bundle may carry.

Names become dictionary keys in the finder and, later, paths on disk in each process's source
tree, so they are validated once, strictly, before anything is built from them. Only ASCII is
allowed: a Cyrillic ``а`` that looks like a Latin ``a`` would otherwise make two entries that read
the same to a reviewer.
"""  # noqa: RUF002  (the Cyrillic letter is the example)

from __future__ import annotations

import keyword
import re
from importlib.machinery import all_suffixes

from overlay.errors import BadEntryName

KINDS = ("module", "package", "data")
#: Top-level names the overlay never serves and a bundle never ships, whatever a configuration
#: says: habanero itself, and the modules site.py runs at start-up (they are not in
#: ``sys.stdlib_module_names`` but would run before anything else).
RESERVED_NAMES = frozenset({"overlay", "packer", "habanero", "__main__", "sitecustomize", "usercustomize"})
#: What an app id may be, everywhere (install(), the packer's config, a manifest): it names the
#: app in signatures, store files and messages, so it is plain and short.
APP_ID_RULE = "1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
_APP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH = 512

# Extensions that must never ride in a bundle: native code, bytecode that bypasses our source
# hashes, and path hooks that site.py would execute.
FORBIDDEN_SUFFIXES = (".so", ".pyd", ".pyc", ".pyo", ".pth", ".dll", ".dylib")
#: What the import system loads a module from (``.py``, and the forbidden ones above): a data entry
#: whose path is an importable module name with one of these would be imported from the source tree,
#: without being verified as a module, compiled before it runs or re-run by a push.
IMPORT_SUFFIXES = tuple(sorted(set(all_suffixes()), key=len, reverse=True))
_FORBIDDEN_CHARS = set('\\:*?"<>|')


def valid_app_id(value: object) -> bool:
    """Whether ``value`` is an app id (see :data:`APP_ID_RULE`)."""
    return isinstance(value, str) and _APP_ID.fullmatch(value) is not None


def check_module_name(name: str) -> None:
    """A dotted name whose every part is an ASCII identifier and not a keyword."""
    _check_common(name)
    for part in name.split("."):
        if not part.isidentifier() or keyword.iskeyword(part):
            raise BadEntryName(
                f"entry {name!r}: {part!r} is not a valid module name part (an ASCII identifier "
                "that is not a Python keyword)",
                name=name,
            )


def check_data_name(name: str) -> None:
    """A relative POSIX path inside a package: plain components, no traversal, no native code."""
    _check_common(name)
    if name.startswith("/"):
        raise BadEntryName(f"data entry {name!r} is an absolute path; use a path relative to the "
                           "package root", name=name)
    parts = name.split("/")
    if len(parts) < 2:
        raise BadEntryName(f"data entry {name!r} must live inside a package directory "
                           "(e.g. 'myapp/templates/index.html')", name=name)
    for part in parts:
        if part in ("", ".", ".."):
            raise BadEntryName(f"data entry {name!r} has an empty, '.' or '..' component", name=name)
        if part.startswith("."):
            raise BadEntryName(f"data entry {name!r}: hidden files are not shipped", name=name)
        bad = _FORBIDDEN_CHARS.intersection(part)
        if bad:
            raise BadEntryName(f"data entry {name!r} contains {''.join(sorted(bad))!r}", name=name)
    if not parts[0].isidentifier() or keyword.iskeyword(parts[0]):
        raise BadEntryName(f"data entry {name!r} must start with a package name", name=name)
    lowered = name.lower()
    for suffix in FORBIDDEN_SUFFIXES:
        if lowered.endswith(suffix):
            raise BadEntryName(
                f"data entry {name!r}: {suffix} files never ride in a bundle (native code, bytecode "
                "and path hooks are refused); ship source only",
                name=name,
            )
    module = importable_as(parts)
    if module is not None:
        directory = "/".join(parts[:-1])
        raise BadEntryName(
            f"data entry {name!r} would be importable as module {module!r} from the source tree, without "
            "being compiled before it runs or re-run by a push: ship it as a module (add "
            f"{directory}/__init__.py, so its directory is a package), or rename it (e.g. "
            f"{parts[-1]}-tpl), or exclude it", name=name)


def importable_as(parts: list[str]) -> str | None:
    """The dotted module name a file at these path components could be imported as (through
    namespace packages below a served package), or None: every directory and the file's stem are
    identifiers that are not keywords, and its suffix is one the import system loads."""
    filename = parts[-1]
    suffix = next((s for s in IMPORT_SUFFIXES if filename.endswith(s)), None)
    if suffix is None:
        return None
    dotted = [*parts[:-1], filename[: -len(suffix)]]
    if all(part.isidentifier() and not keyword.iskeyword(part) for part in dotted):
        return ".".join(dotted)
    return None


def check_entry_name(name: str, kind: str) -> None:
    if kind == "data":
        check_data_name(name)
    elif kind in ("module", "package"):
        check_module_name(name)
    else:
        raise BadEntryName(f"entry {name!r} has unknown kind {kind!r}; expected one of {KINDS}", name=name)


def module_path(name: str, kind: str) -> str:
    """Where a module entry lives in a source tree: ``a/b.py`` or ``a/b/__init__.py``."""
    base = name.replace(".", "/")
    return f"{base}/__init__.py" if kind == "package" else f"{base}.py"


# Fast path: printable ASCII without backslash. Anything else goes through the precise checks below.
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]+")


def _check_common(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise BadEntryName("an entry has an empty or non-string name", name=str(name))
    if len(name) > MAX_NAME_LENGTH:
        raise BadEntryName(f"entry name is longer than {MAX_NAME_LENGTH} characters", name=name[:80])
    if _PLAIN.fullmatch(name):
        return
    if not name.isascii():
        raise BadEntryName(f"entry {name!r} has non-ASCII characters; names must be plain ASCII "
                           "(look-alike letters are refused)", name=name)
    if "\\" in name:
        raise BadEntryName(f"entry {name!r} contains a backslash; use '/' in data paths", name=name)
    raise BadEntryName(f"entry {name!r} contains a NUL or control character", name=name)

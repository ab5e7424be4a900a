"""Where habanero-pack's settings come from.

The project is the nearest directory, from the current one upwards, that holds a ``pyproject.toml``
(or the directory given with ``--project``). Its ``[tool.habanero]`` table says what to ship::

    [tool.habanero]
    app_id = "shop"                     # defaults to the first package
    packages = ["shop", "worker.py"]    # top-level packages, or single-file modules
    include = ["*.html", "shop/static/**"]   # data files to ship (default: all of them)
    exclude = ["*.psd"]                 # data files never to ship
    key = ".habanero/deploy_key"        # signing key, relative to the project; ~ is expanded
    url = "http://127.0.0.1:8765"       # where --push sends bundles
    channel = "redis://10.0.0.2:6379/0" # or a fleet's Redis channel (wins over url)
    ca_file = "deploy/ca.pem"           # CA to trust for an https:// url (default: the system's)

Every setting resolves in one order, the first that is set wins:

1. the command-line flag (an argument of :func:`load_config`);
2. the environment: ``HABANERO_APP_ID``, ``HABANERO_PACKAGES`` (comma-separated), ``HABANERO_KEY``,
   ``HABANERO_URL``, ``HABANERO_CA_FILE`` (flag and environment paths are relative to the current
   directory; pyproject paths to the project);
3. ``[tool.habanero]`` in ``pyproject.toml``;
4. the built-in default: ``app_id`` is the first package; the key is ``.habanero/deploy_key`` in
   the project (where ``habanero-pack keygen`` writes it), then ``~/.ssh/id_ed25519``, each only if
   it exists. ``packages`` has no default.

Packages are looked up in the project root, then in ``src/``. Include and exclude globs apply to data
files only (modules always ship): a pattern with a ``/`` matches the path from the package's parent
(``shop/static/**``), one without matches the file name (``*.html``).
"""

from __future__ import annotations

import difflib
import keyword
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay.bundle import APP_ID_RULE, RESERVED_NAMES, valid_app_id
from overlay.errors import ConfigError

__all__ = ["ProjectConfig", "find_project", "load_config", "locate_package"]

log = logging.getLogger(__name__)

PYPROJECT = "pyproject.toml"
PROJECT_KEY = Path(".habanero") / "deploy_key"
HOME_KEY = Path("~") / ".ssh" / "id_ed25519"
# Every [tool.habanero] setting some feature reads; anything else earns a "did you mean" warning.
KNOWN_SETTINGS = frozenset({"app_id", "packages", "include", "exclude", "key", "url", "channel", "ca_file"})


@dataclass(frozen=True)
class ProjectConfig:
    """A resolved project: what to ship, as whom, signed with which key, pushed where."""

    root: Path
    app_id: str
    packages: tuple[str, ...]  # top-level import names: "shop", "worker" (for worker.py)
    include: tuple[str, ...] | None = None  # None: every data file
    exclude: tuple[str, ...] = ()
    key: Path | None = None
    url: str | None = None
    ca_file: Path | None = None  # None: the system's CAs
    # The whole [tool.habanero] table, for settings that later features read themselves.
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def sources(self) -> dict[str, Path]:
        """Each package's directory (or a single module's file), in the configured order."""
        return {name: locate_package(self.root, name) for name in self.packages}

    def require_key(self) -> Path:
        """The signing key's path, or a :class:`ConfigError` that says how to get one."""
        if self.key is None:
            raise ConfigError(
                f"no signing key: pass --key, set HABANERO_KEY or `key` in [tool.habanero]; neither "
                f"default exists ({self.root / PROJECT_KEY}, {HOME_KEY}). Create one with "
                "`habanero-pack keygen`"
            )
        return self.key


def load_config(
    project: str | os.PathLike[str] | None = None,
    *,
    app_id: str | None = None,
    packages: list[str] | tuple[str, ...] | None = None,
    key: str | os.PathLike[str] | None = None,
    url: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProjectConfig:
    """Resolve the project's settings: flags (the arguments), then environment, then pyproject.

    Example::

        config = load_config(app_id="shop-staging")   # from the cwd's project, app id overridden
        config.sources()   # {'shop': PosixPath('/home/me/shop/shop')}
    """
    env = os.environ if environ is None else environ
    root = find_project(project)
    pyproject = root / PYPROJECT
    table = _read_table(pyproject)
    names = _resolve_packages(packages, env, table, pyproject)
    for name in names:
        locate_package(root, name)  # a missing package is an error now, not at build time
    return ProjectConfig(
        root=root,
        app_id=_resolve_app_id(app_id, env, table, names, pyproject),
        packages=names,
        include=_globs(table, "include", pyproject),
        exclude=_globs(table, "exclude", pyproject) or (),
        key=_resolve_key(key, env, table, root, pyproject),
        url=_resolve_url(url, env, table, pyproject),
        ca_file=_resolve_ca_file(ca_file, env, table, root, pyproject),
        settings=table,
    )


def find_project(project: str | os.PathLike[str] | None = None, start: Path | None = None) -> Path:
    """The project root: ``project`` itself, or the nearest parent of ``start`` (the cwd) with a pyproject."""
    if project is not None:
        root = Path(project).expanduser().absolute()
        if root.name == PYPROJECT and root.is_file():
            return root.parent
        if not (root / PYPROJECT).is_file():
            raise ConfigError(f"{root} has no {PYPROJECT}; --project names the directory that holds it")
        return root
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        if (directory / PYPROJECT).is_file():
            return directory
    raise ConfigError(f"no {PYPROJECT} in {here} or any parent directory; run from inside your "
                      "project or pass --project DIR")


def locate_package(root: Path, name: str) -> Path:
    """Where a top-level name lives: ``root/name/`` (a package) or ``root/name.py``, else under ``src/``."""
    for base in (root, root / "src"):
        directory, module = base / name, base / f"{name}.py"
        if (directory / "__init__.py").is_file():
            return directory
        if module.is_file():
            return module
        if directory.is_dir():
            raise ConfigError(f"package {name!r} ({directory}) has no __init__.py; habanero ships "
                              "regular packages: add an empty __init__.py")
    raise ConfigError(f"package {name!r} was not found: no "
                      f"{name}/__init__.py or {name}.py in {root} or {root / 'src'}")


# ----------------------------------------------------------------------------- resolution helpers


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _resolve_packages(flag: Any, env: Mapping[str, str], table: Mapping[str, Any],
                      pyproject: Path) -> tuple[str, ...]:
    raw = flag if flag is not None else _split(_env(env, "HABANERO_PACKAGES"))
    where = "--packages" if flag is not None else "HABANERO_PACKAGES"
    if raw is None:
        raw, where = table.get("packages"), f"{pyproject} [tool.habanero] packages"
    if raw is None:
        raise ConfigError(f"{pyproject}: [tool.habanero] has no `packages`; list what to ship, "
                          'e.g. packages = ["myapp"] (or set HABANERO_PACKAGES)')
    if not isinstance(raw, (list, tuple)) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f'{where} must be a list of names, e.g. packages = ["myapp", "app.py"]')
    names = tuple(_package_name(p, where) for p in raw)
    if not names:
        raise ConfigError(f"{where} is empty; list at least one package to ship")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where} lists {', '.join(dupes)} more than once")
    return names


def _package_name(entry: str, where: str) -> str:
    name = entry.strip().removesuffix(".py")
    if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name):
        raise ConfigError(f"{where}: {entry!r} is not a top-level module name (an ASCII identifier "
                          "such as 'myapp', or a file such as 'app.py')")
    if name in RESERVED_NAMES:
        raise ConfigError(f"{where}: {name!r} is reserved (habanero's own code or a module site.py "
                          "runs); the overlay never serves it")
    if name in sys.stdlib_module_names:
        log.warning("%s: %r is a standard library name; the app's overlay will refuse to serve it "
                    "(rename your package)", where, name)
    return name


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _resolve_app_id(flag: str | None, env: Mapping[str, str], table: Mapping[str, Any],
                    packages: tuple[str, ...], pyproject: Path) -> str:
    value = flag or _env(env, "HABANERO_APP_ID") or _typed(table, "app_id", str, pyproject) or packages[0]
    if not valid_app_id(value):
        raise ConfigError(f"app_id {value!r} is not an app id: {APP_ID_RULE}")
    return value


def _resolve_key(flag: Any, env: Mapping[str, str], table: Mapping[str, Any], root: Path,
                 pyproject: Path) -> Path | None:
    chosen = _resolve_path(flag, env, "HABANERO_KEY", table, "key", root, pyproject)
    if chosen:
        return chosen
    for default in (root / PROJECT_KEY, HOME_KEY.expanduser()):
        if default.is_file():
            return default
    return None


def _resolve_url(flag: str | None, env: Mapping[str, str], table: Mapping[str, Any],
                 pyproject: Path) -> str | None:
    return (flag or _env(env, "HABANERO_URL") or _env(env, "HABANERO_CHANNEL")
            or _typed(table, "channel", str, pyproject) or _typed(table, "url", str, pyproject))


def _resolve_ca_file(flag: Any, env: Mapping[str, str], table: Mapping[str, Any], root: Path,
                     pyproject: Path) -> Path | None:
    return _resolve_path(flag, env, "HABANERO_CA_FILE", table, "ca_file", root, pyproject)


def _resolve_path(flag: Any, env: Mapping[str, str], variable: str, table: Mapping[str, Any], name: str,
                  root: Path, pyproject: Path) -> Path | None:
    """A path setting: flag and environment relative to the cwd, pyproject relative to the project."""
    chosen = flag or _env(env, variable)
    if chosen:
        return Path(chosen).expanduser().absolute()
    configured = _typed(table, name, str, pyproject)
    return root / Path(configured).expanduser() if configured else None  # absolute stays absolute


def _typed(table: Mapping[str, Any], name: str, kind: type, pyproject: Path) -> Any:
    value = table.get(name)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{pyproject}: [tool.habanero] {name} must be a {kind.__name__}, "
                          f"not {type(value).__name__}")
    return value


def _globs(table: Mapping[str, Any], name: str, pyproject: Path) -> tuple[str, ...] | None:
    value = table.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{pyproject}: [tool.habanero] {name} must be a list of glob patterns, '
                          f'e.g. {name} = ["*.html", "myapp/static/**"]')
    return tuple(value)


def _read_table(pyproject: Path) -> dict[str, Any]:
    import tomllib

    try:
        with pyproject.open("rb") as fh:
            document = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{pyproject} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {pyproject}: {exc.strerror}") from None
    table = document.get("tool", {}).get("habanero") if isinstance(document.get("tool"), dict) else None
    if table is None:
        raise ConfigError(f'{pyproject} has no [tool.habanero] table; add one that lists what to '
                          'ship: [tool.habanero] packages = ["myapp"]')
    if not isinstance(table, dict):
        raise ConfigError(f"{pyproject}: tool.habanero must be a table")
    for name in sorted(set(table) - KNOWN_SETTINGS):
        close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(KNOWN_SETTINGS))}"
        log.warning("%s: ignoring unknown [tool.habanero] setting %r (%s)", pyproject, name, hint)
    return table

"""What a command talks to: the app's URL and id, the signing key, and the project when there is one.

A push needs the project (it builds from it). ``status``, ``history`` and ``rollback`` do not: an
operator on a server has no checkout, so outside any project they take everything from flags and
the environment (``URL`` or ``HABANERO_URL``, ``--app-id`` or ``HABANERO_APP_ID``, ``--key`` or
``HABANERO_KEY`` or ``~/.ssh/id_ed25519``, ``--ca-file`` or ``HABANERO_CA_FILE``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from overlay.bundle import APP_ID_RULE, valid_app_id
from overlay.errors import ConfigError

from .client import Remote
from .config import HOME_KEY, ProjectConfig, find_project, load_config

if TYPE_CHECKING:
    from .channel import ChannelRemote

__all__ = ["Target", "open_remote", "project_config", "resolve"]


@dataclass(frozen=True)
class Target:
    """One running app as a command sees it."""

    url: str
    app_id: str
    key: Path | None
    ca_file: Path | None
    config: ProjectConfig | None  # None: run outside any project

    @property
    def root(self) -> str | None:
        """The project root, onto which the app's paths are mapped in tracebacks (None: no project)."""
        return str(self.config.root) if self.config is not None else None

    def require_key(self) -> Path:
        if self.config is not None:
            return self.config.require_key()
        if self.key is None:
            raise ConfigError(f"no signing key: pass --key or set HABANERO_KEY ({HOME_KEY} does not exist); "
                              "control requests are signed with a key the app trusts")
        return self.key


def project_config(args: argparse.Namespace, *, url: str | None = None) -> ProjectConfig:
    """The project's settings with this command line's flags on top."""
    packages = getattr(args, "packages", None)
    return load_config(
        getattr(args, "project", None),
        app_id=getattr(args, "app_id", None),
        packages=[p.strip() for p in packages.split(",") if p.strip()] if packages else None,
        key=getattr(args, "key", None),
        url=url,
        ca_file=getattr(args, "ca_file", None),
    )


def resolve(args: argparse.Namespace, *, need_project: bool) -> Target:
    """Where the command goes, or a ConfigError that says what is missing."""
    url_flag = getattr(args, "url", None) or None  # an app's http(s):// URL or a fleet's redis:// channel
    if need_project or getattr(args, "project", None) is not None or _in_a_project():
        config = project_config(args, url=url_flag)
        url = url_flag or config.url
        if not url:
            raise ConfigError("no URL: pass it (habanero-pack push http://127.0.0.1:8765), set HABANERO_URL, "
                              "or `url` in [tool.habanero]")
        return Target(url, config.app_id, config.key, config.ca_file, config)
    return _without_project(args, url_flag)


def _in_a_project() -> bool:
    try:
        find_project()
    except ConfigError:
        return False
    return True


def _without_project(args: argparse.Namespace, url: str | None) -> Target:
    url = url or _env("HABANERO_URL") or _env("HABANERO_CHANNEL")
    app_id = getattr(args, "app_id", None) or _env("HABANERO_APP_ID")
    missing = [what for what, value in (("the app's URL (argument or HABANERO_URL)", url),
                                        ("its app id (--app-id or HABANERO_APP_ID)", app_id)) if not value]
    if missing:
        raise ConfigError(f"no pyproject.toml here or above, so give {' and '.join(missing)}; a signing key "
                          "comes from --key, HABANERO_KEY or ~/.ssh/id_ed25519")
    assert url is not None and app_id is not None
    if not valid_app_id(app_id):
        raise ConfigError(f"app_id {app_id!r} is not an app id: {APP_ID_RULE}")
    key = getattr(args, "key", None) or _env("HABANERO_KEY")
    home = HOME_KEY.expanduser()
    ca = getattr(args, "ca_file", None) or _env("HABANERO_CA_FILE")
    return Target(url, app_id, Path(key).expanduser().absolute() if key else (home if home.is_file() else None),
                  Path(ca).expanduser().absolute() if ca else None, None)


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def open_remote(target: Target, *, signed: bool = True) -> Remote | ChannelRemote:
    """A client for the app's endpoint (or its fleet's channel), signing control requests with the
    target's key."""
    from overlay.channel import is_channel_url
    from overlay.keys import load_signing_key  # cryptography: only once a command talks to an app

    key = load_signing_key(target.require_key()) if signed else None
    if is_channel_url(target.url):
        from .channel import ChannelRemote  # asyncio and the redis client: only for a fleet

        return ChannelRemote(target.url, app_id=target.app_id, key=key)
    return Remote(target.url, app_id=target.app_id, key=key,
                  ca_file=str(target.ca_file) if target.ca_file is not None else None)

"""Flask's templates and static files, after a push: the pushed version's own.

Jinja caches compiled templates, so a push that changes data files empties the cache: the next
request renders the pushed template, with or without ``TEMPLATES_AUTO_RELOAD``. Templates and static
files are found from each app's and blueprint's ``root_path``, worked out from ``__file__`` at
start-up: one that lies in a package directory that moved (a process's first push serves the app
from habanero's source tree) is re-pointed there, with the app's ``config.root_path`` and the cached
Jinja loader.
"""

from __future__ import annotations

import os

from flask.sansio.scaffold import Scaffold

from overlay.integrations._flask_apps import known_apps
from overlay.integrations.hooks import Push

__all__ = ["templates_and_roots"]


def templates_and_roots(push: Push) -> None:
    """Serve the pushed templates and static files: re-point roots that moved, empty Jinja's cache."""
    apps = list(known_apps(push))
    scaffolds: list[Scaffold] = list(apps)
    scaffolds += [bp for app in apps for bp in app.blueprints.values()]
    if push.moved:
        moved = sorted(push.moved.items(), key=lambda kv: -len(kv[0]))
        for obj in dict.fromkeys(scaffolds):
            _repoint(push, obj, moved)
    for app in apps:
        env = app.__dict__.get("jinja_env")
        if env is not None and getattr(env, "cache", None) is not None:
            push.setattr(env, "cache", type(env.cache)(env.cache.capacity))


def _repoint(push: Push, obj: Scaffold, moved: list[tuple[str, str]]) -> None:
    root = obj.root_path
    if not root:
        return
    root = os.path.abspath(root)
    for old, new in moved:
        if root == old or root.startswith(old + os.sep):
            new_root = new + root[len(old):]
            if "jinja_loader" in obj.__dict__:
                push.delitem(obj.__dict__, "jinja_loader")  # a cached_property: made again from the root
            push.setattr(obj, "root_path", new_root)
            config = getattr(obj, "config", None)
            if config is not None and os.path.abspath(getattr(config, "root_path", "") or "/") == root:
                push.setattr(config, "root_path", new_root)
            return

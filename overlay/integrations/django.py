"""Django: the URL resolvers, the template caches, the model registry and the settings, per push.

Loaded when ``django.apps`` is. Each push (and rollback) that re-runs app code:

* **URLconf.** Django caches one resolver per URLconf, and each ``include()`` makes a resolver that
  keeps the ``urlpatterns`` list it first read: a new path 404s until they read again. After every
  push that re-ran, added or removed a module, the caches are cleared and every resolver of the
  URLconf forgets what it read (derived state: an undo does the same again).
* **Templates.** The cached loader keeps compiled templates, and the ``app_directories`` loader
  reads each app's ``AppConfig.path``, worked out from the app's ``__file__`` at start-up. On a
  process's first push the app's package moves from the code on disk to habanero's source tree:
  ``AppConfig.path`` (and template ``DIRS`` below a moved directory) are re-pointed, and every
  engine's caches reset when templates, template tag libraries or paths changed.
* **Models.** Re-running ``class Product(models.Model)`` builds a throwaway class that Django
  registers in the app registry, with its own ``_meta``, fields, managers and exceptions; the
  rebinding then patches the live class in place from it. Here the live class is put back in the
  registry, keeps its own ``_meta``, managers, field descriptors and exceptions (everything the
  throwaway contributed to it or to related models is put back), so ``Product._meta.model is
  Product``, ``isinstance`` holds and queries return the live class; "already registered" is not
  warned. Methods, properties and the display options of ``Meta`` (``ordering``, names) are live.
  A change to the fields or the schema options cannot be live: it is reported, and the live class
  keeps its fields.
* **Settings.** ``django.conf.settings`` copied every value at start-up. A push that changes the
  settings module (``DJANGO_SETTINGS_MODULE``, or any module of its ``settings`` package) reports
  each changed setting as not live; the module holds the new value, which the restart reads.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, cast

from overlay.integrations.hooks import Push, register

__all__: list[str] = []

#: ``Meta`` options a query reads each time: copied onto the live ``_meta``.
LIVE_OPTIONS = ("ordering", "verbose_name", "verbose_name_plural", "get_latest_by")
#: ``Meta`` options the database schema follows: a change needs a migration and a restart.
SCHEMA_OPTIONS = ("db_table", "db_table_comment", "unique_together", "indexes", "constraints", "managed",
                  "proxy", "abstract")
RESTART = "run makemigrations and migrate, then restart the app"


@dataclass(eq=False)
class _Before:
    """What the ``before`` hook saw, for the ``after`` hook of the same push."""

    models: dict[Any, dict[str, Any]] = field(default_factory=dict)  # every model class: its __dict__
    settings: dict[str, Any] | None = None                            # the settings module's values
    settings_module: str | None = None
    quiet: tuple[Any, ...] | None = None                              # the warning filter added


_SEEN: weakref.WeakKeyDictionary[Push, _Before] = weakref.WeakKeyDictionary()


def before(push: Push) -> None:
    """Snapshot the model classes and the settings a re-run may touch; quiet "already registered"."""
    reran = frozenset(push.reran)
    if not reran:
        return
    seen = _SEEN[push] = _Before()
    from django.urls import clear_url_caches  # type: ignore[import-untyped]

    push.on_undo(clear_url_caches)  # whatever a request resolved meanwhile, from half-applied code
    apps = _apps()
    if apps is not None:
        models = [m for app_models in apps.all_models.values() for m in app_models.values()]
        labels = sorted({m._meta.app_label for m in models if m.__module__ in reran})
        if labels:
            # Undone last to first: the warning filter, the registry, the classes, then the caches.
            # What a re-run class statement does to the registry and to related classes is not
            # journaled (Django does it): snapshots cover it.
            seen.models = {m: dict(m.__dict__) for m in models}
            push.on_undo(apps.clear_cache)
            push.on_undo(functools.partial(_restore_classes, seen.models))
            for label in labels:
                push.snapshot(apps.all_models[label])
            seen.quiet = _quiet(labels)
            push.on_undo(functools.partial(_unquiet, seen.quiet))
    name = _settings_module()
    if name is not None and any(_in_settings(m, name) for m in reran):
        seen.settings_module = name
        seen.settings = _setting_values(name)


def after(push: Push) -> None:
    """Put the registry and the live model classes right, report what is not live, clear caches."""
    seen = _SEEN.pop(push, None) or _Before()
    if seen.quiet is not None:
        _unquiet(seen.quiet)
    if seen.models:
        _models(push, seen.models)
    if seen.settings is not None and seen.settings_module is not None:
        _settings(push, seen.settings_module, seen.settings)
    if push.reran or push.added or push.removed:
        _urls(push)
    _templates(push)


# ------------------------------------------------------------------------------------- models


def _apps() -> Any:
    from django.apps import apps  # type: ignore[import-untyped]

    return apps if apps.ready else None


def _quiet(labels: list[str]) -> tuple[Any, ...]:
    """A warning filter for Django's "Model 'app.x' was already registered" about ``labels``."""
    message = rf"Model '(?:{'|'.join(map(re.escape, labels))})\.\w+' was already registered"
    warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)
    return warnings.filters[0]


def _unquiet(entry: tuple[Any, ...]) -> None:
    if entry in warnings.filters:
        cast(list[Any], warnings.filters).remove(entry)
        warnings._filters_mutated()  # type: ignore[attr-defined]  # the cache of filter decisions


def _models(push: Push, saved: dict[Any, dict[str, Any]]) -> None:
    apps = _apps()
    throwaway: dict[Any, Any] = {}  # the class a re-run built -> the live class it was patched into
    for live, before in saved.items():
        old_meta: Any = before.get("_meta")
        new_meta: Any = live.__dict__.get("_meta")
        if old_meta is None or new_meta is None or new_meta is old_meta or not _patched_in_place(live):
            continue  # its class statement did not run again, or the class was replaced (reported)
        throwaway[new_meta.model] = live
        _compare(push, old_meta, new_meta)
    reran, known = frozenset(push.reran), {m._meta.label_lower for m in saved}
    for model in [m for models in apps.all_models.values() for m in models.values()]:
        if model._meta.label_lower not in known and model.__module__ in reran:
            push.not_live(f"{model._meta.label}: a new model", "run makemigrations and migrate to create its table")
    if not throwaway:
        return
    for cls, before in saved.items():
        _put_back(push, cls, before, throwaway)
    for live in throwaway.values():
        label, name = live._meta.app_label, live._meta.model_name
        registered = apps.all_models[label]
        if registered.get(name) is not live:
            push.setitem(registered, name, live)
        config = apps.app_configs.get(label)
        if config is not None and config.models is not registered and config.models.get(name) is not live:
            push.setitem(config.models, name, live)
    apps.clear_cache()  # every model's cached field and relation tables: derived, rebuilt on use


def _restore_classes(saved: dict[Any, dict[str, Any]]) -> None:
    """Undo: every model class's attributes as before the push (the journal put back what the
    rebinding changed; this puts back what Django's class creation set on related classes)."""
    for cls, before in saved.items():
        for name in [n for n in cls.__dict__ if n not in before]:
            delattr(cls, name)
        for name, value in before.items():
            if cls.__dict__.get(name, _MISSING) is not value:
                setattr(cls, name, value)


def _patched_in_place(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    return module is not None and module.__dict__.get(cls.__name__) is cls


def _compare(push: Push, old: Any, new: Any) -> None:
    """Report what of the class statement's change cannot be live; take what can."""
    label = old.label
    was, now = _fields(old), _fields(new)
    if was != now:
        changes = [f"{n} added" for n in now if n not in was] + [f"{n} removed" for n in was if n not in now]
        changes += [f"{n} changed" for n in now if n in was and now[n] != was[n]]
        push.not_live(f"{label}: fields changed ({', '.join(changes)})", RESTART)
    for option in SCHEMA_OPTIONS:
        if not _same(getattr(old, option, None), getattr(new, option, None)):
            push.not_live(f"{label}: Meta.{option} changed", RESTART)
    if _managers(old) != _managers(new):
        push.not_live(f"{label}: managers changed ({', '.join(_managers(new)) or 'none'})", "restart the app")
    for option in LIVE_OPTIONS:
        value = getattr(new, option, None)
        if not _same(getattr(old, option, None), value):
            push.setattr(old, option, value)


def _fields(meta: Any) -> dict[str, Any]:
    """Each local field's name and what it declares (``deconstruct()``, without its name)."""
    out = {}
    for f in (*meta.local_fields, *meta.local_many_to_many):
        _, path, args, kwargs = f.deconstruct()
        out[f.name] = (path, args, kwargs)
    return out


def _managers(meta: Any) -> list[str]:
    return [f"{m.name} ({type(m).__name__})" for m in meta.local_managers]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # an __eq__ that cannot compare: treat as changed
        return False


def _put_back(push: Push, cls: Any, before: dict[str, Any], throwaway: dict[Any, Any]) -> None:
    """Restore what a throwaway class contributed to ``cls`` (its own ``_meta``, descriptors...)."""
    own = cls in throwaway.values()
    for name, value in list(cls.__dict__.items()):
        old = before.get(name, _MISSING)
        if value is old:
            continue
        if (own and name in ("_meta", "DoesNotExist", "MultipleObjectsReturned")) or _owner(value) in throwaway:
            if old is _MISSING:
                push.delattr(cls, name)
            else:
                push.setattr(cls, name, old)


_MISSING = object()


def _owner(value: Any) -> Any:
    """The model class a descriptor, manager or display method Django made belongs to, if any."""
    if isinstance(value, functools.partialmethod):
        value = value.keywords.get("field")
        return getattr(value, "model", None)
    for attr in ("field", "related", "rel", "manager"):  # field descriptors, reverse ones, managers
        inner = value.__dict__.get(attr) if hasattr(value, "__dict__") else None
        if inner is not None:
            if attr in ("related", "rel"):
                return getattr(inner, "related_model", None)
            return getattr(inner, "model", None)
    return None


# ------------------------------------------------------------------------------------ settings


def _settings_module() -> str | None:
    from django.conf import settings  # type: ignore[import-untyped]

    if not settings.configured:
        return None  # not read yet: whatever the push changes is what Django will read
    return getattr(settings._wrapped, "SETTINGS_MODULE", None)


def _in_settings(module: str, settings_module: str) -> bool:
    """The settings module, a module below it, or a sibling in a ``settings`` package."""
    if module == settings_module or module.startswith(settings_module + "."):
        return True
    package = settings_module.rpartition(".")[0]
    return package.rpartition(".")[2] == "settings" and module.startswith(package + ".")


def _setting_values(settings_module: str) -> dict[str, Any]:
    return {name: value for m in _settings_modules(settings_module) for name, value in vars(m).items()
            if name.isupper()}


def _settings_modules(settings_module: str) -> list[Any]:
    return [m for name, m in list(sys.modules.items()) if m is not None and _in_settings(name, settings_module)]


def _settings(push: Push, settings_module: str, before: dict[str, Any]) -> None:
    now = _setting_values(settings_module)
    for name in sorted(set(before) | set(now)):
        if name not in now:
            push.not_live(f"settings.{name} removed", "Django read it at start-up; restart the app to apply it")
        elif name not in before:
            push.not_live(f"settings.{name} added", "Django reads settings at start-up; restart the app to apply it")
        elif not _same(before[name], now[name]):
            push.not_live(f"settings.{name} changed", "Django read it at start-up; restart the app to apply it")


# ------------------------------------------------------------------------------ URLs, templates


def _urls(push: Push) -> None:
    _fresh_urls()
    push.on_undo(_fresh_urls)


def _fresh_urls() -> None:
    """Drop the resolvers Django cached, and what every ``include()`` resolver of the URLconf read
    (its ``urlpatterns`` list, its reverse tables): they are built again from the modules on use."""
    from django.conf import settings
    from django.urls import URLResolver, clear_url_caches, get_resolver

    clear_url_caches()  # the root resolver per URLconf, and the views looked up by name
    if not settings.configured or not getattr(settings, "ROOT_URLCONF", None):
        return
    pending, seen = [get_resolver()], set()
    while pending:  # include() resolvers live in their parent's urlpatterns, not in any cache
        resolver = pending.pop()
        if id(resolver) in seen:
            continue
        seen.add(id(resolver))
        resolver.__dict__.pop("url_patterns", None)
        if isinstance(resolver.urlconf_name, str):
            resolver.__dict__.pop("urlconf_module", None)
        resolver._reverse_dict.clear()
        resolver._namespace_dict.clear()
        resolver._app_dict.clear()
        resolver._callback_strs = set()
        resolver._populated = False
        pending.extend(p for p in resolver.url_patterns if isinstance(p, URLResolver))


def _templates(push: Push) -> None:
    """Re-point moved app paths; reset every engine's caches if templates could have changed."""
    moved = {os.path.abspath(old): new for old, new in push.moved.items()}
    repointed = _repoint_apps(push, moved) if moved else False
    tags = [m for m in (*push.added, *push.reran, *push.removed) if ".templatetags." in f".{m}."]
    if not (repointed or tags or push.files or moved):
        return
    engines = _engines()
    for engine in engines:
        if moved:
            _repoint_dirs(push, engine, moved)
        if tags:
            _reload_libraries(push, engine)
    _reset(engines)
    push.on_undo(lambda: _reset(_engines()))


def _repoint_apps(push: Push, moved: dict[str, str]) -> bool:
    apps = _apps()
    if apps is None:
        return False
    changed = False
    for config in apps.get_app_configs():
        new = _moved_path(config.path, moved)
        if new is not None:
            push.setattr(config, "path", new)
            changed = True
    return changed


def _moved_path(path: str, moved: dict[str, str]) -> str | None:
    path = os.path.abspath(path)
    for old, new in moved.items():
        if path == old or path.startswith(old + os.sep):
            return new + path[len(old):]
    return None


def _engines() -> list[Any]:
    """Every configured template engine's own engine object (Django's ``Engine``, Jinja2's ``Environment``)."""
    from django.template import engines  # type: ignore[import-untyped]

    out = []
    for backend in engines.all():
        inner = getattr(backend, "engine", None) or getattr(backend, "env", None)
        if inner is not None:
            out.append(inner)
    return out


def _repoint_dirs(push: Push, engine: Any, moved: dict[str, str]) -> None:
    dirs = getattr(engine, "dirs", None)
    if isinstance(dirs, list):
        new = [_moved_path(os.fspath(d), moved) or d for d in dirs]
        if new != dirs:
            push.setattr(engine, "dirs", new)


def _reload_libraries(push: Push, engine: Any) -> None:
    """Template tag libraries: a new ``templatetags`` module, or a re-run one's ``register``."""
    if not hasattr(engine, "template_libraries"):
        return
    from django.template.backends.django import get_installed_libraries  # type: ignore[import-untyped]

    gone = frozenset(push.removed)
    libraries = {name: path for name, path in {**get_installed_libraries(), **engine.libraries}.items()
                 if path not in gone}
    push.setattr(engine, "libraries", libraries)
    push.setattr(engine, "template_libraries", engine.get_template_libraries(libraries))


def _reset(engines: list[Any]) -> None:
    """Empty the caches Django keeps of templates and of the directories it reads them from."""
    from django.template.utils import get_app_template_dirs  # type: ignore[import-untyped]

    get_app_template_dirs.cache_clear()
    finders = sys.modules.get("django.contrib.staticfiles.finders")
    if finders is not None:
        finders.get_finder.cache_clear()  # its app directories finder read AppConfig.path
    for engine in engines:
        for loader in getattr(engine, "template_loaders", ()):
            reset = getattr(loader, "reset", None)
            if reset is not None:
                reset()
        cache = getattr(engine, "cache", None)  # Jinja2's compiled templates
        if cache is not None and hasattr(cache, "clear"):
            cache.clear()


register("django", before=before, after=after, when="django.apps")

r"""Where ``install()``'s settings come from: the argument, then ``HABANERO_*``, then a default.

One order for every setting, documented once:

=================  ========================  ============================================
keyword            environment               default
=================  ========================  ============================================
``packages``       ``HABANERO_PACKAGES``     required (comma-separated in the environment)
``trusted_keys``   ``HABANERO_TRUSTED_KEYS`` required (path to an authorized_keys-style file)
``store``          ``HABANERO_STORE``        ``.habanero`` (relative to the working directory)
``listen``         ``HABANERO_LISTEN``       none (``host:port``; the control plane's address)
``channel``        ``HABANERO_CHANNEL``      none (``redis://host:6379/0``: join a fleet through Redis)
``app_id``         ``HABANERO_APP_ID``       the first declared package
``code_cache``     ``HABANERO_CODE_CACHE``   on (compiled code kept in the store)
``tls_cert``       ``HABANERO_TLS_CERT``     none (with ``tls_key``: the standalone server speaks TLS)
``tls_key``        ``HABANERO_TLS_KEY``      none
``public_status``  ``HABANERO_PUBLIC_STATUS`` off (``GET status`` needs a signed request)
``sync``           ``HABANERO_SYNC``         ``background`` (or ``commit``: fsync before a push answers)
``gate``           ``HABANERO_GATE``         on (requests pass the request gate: one version each)
``drain_timeout``  ``HABANERO_DRAIN_TIMEOUT`` 5 s a push waits for the requests in flight
``probation``      ``HABANERO_PROBATION``    0 (off): seconds a push stays on trial before it is permanent
``health``         ``HABANERO_HEALTH``       none (a callable, or a URL path of the app's, e.g. ``/healthz``)
``control_limits`` ``HABANERO_MAX_CONNECTIONS`` 64 connections to the standalone server at once
\                  ``HABANERO_REQUEST_TIMEOUT``  10 s from a request's first byte to its last header
\                  ``HABANERO_IDLE_TIMEOUT``     5 s before an idle connection is closed
(none)             ``HABANERO_RUNTIME_DIR``  where workers meet (see ``overlay.cluster.registry``)
(none)             ``HABANERO_DISABLE``      off; ``1`` makes ``install()`` a no-op
=================  ========================  ============================================

Flags read ``1/true/yes/on`` as on and ``0/false/no/off`` or empty as off, except
``HABANERO_DISABLE``: any value but an explicit off disables, so a typo still rescues. An empty
environment variable counts as unset.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from overlay.bundle import APP_ID_RULE, valid_app_id
from overlay.channel import ChannelURL, parse_url
from overlay.errors import ConfigError
from overlay.keys import TrustedKeys, load_trusted_keys
from overlay.serving.connections import DEFAULT_CONTROL_LIMITS, ControlLimits
from overlay.store import SYNC_MODES

DEFAULT_STORE = ".habanero"
_FALSE = frozenset({"", "0", "false", "no", "off"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]*)):(?P<port>\d{1,5})$")


def env(name: str) -> str | None:
    """The variable's value, stripped; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def _missing(keyword: str, variable: str, what: str) -> ConfigError:
    return ConfigError(f"install() needs {what}: pass {keyword}=... or set {variable}", code="bad_config")


def disabled() -> bool:
    """``HABANERO_DISABLE``: anything but an explicit off value disables, so a typo still rescues."""
    return (os.environ.get("HABANERO_DISABLE", "").strip().lower()) not in _FALSE


def resolve_packages(packages: str | Iterable[str] | None) -> list[str]:
    if packages is None:
        packages = env("HABANERO_PACKAGES")
        if packages is None:
            raise _missing("packages", "HABANERO_PACKAGES", "the top-level packages to serve")
    if isinstance(packages, str):
        return [p.strip() for p in packages.split(",") if p.strip()]
    return list(packages)


def resolve_trusted_keys(trusted_keys: object) -> TrustedKeys:
    if trusted_keys is None:
        trusted_keys = env("HABANERO_TRUSTED_KEYS")
        if trusted_keys is None:
            raise _missing("trusted_keys", "HABANERO_TRUSTED_KEYS",
                           "the keys allowed to deploy (an authorized_keys-style file)")
    return load_trusted_keys(trusted_keys)  # type: ignore[arg-type]


def resolve_store(store: str | os.PathLike[str] | None) -> Path:
    """Absolute, so ``__file__`` and tracebacks stay right after the app changes directory."""
    return Path(os.path.abspath(os.fspath(store or env("HABANERO_STORE") or DEFAULT_STORE)))


def resolve_app_id(app_id: str | None, packages: list[str] | tuple[str, ...]) -> str:
    value = app_id or env("HABANERO_APP_ID") or packages[0]
    if not valid_app_id(value):
        raise ConfigError(f"app_id {value!r} is not an app id: {APP_ID_RULE}", code="bad_config")
    return value


def resolve_listen(listen: str | None) -> str | None:
    """``host:port`` (``[::1]:8765`` for IPv6); validated now, served by the control plane."""
    value = listen if listen is not None else env("HABANERO_LISTEN")
    if value is None:
        return None
    parse_address(value)
    return value.strip()


def resolve_channel(channel: str | None) -> ChannelURL | None:
    """``redis://``, ``rediss://`` or ``redis+sentinel://``; validated now (see ``overlay.channel``)."""
    value = channel if channel is not None else env("HABANERO_CHANNEL")
    return parse_url(value) if value else None


def parse_address(value: object) -> tuple[str, int]:
    """``"127.0.0.1:8765"`` / ``"[::1]:0"`` / ``":8765"`` -> (host, port); the one parser of addresses.

    An empty host means loopback: habanero never listens on every interface unless told so.
    """
    match = _LISTEN.match(value.strip()) if isinstance(value, str) else None
    if match is None or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(f"listen={value!r} is not host:port (e.g. '127.0.0.1:8765' or '[::1]:8765'); "
                          "set it with listen= or HABANERO_LISTEN", code="bad_config")
    return match["v6"] or match["host"] or "127.0.0.1", int(match["port"])


def resolve_sync(sync: str | None) -> str:
    """When a push reaches the disk itself: ``background`` (default) or ``commit``; see ``Store``."""
    value = sync if sync is not None else env("HABANERO_SYNC") or "background"
    if value not in SYNC_MODES:
        raise ConfigError(f"sync={value!r}: expected 'background' (fsync right after the push answers) "
                          "or 'commit' (fsync before it answers); set it with sync= or HABANERO_SYNC",
                          code="bad_config")
    return value


def resolve_flag(value: bool | None, variable: str, default: bool) -> bool:
    if value is not None:
        return bool(value)
    raw = env(variable)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{variable}={raw!r}: expected 1/0, true/false, yes/no or on/off", code="bad_config")


def resolve_seconds(value: float | None, variable: str, default: float, keyword: str, *, zero: bool = False) -> float:
    """A duration in seconds: the argument, else ``variable``, else ``default``; positive (or 0 when
    ``zero`` allows it: off)."""
    raw: object = value if value is not None else env(variable)
    if raw is None:
        return default
    try:
        seconds = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        where = f"{keyword}=" if value is not None else f"{variable}="
        raise ConfigError(f"{where}{raw!r}: expected a {'non-negative' if zero else 'positive'} number of seconds",
                          code="bad_config")
    return seconds


def resolve_control_limits(limits: ControlLimits | None) -> ControlLimits:
    """The standalone server's connection limits: the argument, else each of
    ``HABANERO_MAX_CONNECTIONS``, ``HABANERO_REQUEST_TIMEOUT``, ``HABANERO_IDLE_TIMEOUT``, else its default."""
    if limits is not None:
        return limits
    default = DEFAULT_CONTROL_LIMITS
    try:
        return ControlLimits(max_connections=int(_number("HABANERO_MAX_CONNECTIONS", int, default.max_connections)),
                             request_timeout=_number("HABANERO_REQUEST_TIMEOUT", float, default.request_timeout),
                             idle_timeout=_number("HABANERO_IDLE_TIMEOUT", float, default.idle_timeout))
    except ValueError as exc:
        raise ConfigError(str(exc), code="bad_config") from None


def _number(variable: str, kind: type[float] | type[int], default: float) -> float:
    raw = env(variable)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r}: expected a positive {kind.__name__}") from None
    if value <= 0:
        raise ValueError(f"{variable}={raw!r}: expected a positive {kind.__name__}")
    return value

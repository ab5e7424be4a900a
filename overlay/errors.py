"""Every refusal habanero makes, as one small hierarchy.

Each error carries a stable, machine-readable ``code`` (what the HTTP endpoint and the CLI print and
what scripts match on), an ``http_status`` for the control plane, and a message that names the
problem and the fix. Nothing else in habanero raises a bare exception across its public surface.
Every code habanero raises is in this tree (``tests/test_errors.py`` holds it to that):

    HabaneroError                   habanero_error (never raised itself: always one of the leaves)
    ├── BundleRejected              bad_bundle (the bytes are not an acceptable bundle; nothing was
    │   │                           stored or run)
    │   ├── UnknownFormat           unknown_format
    │   ├── BadSignature            bad_signature, unsigned
    │   ├── UntrustedKey            unknown_key
    │   ├── WrongApp                wrong_app
    │   ├── StaleVersion            stale_version, version_jump_too_large, stale_parent (built on
    │   │                           another version than the active one)
    │   ├── TooLarge                bundle_too_large, manifest_too_large, too_many_entries,
    │   │                           entry_too_large, decompressed_too_large
    │   ├── CorruptPayload          payload_hash_mismatch, entry_hash_mismatch, trailing_data,
    │   │                           truncated, bad_payload
    │   ├── BadManifest             bad_manifest
    │   ├── BadEntryName            bad_entry_name
    │   ├── ParentMissing           parent_missing (a delta whose parent the app lacks)
    │   ├── CompileFailed           syntax_error (nothing ran)
    │   └── ModuleInUse             removed_module_in_use (a removed module others still import)
    ├── KeyProblem                  bad_key, bad_trusted_keys, wrong_passphrase, unsupported_key,
    │                               missing_dependency
    ├── StoreError                  store_error, store_locked, store_format, store_app_mismatch,
    │                               bad_highest, unknown_version, store_unsafe (a symbolic link or
    │                               a foreign file where habanero writes: it writes nothing)
    ├── ConfigError                 bad_config, already_installed, disabled, listen_failed
    ├── ActivationFailed            activation_failed (the push was undone; the old code still serves)
    ├── ControlRejected             unsigned_request, unknown_key, wrong_app, bad_request_signature,
    │                               stale_request, replayed_request, bad_request, version_mismatch,
    │                               nothing_to_roll_back, fleet_aborted, fleet_reverted (the fleet
    │                               did not go ahead), payload_missing, channel_unreachable (a
    │                               channel's member: Redis lost the bundle, or cannot be reached)
    ├── DeployInProgress            deploy_in_progress, drain_timeout (requests still ran at the drain
    │                               deadline; nothing changed)
    ├── WorkerRefused               worker_refused, worker_lost (another process of the app refused
    │                               or stopped; every process kept or went back to the old version)
    ├── UploadFailed                upload_incomplete, upload_timeout, too_many_uploads
    ├── OverlayImportError          import_failed, not_in_bundle (also an ImportError)
    └── RemoteError                 unreachable, not_habanero, bad_url, tls_error, bad_ca_file,
                                    not_confirmed, channel_unreachable, no_members, no_key (raised
                                    by the deploying side; or the code the app answered with)

The endpoint also answers ``internal_error`` (500, a bug: the app's log has the traceback) and
``http_error`` (a request outside the routes) without raising any of these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

__all__ = [
    "HabaneroError",
    "BundleRejected",
    "UnknownFormat",
    "BadSignature",
    "UntrustedKey",
    "WrongApp",
    "StaleVersion",
    "TooLarge",
    "CorruptPayload",
    "BadManifest",
    "BadEntryName",
    "ParentMissing",
    "CompileFailed",
    "KeyProblem",
    "StoreError",
    "ConfigError",
    "ActivationFailed",
    "ControlRejected",
    "DeployInProgress",
    "ModuleInUse",
    "OverlayImportError",
    "RemoteError",
    "UploadFailed",
    "WorkerRefused",
]


# Codes whose class's default status would misstate what happened over HTTP: a rollback that finds
# another version active, or nothing to go back to, conflicts with the server's state (not a failed
# authentication); a version the store lacks is a 404, not a server fault.
_STATUS_BY_CODE = {"version_mismatch": 409, "nothing_to_roll_back": 409, "bad_request": 400,
                   "unknown_version": 404, "wrong_app": 409, "upload_timeout": 408, "store_locked": 503,
                   "too_many_uploads": 503, "disabled": 409, "worker_lost": 503,
                   "drain_timeout": 503}


class HabaneroError(Exception):
    """Base of every habanero refusal: a ``code``, an HTTP status and an actionable message."""

    default_code: ClassVar[str] = "habanero_error"
    default_status: ClassVar[int] = 400
    #: Set on a refusal of bytes that no trusted key vouched for (see :func:`unverified`): it is
    #: counted, never recorded in the history nor shown as the app's last failure.
    unverified: bool = False

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details

    @property
    def http_status(self) -> int:
        """The status the endpoint answers with: by code where the code says more than the class."""
        return _STATUS_BY_CODE.get(self.code, self.default_status)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the endpoint answers with: ``{"code": ..., "message": ...}`` plus details."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        out.update({k: v for k, v in self.details.items() if _jsonable(v)})
        return out

    def __str__(self) -> str:
        return self.message


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


class BundleRejected(HabaneroError):
    default_code = "bad_bundle"
    default_status = 422


class UnknownFormat(BundleRejected):
    default_code = "unknown_format"


class BadSignature(BundleRejected):
    default_code = "bad_signature"
    default_status = 401


class UntrustedKey(BundleRejected):
    default_code = "unknown_key"
    default_status = 401


class WrongApp(BundleRejected):
    default_code = "wrong_app"
    default_status = 409


class StaleVersion(BundleRejected):
    default_code = "stale_version"
    default_status = 409


class TooLarge(BundleRejected):
    default_code = "bundle_too_large"
    default_status = 413


class CorruptPayload(BundleRejected):
    default_code = "payload_hash_mismatch"


class BadManifest(BundleRejected):
    default_code = "bad_manifest"


class BadEntryName(BundleRejected):
    default_code = "bad_entry_name"


class ParentMissing(BundleRejected):
    default_code = "parent_missing"
    default_status = 409


class CompileFailed(BundleRejected):
    """A module in the bundle does not compile; nothing ran. Carries file, line and message."""

    default_code = "syntax_error"


class ModuleInUse(BundleRejected):
    """The bundle removes a module that modules it keeps still import; nothing ran."""

    default_code = "removed_module_in_use"
    default_status = 409


class KeyProblem(HabaneroError):
    default_code = "bad_key"


class StoreError(HabaneroError):
    default_code = "store_error"
    default_status = 500


class ConfigError(HabaneroError):
    default_code = "bad_config"


class ActivationFailed(HabaneroError):
    """Running the new code failed; every change was undone and the old version still serves.

    ``remote_traceback`` holds the formatted traceback from the app process.
    """

    default_code = "activation_failed"
    default_status = 500

    def __init__(self, message: str, *, remote_traceback: str = "", **details: Any) -> None:
        super().__init__(message, remote_traceback=remote_traceback, **details)
        self.remote_traceback = remote_traceback


class ControlRejected(HabaneroError):
    default_code = "bad_request_signature"
    default_status = 401


class DeployInProgress(HabaneroError):
    default_code = "deploy_in_progress"
    default_status = 409


class WorkerRefused(HabaneroError):
    """Another process of the app refused the deploy, or stopped during it; ``workers`` (a detail)
    says which and why. Every process still runs, or went back to, the old version."""

    default_code = "worker_refused"
    default_status = 409


class OverlayImportError(HabaneroError, ImportError):
    """Raised during an import; also an ``ImportError`` (with ``name=``) so ``except ImportError`` works."""

    default_code = "import_failed"

    def __init__(self, message: str, *, name: str, path: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code, module=name)
        self.name = name
        self.path = path


class UploadFailed(HabaneroError):
    """The push's body did not arrive whole, in time, or there was no room to receive it."""

    default_code = "upload_incomplete"
    default_status = 400


class RemoteError(HabaneroError):
    """The app refused, failed, or could not be reached: raised on the deploying side.

    ``code`` is the app's own code when it answered (``stale_version``, ``activation_failed``...),
    or one of the client's (``unreachable``, ``not_habanero``...). ``status`` is the HTTP status or
    0; ``remote_traceback`` is the app's traceback of a failed activation; ``body`` the whole answer.
    """

    default_code = "unreachable"
    default_status = 502

    def __init__(self, message: str, *, code: str, status: int = 0, remote_traceback: str = "",
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.remote_traceback = remote_traceback
        self.body = body or {}


@contextlib.contextmanager
def unverified() -> Iterator[None]:
    """Mark each refusal raised in the block as one of a request no trusted signature holds for
    (yet): anyone who can reach the port can cause it, so it must cost the app next to nothing."""
    try:
        yield
    except HabaneroError as exc:
        exc.unverified = True
        raise


def printable(text: object, limit: int | None = 200, keep: str = "") -> str:
    """``text`` safe for a log, a message or a terminal: control and format characters escaped
    (``\\x1b``, ``\\u202e``: an escape sequence from the network must not drive a terminal, a
    bidirectional override must not reorder what the reader sees), cut to ``limit`` characters.
    Characters in ``keep`` stay as they are (the CLI keeps its own newlines and tabs)."""
    value = str(text)
    if limit is not None and len(value) > limit:
        value = value[:limit] + "..."
    if value.isprintable() or (keep and all(c.isprintable() or c in keep for c in value)):
        return value
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in value)


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

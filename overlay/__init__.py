"""habanero's run-time side: serve an app's packages from signed bundles and upgrade them live.

    import overlay
    ov = overlay.install(packages=["myapp"], trusted_keys="deploy/trusted_keys")

``install`` and the :class:`Overlay` handle it returns, the errors (one tree, drawn in
``overlay.errors``), and the version. Everything else is reached through the handle.
"""

from typing import TYPE_CHECKING

from overlay.errors import (
    ActivationFailed,
    BadEntryName,
    BadManifest,
    BadSignature,
    BundleRejected,
    CompileFailed,
    ConfigError,
    ControlRejected,
    CorruptPayload,
    DeployInProgress,
    HabaneroError,
    KeyProblem,
    ModuleInUse,
    OverlayImportError,
    ParentMissing,
    RemoteError,
    StaleVersion,
    StoreError,
    TooLarge,
    UnknownFormat,
    UntrustedKey,
    UploadFailed,
    WorkerRefused,
    WrongApp,
)

__version__ = "0.1.0"

__all__ = [
    "install", "Overlay", "__version__",
    "HabaneroError", "BundleRejected", "UnknownFormat", "BadSignature", "UntrustedKey", "WrongApp",
    "StaleVersion", "TooLarge", "CorruptPayload", "BadManifest", "BadEntryName", "ParentMissing",
    "CompileFailed", "ModuleInUse", "KeyProblem", "StoreError", "ConfigError", "ActivationFailed",
    "ControlRejected", "DeployInProgress", "WorkerRefused", "UploadFailed", "OverlayImportError", "RemoteError",
]

if TYPE_CHECKING:
    from overlay.runtime.handle import Overlay
    from overlay.runtime.install import install


def __getattr__(name: str) -> object:
    # install() pulls in the store, finder and code cache; habanero-pack imports this package for
    # its errors and version only, and its start-up time is on the save-to-live path.
    if name in ("install", "Overlay"):
        from overlay.runtime import install as _install

        return getattr(_install, name)
    raise AttributeError(f"module 'overlay' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

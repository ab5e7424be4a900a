"""habanero's run-time side: serve an app's packages from signed bundles and upgrade them live."""

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
    ParentMissing,
    StaleVersion,
    StoreError,
    TooLarge,
    UnknownFormat,
    UntrustedKey,
    WrongApp,
)

__version__ = "0.1.0"

__all__ = [
    "install", "Overlay", "HabaneroError", "BundleRejected", "UnknownFormat", "BadSignature",
    "UntrustedKey", "WrongApp", "StaleVersion", "TooLarge", "CorruptPayload", "BadManifest",
    "BadEntryName", "ParentMissing", "CompileFailed", "KeyProblem", "StoreError", "ConfigError",
    "ActivationFailed", "ControlRejected", "DeployInProgress", "__version__",
]

if TYPE_CHECKING:
    from overlay.runtime.install import Overlay, install


def __getattr__(name: str) -> object:
    # install() pulls in the store, finder and code cache; habanero-pack imports this package for
    # its errors and version only, and its start-up time is on the save-to-live path.
    if name in ("install", "Overlay"):
        from overlay.runtime import install as _install

        return getattr(_install, name)
    raise AttributeError(f"module 'overlay' has no attribute {name!r}")

"""habanero's run-time side: serve an app's packages from signed bundles and upgrade them live."""

from .errors import (
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

"""Checking Ed25519 signatures with the OpenSSL the interpreter has loaded already.

Every process of an app checks every push, so this runs in every worker; importing
``cryptography`` there costs each worker about 6.5 MiB (its Rust extension with its own OpenSSL),
for one function. ``hashlib`` has loaded the system's ``libcrypto`` already, and its
``EVP_DigestVerify`` is the same RFC 8032 check ``cryptography`` calls: it is reached here through
``ctypes`` (0.4 MiB), found in ``/proc/self/maps``. Where that is not possible (no OpenSSL 1.1.1 or
later behind ``hashlib``, no ``/proc``), ``cryptography`` checks instead. Signing is not done here:
it happens on the developer's side, which imports ``cryptography`` anyway.

A signature counts as valid only when OpenSSL says exactly 1; any error is a refusal.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from collections.abc import Callable

__all__ = ["backend", "verify"]

_NID_ED25519 = 1087  # EVP_PKEY_ED25519
_KEY, _SIGNATURE = 32, 64

Verifier = Callable[[bytes, bytes, bytes], bool]


class _Libcrypto:
    """``EVP_DigestVerify`` through ``ctypes``; one ``EVP_PKEY`` kept per public key."""

    name = "libcrypto"

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.EVP_PKEY_new_raw_public_key.restype = ctypes.c_void_p
        lib.EVP_PKEY_new_raw_public_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.EVP_MD_CTX_new.restype = ctypes.c_void_p
        lib.EVP_MD_CTX_new.argtypes = []
        lib.EVP_MD_CTX_free.restype = None
        lib.EVP_MD_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_DigestVerifyInit.restype = ctypes.c_int
        lib.EVP_DigestVerifyInit.argtypes = [ctypes.c_void_p] * 5
        lib.EVP_DigestVerify.restype = ctypes.c_int
        lib.EVP_DigestVerify.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                         ctypes.c_size_t]
        self._lib = lib
        self._keys: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def _pkey(self, public: bytes) -> int | None:
        pkey = self._keys.get(public)
        if pkey is None:
            with self._lock:
                made = self._lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, public, len(public))
                if not made:
                    return None
                pkey = self._keys.setdefault(public, made)  # the few trusted keys live as long as we do
        return pkey

    def __call__(self, public: bytes, signature: bytes, message: bytes) -> bool:
        pkey = self._pkey(public)
        if pkey is None:
            return False
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            return False
        try:
            if lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) != 1:
                return False
            return bool(lib.EVP_DigestVerify(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            lib.EVP_MD_CTX_free(ctx)


def _cryptography(public: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _libcrypto_path() -> str | None:
    """The ``libcrypto`` ``hashlib`` loaded, from this process's memory map."""
    hashlib.sha256()  # hashlib's OpenSSL backend is loaded by now, when there is one
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libcrypto.so" in path and path.startswith("/"):
                    return path
    except OSError:
        return None
    return None


def _choose() -> Verifier:
    path = _libcrypto_path()
    if path is not None:
        try:
            chosen = _Libcrypto(path)
            if _self_test(chosen):
                return chosen
        except (OSError, AttributeError):  # no such library, or one older than OpenSSL 1.1.1
            pass
    return _cryptography


# RFC 8032, section 7.1, test 2: one byte, and a signature of it.
_TEST_KEY = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_TEST_MESSAGE = bytes.fromhex("72")
_TEST_SIGNATURE = bytes.fromhex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
                                "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def _self_test(verifier: Verifier) -> bool:
    """The verifier accepts RFC 8032's own signature and refuses it for another message."""
    return verifier(_TEST_KEY, _TEST_SIGNATURE, _TEST_MESSAGE) and not verifier(_TEST_KEY, _TEST_SIGNATURE, b"s")


_chosen: Verifier | None = None


def backend() -> Verifier:
    """The verifier this process uses (chosen at the first check)."""
    global _chosen  # noqa: PLW0603  (chosen once per process, lazily: a cache, not state)
    if _chosen is None:
        _chosen = _choose()
    return _chosen


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by the raw 32-byte ``public`` key."""
    if len(public) != _KEY or len(signature) != _SIGNATURE:
        return False
    return backend()(public, signature, message)

"""Signature checks through the interpreter's own OpenSSL, held equal to cryptography's."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import ed25519


def test_this_machine_checks_with_the_libcrypto_hashlib_loaded():
    assert getattr(ed25519.backend(), "name", None) == "libcrypto"


@settings(max_examples=150, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300), flip=st.integers(0, 8 * 64 - 1),
       other=st.binary(max_size=300))
def test_the_fast_check_agrees_with_cryptography_on_good_and_altered_signatures(seed, message, flip, other):
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes_raw()
    good = private.sign(message)
    bad = bytearray(good)
    bad[flip // 8] ^= 1 << (flip % 8)
    for signature, text in ((good, message), (bytes(bad), message), (good, other)):
        assert ed25519.backend()(public, signature, text) == ed25519._cryptography(public, signature, text)
    assert ed25519.verify(public, good, message)
    assert not ed25519.verify(public, bytes(bad), message)


def test_malformed_keys_and_signatures_are_refused_not_raised():
    key = Ed25519PrivateKey.generate()
    public, signature = key.public_key().public_bytes_raw(), key.sign(b"m")
    assert ed25519.verify(public, signature, b"m")
    assert not ed25519.verify(public[:31], signature, b"m")
    assert not ed25519.verify(public, signature[:63], b"m")
    assert not ed25519.verify(b"\xff" * 32, signature, b"m")  # not a point on the curve


def test_the_rfc_8032_vector_is_what_the_self_test_checks():
    assert ed25519._self_test(ed25519.backend()) and ed25519._self_test(ed25519._cryptography)


@pytest.mark.slow
def test_an_app_checking_pushes_loads_no_cryptography():
    code = ("import sys; from overlay.keys import TrustedKeys, parse_public_key_line; import overlay.bundle; "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"

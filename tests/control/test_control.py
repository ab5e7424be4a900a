"""Signed control requests: what verifies, and every way a request is refused."""

from __future__ import annotations

import pytest

from overlay.control import H_APP, RequestVerifier, sign_request
from overlay.errors import ControlRejected

NOW = 1_800_000_000


def _verify(verifier, headers, *, method="POST", path="/_habanero/rollback", body=b'{"to":null}', now=NOW):
    return verifier.verify(method, path, headers, body, now=now)


def _code(verifier, headers, **kw) -> str:
    with pytest.raises(ControlRejected) as info:
        _verify(verifier, headers, **kw)
    return info.value.code


def test_signed_request_verifies_and_names_its_key(signing_key, trusted):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "app", b'{"to":null}', now=NOW)
    assert _verify(RequestVerifier(trusted, "app"), headers) == signing_key.key_id


def test_replayed_nonce_is_refused(signing_key, trusted):
    verifier = RequestVerifier(trusted, "app")
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "app", b'{"to":null}', now=NOW)
    _verify(verifier, headers)
    assert _code(verifier, headers) == "replayed_request"


@pytest.mark.parametrize("skew", [-301, 301])
def test_request_outside_the_clock_window_is_refused(signing_key, trusted, skew):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "app", b'{"to":null}', now=NOW + skew)
    assert _code(RequestVerifier(trusted, "app"), headers) == "stale_request"


def test_request_within_the_window_is_accepted(signing_key, trusted):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "app", b'{"to":null}', now=NOW - 299)
    assert _verify(RequestVerifier(trusted, "app"), headers) == signing_key.key_id


@pytest.mark.parametrize("change", [{"method": "GET"}, {"path": "/_habanero/push"}, {"body": b'{"to":1}'}])
def test_signature_binds_method_path_and_body(signing_key, trusted, change):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "app", b'{"to":null}', now=NOW)
    assert _code(RequestVerifier(trusted, "app"), headers, **change) == "bad_request_signature"


def test_signature_binds_the_app_id(signing_key, trusted):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "other-app", b'{"to":null}', now=NOW)
    del headers[H_APP]  # the clear-text app id only explains a refusal: without it, the signature refuses
    assert _code(RequestVerifier(trusted, "app"), headers) == "bad_request_signature"


def test_a_request_signed_for_another_app_says_which_two_app_ids_differ(signing_key, trusted):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "other-app", b'{"to":null}', now=NOW)
    with pytest.raises(ControlRejected) as caught:
        _verify(RequestVerifier(trusted, "app"), headers)
    assert caught.value.code == "wrong_app" and caught.value.http_status == 409
    assert "the signer's app id 'other-app' differs from the app's, 'app'" in caught.value.message


def test_a_claimed_app_id_cannot_make_a_forged_request_pass(signing_key, trusted):
    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "other-app", b'{"to":null}', now=NOW)
    headers[H_APP] = "app"  # lying about it only moves the refusal to the signature
    assert _code(RequestVerifier(trusted, "app"), headers) == "bad_request_signature"


def test_unknown_key_and_unsigned_requests_are_refused(other_key, trusted):
    headers = sign_request(other_key, "POST", "/_habanero/rollback", "app", b'{"to":null}', now=NOW)
    verifier = RequestVerifier(trusted, "app")
    assert _code(verifier, headers) == "unknown_key"
    assert _code(verifier, {}) == "unsigned_request"


def test_bundle_signature_is_not_a_control_signature(signing_key, trusted):
    from overlay.format.wire import SIGNATURE_DOMAIN
    from overlay.control import control_message
    import base64

    headers = sign_request(signing_key, "POST", "/_habanero/rollback", "app", b"", now=NOW)
    message = control_message("POST", "/_habanero/rollback", "app", headers["X-Habanero-Timestamp"],
                              headers["X-Habanero-Nonce"], b"")
    forged = signing_key.sign(SIGNATURE_DOMAIN + message[len(b"habanero-control-v1\0"):])
    headers["X-Habanero-Signature"] = base64.b64encode(forged).decode()
    assert _code(RequestVerifier(trusted, "app"), headers, body=b"") == "bad_request_signature"

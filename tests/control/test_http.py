"""The control plane at the HTTP layer, against a real app process on loopback.

The app is the aiohttp example's package served by a small variant of its ``serve.py`` with a 32 KiB
body cap and a short upload deadline (``support.e2e.LIMITED_APP``). Requests are written by hand (raw
sockets where the framing matters), because these tests are about what a hostile or broken client
can do; ``e2e/test_habanero_pack.py`` drives the same endpoint with the real ``habanero-pack``. After every
refusal the app must still serve the version it served before.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from support.e2e import (
    AppProcess,
    DevProject,
    Launcher,
    Upload,
    get_json,
    hello_bundle,
    make_project,
    push_bytes,
    request,
    rollback_request,
    signed,
    start_limited_app,
    status_of,
    tampered,
    unsigned,
)

from overlay.keys import generate_signing_key

pytestmark = pytest.mark.slow  # real app processes

CAP = 32 << 10


def assert_serves(app: AppProcess, project: DevProject, greeting: str, version: int | None) -> None:
    """The app answers with ``greeting`` and reports ``version`` as active."""
    assert get_json(app.url)["message"] == greeting
    assert status_of(project, app.url)["version"] == version


@pytest.fixture(scope="module")
def served(module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> tuple[AppProcess, DevProject]:
    """One app serving v1 ("Hello, v1"), shared by the refusal tests that must not change it."""
    project = make_project(tmp_path_factory.mktemp("served"))
    app = start_limited_app(module_launcher, project, max_bytes=CAP)
    reply = push_bytes(app.url, hello_bundle(project.key, 1, greeting="Hello, v1"))
    assert reply.status == 200, reply
    return app, project


@pytest.fixture
def fresh(launcher: Launcher, tmp_path) -> tuple[AppProcess, DevProject]:
    """An app of its own, nothing pushed yet, for tests that change what it serves."""
    project = make_project(tmp_path)
    return start_limited_app(launcher, project, max_bytes=CAP), project


# ------------------------------------------------------------------------------- bundle refusals


def test_an_unsigned_bundle_is_refused_with_401(served) -> None:
    app, project = served
    reply = push_bytes(app.url, unsigned(hello_bundle(project.key, 2, greeting="unsigned")))
    assert (reply.status, reply.error()["code"]) == (401, "unsigned")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_bundle_signed_by_an_unknown_key_is_refused_with_401_unknown_key(served, tmp_path) -> None:
    app, project = served
    stranger = generate_signing_key(tmp_path / "stranger")
    reply = push_bytes(app.url, hello_bundle(stranger, 2, greeting="stranger"))
    assert (reply.status, reply.error()["code"]) == (401, "unknown_key")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_tampered_bundle_is_refused_with_401_bad_signature(served) -> None:
    app, project = served
    reply = push_bytes(app.url, tampered(hello_bundle(project.key, 2, greeting="tampered")))
    assert (reply.status, reply.error()["code"]) == (401, "bad_signature")
    assert_serves(app, project, "Hello, v1", 1)


def test_another_apps_bundle_is_refused_with_409_wrong_app(served) -> None:
    app, project = served
    reply = push_bytes(app.url, hello_bundle(project.key, 2, greeting="other app", app_id="shop"))
    assert (reply.status, reply.error()["code"]) == (409, "wrong_app")
    assert_serves(app, project, "Hello, v1", 1)


def test_bytes_that_are_not_a_bundle_are_refused_with_422(served) -> None:
    app, project = served
    reply = push_bytes(app.url, b"<html>not a bundle</html>", key_ids=[project.key.key_id])
    assert (reply.status, reply.error()["code"]) == (422, "unknown_format")
    assert_serves(app, project, "Hello, v1", 1)


def test_an_import_time_exception_answers_500_with_the_remote_traceback_and_is_undone(served) -> None:
    app, project = served
    bundle = hello_bundle(project.key, 2, greeting="boom", extra='\nraise RuntimeError("boom at import")\n')
    reply = push_bytes(app.url, bundle)
    error = reply.error()
    assert (reply.status, error["code"]) == (500, "activation_failed")
    assert "RuntimeError: boom at import" in error["remote_traceback"]
    assert "version 1 is still serving" in error["message"]
    assert_serves(app, project, "Hello, v1", 1)


def test_a_replayed_older_bundle_is_refused_with_409_stale_version(fresh) -> None:
    app, project = fresh
    v1 = hello_bundle(project.key, 1, greeting="Hello, v1")
    assert push_bytes(app.url, v1).status == 200
    assert push_bytes(app.url, hello_bundle(project.key, 2, greeting="Hello, v2")).status == 200
    reply = push_bytes(app.url, v1)
    assert (reply.status, reply.error()["code"]) == (409, "stale_version")
    assert_serves(app, project, "Hello, v2", 2)


# ------------------------------------------------------------------------------ bounded uploads


def test_a_chunked_body_over_the_cap_is_cut_off_with_413_while_it_streams(served) -> None:
    app, project = served
    upload = Upload(app.url, key_id=project.key.key_id)  # chunked, no Content-Length: only the cap stops it
    try:
        for _ in range(2 * CAP // 4096):
            upload.send_chunk(b"\0" * 4096)
        # The body never ends (no last chunk): a server that waited for the end before counting would
        # answer 408 at its deadline instead.
        reply = upload.response()
    finally:
        upload.close()
    assert (reply.status, reply.error()["code"]) == (413, "bundle_too_large")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_declared_length_over_the_cap_is_refused_before_reading(served) -> None:
    app, project = served
    upload = Upload(app.url, key_id=project.key.key_id, length=CAP + 1)
    try:
        reply = upload.response()  # nothing of the body was sent
    finally:
        upload.close()
    assert (reply.status, reply.error()["code"]) == (413, "bundle_too_large")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_stalled_upload_is_cut_off_at_its_deadline_and_delays_no_other_push(launcher, tmp_path) -> None:
    project = make_project(tmp_path)
    app = start_limited_app(launcher, project, upload_timeout=1.5)  # long enough to push meanwhile
    bundle = hello_bundle(project.key, 1, greeting="after the stall")
    stalled = Upload(app.url, key_id=project.key.key_id, length=len(bundle), expect_continue=True)
    try:
        stalled.wait_continue()
        stalled.send(bundle[:100])  # ...and nothing more
        while_stalled = push_bytes(app.url, bundle)  # uploads are read outside the deploy lock
        assert while_stalled.status == 200, while_stalled
        reply = stalled.response()  # the server gives up on it at the deadline
    finally:
        stalled.close()
    assert (reply.status, reply.error()["code"]) == (408, "upload_timeout")
    assert_serves(app, project, "after the stall", 1)


# ------------------------------------------------------------------------------- one at a time


def test_a_push_that_arrives_during_another_upload_goes_first_and_the_slow_one_is_stale(fresh) -> None:
    app, project = fresh
    first = hello_bundle(project.key, 1, greeting="first")
    upload = Upload(app.url, key_id=project.key.key_id, length=len(first), expect_continue=True)
    try:
        upload.wait_continue()  # the first push is uploading from here
        second = push_bytes(app.url, hello_bundle(project.key, 1, greeting="second"))
        upload.send(first)
        reply = upload.response()
    finally:
        upload.close()
    assert second.status == 200, second
    assert (reply.status, reply.error()["code"]) == (409, "stale_version")
    assert_serves(app, project, "second", 1)


def test_two_simultaneous_pushes_of_one_version_leave_exactly_one_live(fresh) -> None:
    app, project = fresh
    bundles = [hello_bundle(project.key, 1, greeting=g) for g in ("left", "right")]
    uploads = [Upload(app.url, key_id=project.key.key_id, length=len(b)) for b in bundles]
    replies = {}

    def finish(i: int) -> None:
        uploads[i].send(bundles[i][-1:])
        replies[i] = uploads[i].response()

    try:
        for upload, bundle in zip(uploads, bundles):
            upload.send(bundle[:-1])  # both in flight at once...
        threads = [threading.Thread(target=finish, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for upload in uploads:
            upload.close()
    statuses = sorted(r.status for r in replies.values())
    assert statuses == [200, 409], replies
    loser = next(r for r in replies.values() if r.status == 409)
    assert loser.error()["code"] in ("deploy_in_progress", "stale_version")
    winner = next(i for i, r in replies.items() if r.status == 200)
    assert_serves(app, project, ("left", "right")[winner], 1)


# ---------------------------------------------------------------------------- control requests


def test_status_from_an_unauthenticated_client_is_refused_with_401(served) -> None:
    app, project = served
    for path in ("/_habanero/status", "/_habanero/history"):
        reply = request(app.url, path)
        assert (reply.status, reply.error()["code"]) == (401, "unsigned_request")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_control_request_signed_by_an_unknown_key_is_refused(served, tmp_path) -> None:
    app, project = served
    stranger = generate_signing_key(tmp_path / "stranger")
    reply = request(app.url, "/_habanero/status", headers=signed(project, "GET", "/_habanero/status",
                                                                 key=stranger))
    assert (reply.status, reply.error()["code"]) == (401, "unknown_key")


def test_public_status_answers_unauthenticated_clients_but_history_stays_signed(launcher, tmp_path) -> None:
    project = make_project(tmp_path)
    app = start_limited_app(launcher, project, HABANERO_PUBLIC_STATUS="1")
    reply = request(app.url, "/_habanero/status")
    assert reply.status == 200 and reply.json()["app_id"] == "hello"
    assert request(app.url, "/_habanero/history").status == 401


def test_a_replayed_rollback_request_is_refused_replayed_request(fresh) -> None:
    app, project = fresh
    for version in (1, 2):
        assert push_bytes(app.url, hello_bundle(project.key, version, greeting=f"Hello, v{version}")).status == 200
    body = json.dumps({"to": None, "expect": 2}).encode()
    headers = signed(project, "POST", "/_habanero/rollback", body)
    assert rollback_request(project, app.url, body=body, headers=headers).status == 200
    replay = rollback_request(project, app.url, body=body, headers=headers)
    assert (replay.status, replay.error()["code"]) == (401, "replayed_request")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_rollback_expecting_another_version_is_refused_with_409_version_mismatch(served) -> None:
    app, project = served
    reply = rollback_request(project, app.url, expect=7)
    assert (reply.status, reply.error()["code"]) == (409, "version_mismatch")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_rollback_signed_outside_the_time_window_is_refused_stale_request(served) -> None:
    app, project = served
    body = json.dumps({"to": None, "expect": 1}).encode()
    old = signed(project, "POST", "/_habanero/rollback", body, now=time.time() - 600)
    reply = rollback_request(project, app.url, body=body, headers=old)
    assert (reply.status, reply.error()["code"]) == (401, "stale_request")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_rollback_signature_does_not_cover_another_body(served) -> None:
    app, project = served
    headers = signed(project, "POST", "/_habanero/rollback", json.dumps({"to": None, "expect": 1}).encode())
    reply = rollback_request(project, app.url, body=json.dumps({"to": 1, "expect": 1}).encode(), headers=headers)
    assert (reply.status, reply.error()["code"]) == (401, "bad_request_signature")


def test_a_rollback_with_nothing_to_roll_back_to_is_refused_with_409(served) -> None:
    app, project = served
    reply = rollback_request(project, app.url, expect=1)
    assert (reply.status, reply.error()["code"]) == (409, "nothing_to_roll_back")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_rollback_to_a_version_the_store_lacks_is_refused_with_404(served) -> None:
    app, project = served
    reply = rollback_request(project, app.url, to=9, expect=1)
    assert (reply.status, reply.error()["code"]) == (404, "unknown_version")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_malformed_rollback_body_is_refused_with_400(served) -> None:
    app, project = served
    reply = rollback_request(project, app.url, body=b'{"to": "yesterday"}')
    assert (reply.status, reply.error()["code"]) == (400, "bad_request")
    assert_serves(app, project, "Hello, v1", 1)


def test_a_rollback_that_names_no_expected_version_is_refused_so_it_cannot_be_replayed_per_worker(served) -> None:
    app, project = served
    reply = rollback_request(project, app.url, body=b'{"to": null}')
    assert (reply.status, reply.error()["code"]) == (400, "bad_request")
    assert "expects to replace" in reply.error()["message"]
    assert_serves(app, project, "Hello, v1", 1)


# ------------------------------------------------------------------------------------ the shape


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/_habanero/nowhere", 404),
    ("GET", "/_habanero/push", 405),
    ("DELETE", "/_habanero/status", 405),
])
def test_errors_under_the_prefix_are_json_never_html(served, method: str, path: str, status: int) -> None:
    app, _ = served
    reply = request(app.url, path, method=method)
    assert reply.status == status
    reply.error()


def test_uploads_beyond_one_peers_share_of_the_cap_get_503_and_memory_stays_bounded(launcher, tmp_path) -> None:
    from overlay.serving.guard import MAX_UPLOADS, UPLOADS_PER_PEER

    assert UPLOADS_PER_PEER < MAX_UPLOADS  # one address never holds every slot
    project = make_project(tmp_path)
    # A deadline no loaded machine reaches while the test holds its uploads open: one timing out
    # would free a slot for the push that must be turned away. Closing them frees the slots.
    app = start_limited_app(launcher, project, upload_timeout=30)
    bundle = hello_bundle(project.key, 1, greeting="after the crowd")
    stalled = [Upload(app.url, key_id=project.key.key_id, length=len(bundle), expect_continue=True)
               for _ in range(UPLOADS_PER_PEER)]
    try:
        for upload in stalled:
            upload.wait_continue()
            upload.send(bundle[:10])
        crowded = push_bytes(app.url, bundle)
        assert (crowded.status, crowded.error()["code"]) == (503, "too_many_uploads")
    finally:
        for upload in stalled:
            upload.close()
    assert push_bytes(app.url, bundle).status == 200
    assert_serves(app, project, "after the crowd", 1)

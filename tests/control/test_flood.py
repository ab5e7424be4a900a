"""What anyone who can reach the control port can do to the app: a real app process on loopback.

The app serves its own traffic on a small threaded HTTP server and habanero's routes on the
standalone server (``listen=``), with 256 file descriptors (``RLIMIT_NOFILE``), so that a flood of
connections that took one descriptor each would take the app's own server down within the test.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
from support.e2e import (
    CONTROL,
    EXAMPLES,
    TIMEOUT,
    AppProcess,
    DevProject,
    Launcher,
    Reply,
    hello_bundle,
    make_project,
    push_bytes,
    request,
    signed,
    status_of,
)

from overlay.control import H_KEY
from overlay.keys import generate_signing_key

pytestmark = pytest.mark.slow  # real app processes

FD_LIMIT = 256

STANDALONE_APP = f'''\
import logging, os, resource, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
sys.path.insert(0, os.environ["E2E_APP_DIR"])
import overlay

ov = overlay.install(packages=["hello"], listen="127.0.0.1:0", upload_timeout=30)


class Own(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Own)
print(f"habanero on http://127.0.0.1:{{ov.address[1]}}", flush=True)
print(f"listening on http://127.0.0.1:{{server.server_address[1]}}", flush=True)
server.serve_forever()
'''


def start_standalone_app(launcher: Launcher, project: DevProject, **env: str) -> AppProcess:
    script = project.root.parent / "standalone_app.py"
    script.write_text(STANDALONE_APP, encoding="utf-8")
    app = launcher.start([sys.executable, str(script)], cwd=project.root.parent, name="standalone app",
                         env=project.app_env(E2E_APP_DIR=str(EXAMPLES / "aiohttp_app"), **env))
    app.control = app.wait_for(CONTROL)["url"]
    return app


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)


def closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends), or ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return limit
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def history_size(project: DevProject) -> int:
    path = project.store / "history.jsonl"
    return path.stat().st_size if path.exists() else 0


def anonymous_head(url: str, key_id: str, length: int) -> bytes:
    return (f"POST /_habanero/push HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\nContent-Length: {length}\r\n"
            f"Content-Type: application/octet-stream\r\n{H_KEY}: {key_id}\r\n\r\n").encode("latin-1")


def answer(sock: socket.socket) -> Reply:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())


# ------------------------------------------------------------------------------------ connections


def test_a_thousand_idle_connections_to_the_control_port_leave_the_app_serving_and_a_push_going_through(
        launcher, tmp_path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1500:
        pytest.skip("this test opens 1,100 sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1500) if hard == resource.RLIM_INFINITY
                                                else max(soft, min(hard, 4096)), hard))
    project = make_project(tmp_path)
    app = start_standalone_app(launcher, project)  # default limits: 64 connections, 5 s idle, 10 s to headers
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):  # each sends nothing; more than the app has descriptors
            idle.append(connect(app.control))
        assert request(app.url).status == 200  # the app's own server still has descriptors
        reply = push_bytes(app.control, hello_bundle(project.key, 1, greeting="through the crowd"))
        assert reply.status == 200, reply
    finally:
        for sock in idle:
            sock.close()
    assert status_of(project, app.control)["version"] == 1
    assert "Too many open files" not in app.output  # not even for a moment


@pytest.fixture(scope="module")
def strict(module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> tuple[AppProcess, DevProject]:
    """An app whose control server gives a request 1 s to its headers and an idle connection 1 s."""
    project = make_project(tmp_path_factory.mktemp("strict"))
    return start_standalone_app(module_launcher, project, HABANERO_REQUEST_TIMEOUT="1",
                                HABANERO_IDLE_TIMEOUT="1"), project


def test_a_request_whose_headers_trickle_in_is_cut_off_at_the_request_deadline(strict) -> None:
    app, _ = strict
    sock = connect(app.control)
    try:
        sock.sendall(b"GET /_habanero/status HTTP/1.1\r\n")
        started = time.monotonic()
        cut = None
        for _ in range(40):  # one header byte every 0.1 s: the connection is never idle
            time.sleep(0.1)
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - started
                break
            sock.settimeout(0.001)
            try:
                if sock.recv(1) == b"":
                    cut = time.monotonic() - started
                    break
            except TimeoutError:
                pass
    finally:
        sock.close()
    assert cut is not None and 0.7 < cut < 10, cut  # the 1 s deadline, not the test's own timeout


def test_a_connection_that_sends_nothing_and_an_idle_keep_alive_one_are_closed_after_the_idle_timeout(
        strict) -> None:
    app, project = strict
    silent = connect(app.control)
    try:
        assert 0.5 < closed_after(silent, 15) < 15  # closed by the server (the 1 s idle timeout)
    finally:
        silent.close()
    conn = http.client.HTTPConnection(*urlsplit(app.control).netloc.split(":"), timeout=TIMEOUT)
    try:
        conn.request("GET", "/_habanero/status", headers=signed(project, "GET", "/_habanero/status"))
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and not response.will_close  # kept alive...
        assert conn.sock is not None
        assert 0.5 < closed_after(conn.sock, 15) < 15  # ...until it idles for a second
    finally:
        conn.close()


# ------------------------------------------------------------------------------------- anonymous


def test_anonymous_uploads_are_refused_from_their_headers_and_never_hold_a_slot_a_trusted_push_needs(
        launcher, tmp_path) -> None:
    project = make_project(tmp_path)
    app = start_standalone_app(launcher, project)
    stranger = generate_signing_key(tmp_path / "stranger")
    stalled: list[socket.socket] = []
    try:
        for _ in range(20):  # each claims an unknown key, announces 8 MiB and sends none of it
            sock = connect(app.control)
            head = anonymous_head(app.control, stranger.key_id, 8 << 20)
            sock.sendall(head)
            reply = answer(sock)  # refused from the headers alone: not one byte of the body was sent
            assert (reply.status, reply.error()["code"]) == (401, "unknown_key"), reply
            assert len(head) < 400
            stalled.append(sock)
        reply = push_bytes(app.control, hello_bundle(project.key, 1, greeting="trusted"))
        assert reply.status == 200, reply
    finally:
        for sock in stalled:
            sock.close()


def test_an_anonymous_flood_writes_no_history_changes_no_status_and_is_logged_once(launcher, tmp_path) -> None:
    project = make_project(tmp_path)
    app = start_standalone_app(launcher, project)
    assert push_bytes(app.control, hello_bundle(project.key, 1, greeting="v1")).status == 200
    before = status_of(project, app.control)
    size = history_size(project)
    stranger = generate_signing_key(tmp_path / "stranger")
    forged = hello_bundle(stranger, 2, greeting="forged")
    refused: list[int] = []

    def flood() -> None:
        for _ in range(40):
            # Signed by nobody it trusts; or claiming a trusted key, with a body its signature fails.
            for data, claims in ((forged, None), (forged, [project.key.key_id])):
                reply = push_bytes(app.control, data, key_ids=claims)
                refused.append(reply.status)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    during = push_bytes(app.control, hello_bundle(project.key, 2, greeting="v2"))  # while it floods
    for thread in threads:
        thread.join(TIMEOUT)
    assert during.status == 200, during
    assert len(refused) == 320 and set(refused) == {401}
    after = status_of(project, app.control)
    assert after["last_failure"] == before["last_failure"] is None
    assert after["refused_unverified"] == 320
    assert all(entry["outcome"] == "ok" for entry in after["history"])
    assert history_size(project) > size  # v2's own record, and no other:
    lines = (project.store / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == ["ok", "ok"]
    logged = [line for line in app.output.splitlines() if "unverified request" in line]
    assert len(logged) == 1, logged  # at most one line a minute, however many


def test_escape_sequences_in_a_forged_key_id_never_reach_the_log_history_or_an_answer_raw(
        launcher, tmp_path) -> None:
    project = make_project(tmp_path)
    app = start_standalone_app(launcher, project)
    size = history_size(project)
    evil = "SHA256:\x1b]0;owned\x07\x1b[2J"
    bundle = hello_bundle(project.key, 1)
    header_len = 20 + int.from_bytes(bundle[12:16], "big")
    kid = project.key.key_id.encode()
    forged_kid = evil.encode()
    # The signature block names the forged id (the length byte before it fixed up), the header the real one.
    forged = bytearray(bundle)
    at = forged.index(kid, header_len)
    forged[at - 1 : at + len(kid)] = bytes([len(forged_kid)]) + forged_kid
    forged[16:20] = (int.from_bytes(bundle[16:20], "big") + len(forged_kid) - len(kid)).to_bytes(4, "big")
    replies = [push_bytes(app.control, bytes(forged), key_ids=[project.key.key_id]),
               push_bytes(app.control, bundle, key_ids=[evil.replace("\x07", "")]),
               request(app.control, "/_habanero/status", headers={H_KEY: evil.replace("\x07", ""),
                                                                  "X-Habanero-Timestamp": "1",
                                                                  "X-Habanero-Nonce": "n",
                                                                  "X-Habanero-Signature": "AA=="})]
    assert (replies[0].status, replies[0].error()["code"]) == (401, "bad_signature")  # read, then refused
    for reply in replies:  # the others refused by the claim check, or by the HTTP parser itself
        assert reply.status in (400, 401), reply
        assert b"\x1b" not in reply.body and b"\\u001b" not in reply.body, reply.body
    status = status_of(project, app.control)
    assert status["last_failure"] is None and status["refused_unverified"] >= 1
    assert "\x1b" not in app.output
    assert history_size(project) == size

"""``packer.client``'s HTTP/1.1 on a bare socket, against canned answers from a loopback server.

The end-to-end tests talk to real aiohttp apps; these cover the framings and failures aiohttp never
produces: chunked bodies, bodies that end when the connection does, keep-alive connections the
server dropped, oversized answers and peers that do not speak HTTP at all; and a push's answers an
honest app never gives (an OK that names another active bundle, an older app's OK that names none).
Last, how the app's paths in a refusal are mapped onto the developer's files.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator

import pytest

from packer.client import MAX_RESPONSE_BYTES, Remote, RemoteError, map_traceback

Answer = Callable[[int], bytes]  # request number (from 0) -> raw bytes to send back


def _json_answer(data: dict, *, close: bool = False) -> bytes:
    body = json.dumps(data).encode()
    connection = "Connection: close\r\n" if close else ""
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        connection.encode(), len(body), body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(answer, close_after=None)`` -> URL of a server that answers each request with ``answer(n)``."""
    servers: list[_Server] = []

    def start(answer: Answer, *, close_after: int | None = None) -> str:
        count = [0]

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                served = 0
                while close_after is None or served < close_after:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        byte = self.rfile.read(1)
                        if not byte:
                            return
                        head += byte
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    self.rfile.read(length)
                    self.wfile.write(answer(count[0]))
                    self.wfile.flush()
                    count[0] += 1
                    served += 1

        server = _Server(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_a_chunked_answer_is_read_whole(serve) -> None:
    body = json.dumps({"version": 3, "pad": "x" * 5000}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000))
    url = serve(lambda n: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    with Remote(url, app_id="app") as remote:
        assert remote.status()["version"] == 3
        assert remote.status()["version"] == 3  # the same connection, still in step


def test_an_answer_without_a_length_ends_with_the_connection(serve) -> None:
    url = serve(lambda n: b'HTTP/1.0 200 OK\r\n\r\n{"version": %d}' % n, close_after=1)
    with Remote(url, app_id="app") as remote:
        assert remote.status()["version"] == 0
        assert remote.status()["version"] == 1  # a new connection, because that one could not be reused


def test_a_keep_alive_connection_the_server_dropped_is_retried_once(serve) -> None:
    url = serve(lambda n: _json_answer({"version": n}), close_after=1)
    with Remote(url, app_id="app") as remote:
        assert remote.status()["version"] == 0
        assert remote.status()["version"] == 1


def test_a_peer_that_does_not_speak_http_is_not_habanero(serve) -> None:
    url = serve(lambda n: b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    with Remote(url, app_id="app") as remote, pytest.raises(RemoteError) as info:
        remote.status()
    assert info.value.code == "not_habanero"
    assert "answered, but not in HTTP" in info.value.message


def test_an_oversized_answer_is_not_habanero(serve) -> None:
    url = serve(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_RESPONSE_BYTES + 1))
    with Remote(url, app_id="app") as remote, pytest.raises(RemoteError) as info:
        remote.status()
    assert info.value.code == "not_habanero"


def test_a_refusal_carries_the_servers_code_and_status(serve) -> None:
    body = json.dumps({"code": "stale_version", "message": "push version 8 or later"}).encode()
    url = serve(lambda n: b"HTTP/1.1 409 Conflict\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with Remote(url, app_id="app") as remote, pytest.raises(RemoteError) as info:
        remote.push(b"bundle")
    assert (info.value.code, info.value.status, info.value.message) == ("stale_version", 409,
                                                                       "push version 8 or later")


def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Remote(f"http://127.0.0.1:{port}", app_id="app") as remote, pytest.raises(RemoteError) as info:
        remote.status()
    assert info.value.code == "unreachable" and "connection refused" in info.value.message


# ------------------------------------------------------------------------ a push's confirmation

STORE = "/srv/shop/.habanero-store"
OTHER = {"version": 4, "digest": "ab" * 32}


@pytest.fixture
def shop(tmp_path, signing_key):
    """A project to push, and its config with the test key."""
    from support.project import make_project
    from packer.config import load_config

    return load_config(make_project(tmp_path / "proj"), key=str(signing_key.path))


def _push_answer(**extra) -> bytes:
    return _json_answer({"ok": True, "report": {"version": 5, "timings_ms": {}}, "server_ms": 1.0, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("read_back", [True, False], ids=["one-off: status read back", "watch: the answer"])
def test_an_ok_that_names_another_active_bundle_is_not_confirmed(serve, shop, signing_key, read_back) -> None:
    from packer.deploy import push_once

    seen: list[int] = []
    status = _json_answer({"highest": 4, "active": OTHER, "store": STORE})
    answers = [status, _push_answer(active=OTHER), status]
    url = serve(lambda n: seen.append(n) or answers[n])
    with Remote(url, app_id="shop", key=signing_key) as remote, pytest.raises(RemoteError) as info:
        push_once(remote, shop, read_back=read_back)
    assert info.value.code == "not_confirmed"
    assert "answered OK to version 5 but its active bundle is 4 (abababababab)" in info.value.message
    # status, push, and the status read back; in watch mode the push's own answer is the confirmation
    assert seen == ([0, 1, 2] if read_back else [0, 1])


@pytest.mark.slow
def test_an_older_app_whose_ok_names_no_active_bundle_is_checked_against_its_status(serve, shop, signing_key) -> None:
    from packer.deploy import push_once

    seen: list[int] = []
    answers = [_json_answer({"highest": 4, "active": None}), _push_answer(),
               _json_answer({"highest": 5, "active": OTHER})]
    url = serve(lambda n: seen.append(n) or answers[n])
    with Remote(url, app_id="shop", key=signing_key) as remote, pytest.raises(RemoteError) as info:
        push_once(remote, shop)
    assert info.value.code == "not_confirmed"
    assert seen == [0, 1, 2]


# ------------------------------------------------------------------------ paths in a refusal


def test_a_path_in_the_apps_source_tree_is_mapped_once_its_store_is_known(serve) -> None:
    url = serve(lambda n: _json_answer({"highest": 1, "active": None, "store": STORE}))
    text = f'File "{STORE}/tree/shop/cart.py", line 3, in <module>'
    assert map_traceback(text, "/home/me/shop") == text  # "tree" alone proves nothing
    with Remote(url, app_id="shop") as remote:
        remote.status()
    assert remote.store == STORE
    assert map_traceback(text, "/home/me/shop/", remote.store) == 'File "/home/me/shop/shop/cart.py", line 3, in <module>'


def test_a_path_in_an_older_apps_per_version_tree_is_mapped_by_its_name() -> None:
    tree = f"{STORE}/trees/0000000007-{'c' * 64}"
    text = f"invalid syntax ({tree}/shop/cart.py, line 3); and File \"{tree}/shop/admin/views.py\""
    assert map_traceback(text, "/home/me/shop") == ('invalid syntax (/home/me/shop/shop/cart.py, line 3); '
                                                   'and File "/home/me/shop/shop/admin/views.py"')


def test_a_tree_directory_outside_the_store_is_left_alone() -> None:
    text = 'File "/venv/lib/python3.11/site-packages/sklearn/tree/_classes.py", line 1'
    assert map_traceback(text, "/home/me/shop", STORE) == text

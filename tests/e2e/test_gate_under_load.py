"""One version per request, proven under load: real servers saturated by clients while 100 pushes land.

Each push changes a caller and its callee together: version K's ``begin()`` returns ``{"tK": K}``
and its ``finish`` takes only the keyword ``tK``, so a request that ran an old ``begin`` with a new
``finish`` (or the reverse) raises ``TypeError`` and answers 500; each answer also names the
version of both halves. Under a threaded WSGI server (gunicorn ``gthread``), an ASGI server
(uvicorn) and aiohttp (``app=``), every request must succeed on one version. The same load without
the gate (``HABANERO_GATE=0``) mixes versions: that is what the gate prevents.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.e2e import LISTENING, TIMEOUT, Launcher, base_env, push_bytes
from support.workers import GUNICORN_READY, UVICORN_READY

from overlay.bundle import build_bundle
from overlay.keys import SigningKey, generate_signing_key

pytestmark = pytest.mark.slow  # real servers under load, 100 pushes each

PUSHES = 100
CLIENTS = 8

LOGIC = '''\
import time

def begin():
    return {{"t{k}": {k}}}

def finish(*, t{k}):
    return {k}

def whole():  # a caller and its callee, changed together by every push
    kw = begin()
    time.sleep(0.0005)
    return list(kw.values())[0], finish(**kw)
'''

WSGI_APP = '''\
import overlay
ov = overlay.install(packages=["mixapp"])
from mixapp import logic

def app(environ, start_response):
    started, finished = logic.whole()
    body = f"{started} {finished}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

application = ov.wsgi(app)
'''

ASGI_APP = '''\
import asyncio
import overlay
ov = overlay.install(packages=["mixapp"])
from mixapp import logic

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    kw = logic.begin()
    await asyncio.sleep(0.0005)
    body = f"{list(kw.values())[0]} {logic.finish(**kw)}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

app = ov.asgi(app)
'''

AIOHTTP_APP = '''\
import asyncio
from aiohttp import web
import overlay
app = web.Application()
ov = overlay.install(packages=["mixapp"], app=app)
from mixapp import logic

async def index(request):
    kw = logic.begin()
    await asyncio.sleep(0.0005)
    return web.Response(text=f"{list(kw.values())[0]} {logic.finish(**kw)}")

app.router.add_get("/", index)

async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


def bundle(key: SigningKey, k: int) -> bytes:
    files = {"mixapp": ("package", b""), "mixapp.logic": ("module", LOGIC.format(k=k).encode())}
    return build_bundle(files, app_id="mixapp", version=k, signers=[key])


class Load:
    """``CLIENTS`` keep-alive clients asking ``/`` as fast as the server answers, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = urlsplit(url)
        self.ok = 0
        self.failed: list[str] = []
        self.mixed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)

    def _client(self) -> None:
        conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=TIMEOUT)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as exc:
                body, status = repr(exc), 0
                conn.close()
                conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=TIMEOUT)
            else:
                status = response.status
            with self._lock:
                if status != 200:
                    self.failed.append(f"{status}: {body[:200]}")
                elif len(set(body.split())) != 1:
                    self.mixed.append(body)
                else:
                    self.ok += 1
        conn.close()


def push_all(url: str, key: SigningKey, pushes: int, load: Load) -> None:
    for k in range(2, pushes + 2):
        before = load.ok
        reply = push_bytes(url, bundle(key, k))
        assert reply.status == 200, (k, reply.body[:500])
        while load.ok == before:  # requests keep flowing between pushes: every push lands under load
            time.sleep(0.001)


def start(launcher: Launcher, tmp_path: Path, kind: str, **env: str) -> tuple[str, SigningKey]:
    key = generate_signing_key(tmp_path / "key")
    (tmp_path / "trusted_keys").write_text(key.public.line() + "\n", encoding="utf-8")
    (tmp_path / "mixapp").mkdir()
    (tmp_path / "mixapp" / "__init__.py").write_text("")
    (tmp_path / "mixapp" / "logic.py").write_text(LOGIC.format(k=1))
    (tmp_path / "home").mkdir()
    script = {"wsgi": WSGI_APP, "asgi": ASGI_APP, "aiohttp": AIOHTTP_APP}[kind]
    (tmp_path / f"serve_{kind}.py").write_text(script, encoding="utf-8")
    environment = base_env(tmp_path / "home", HABANERO_STORE=str(tmp_path / "store"),
                           HABANERO_TRUSTED_KEYS=str(tmp_path / "trusted_keys"), **env)
    environment["PYTHONPATH"] = f"{tmp_path}:{environment['PYTHONPATH']}"
    if kind == "wsgi":
        argv = [sys.executable, "-m", "gunicorn", "serve_wsgi:application", "-k", "gthread", "--threads",
                str(CLIENTS), "-w", "1", "-b", "127.0.0.1:0"]
        ready = GUNICORN_READY
    elif kind == "asgi":
        argv = [sys.executable, "-m", "uvicorn", "serve_asgi:app", "--port", "0", "--host", "127.0.0.1",
                "--no-access-log"]
        ready = UVICORN_READY
    else:
        argv = [sys.executable, str(tmp_path / "serve_aiohttp.py")]
        ready = LISTENING
    app = launcher.start(argv, env=environment, cwd=tmp_path, name=kind, ready=ready)
    return app.url, key


@pytest.mark.parametrize("kind", ["wsgi", "asgi", "aiohttp"])
def test_a_hundred_pushes_under_saturating_load_fail_no_request_and_mix_no_versions(
        launcher: Launcher, tmp_path: Path, kind: str) -> None:
    url, key = start(launcher, tmp_path, kind)
    with Load(url) as load:
        push_all(url, key, PUSHES, load)
    assert load.failed == [] and load.mixed == [], (len(load.failed), load.failed[:5], load.mixed[:5])
    assert load.ok > 5 * PUSHES  # saturating: requests ran all along, between and during every push
    final = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=TIMEOUT)
    final.request("GET", "/")
    assert final.getresponse().read() == f"{PUSHES + 1} {PUSHES + 1}".encode()
    final.close()


def test_without_the_gate_the_same_load_mixes_caller_and_callee(launcher: Launcher, tmp_path: Path) -> None:
    url, key = start(launcher, tmp_path, "wsgi", HABANERO_GATE="0")
    with Load(url) as load:
        push_all(url, key, 40, load)
    assert load.failed, "the load should have caught requests running two versions without the gate"
    assert any("500" in failure for failure in load.failed)

"""Real processes on loopback for the end-to-end tests: app processes, the real CLI, raw HTTP.

Every app process starts in its own session and is registered *before* we wait for its ready line,
so teardown kills its whole process group and reaps it even when the start itself failed. A thread
drains its output (an app that logs a lot never blocks on a full pipe) and the pipe is closed at the
end. Apps bind port 0 and print the port they got: no guessed ports, no sleeps, no races for a port.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from support import ROOT
from support.project import HABANERO_PACK

from overlay.bundle import build_bundle, claimed_key_ids
from overlay.control import H_APP, H_KEY, sign_request
from overlay.keys import SigningKey, generate_signing_key

EXAMPLES = ROOT / "examples"
PACK = [str(HABANERO_PACK)] if HABANERO_PACK.exists() else [sys.executable, "-m", "packer"]
TIMEOUT = 30.0        # every subprocess run and every socket operation
READY_TIMEOUT = 20.0  # from exec to the app's "listening on" line
LISTENING = re.compile(r"listening on (?P<url>https?://[\w.\-]+:\d+)")
CONTROL = re.compile(r"habanero on (?P<url>https?://[\w.\-]+:\d+)")


# ------------------------------------------------------------------------------------ processes


class AppProcess:
    """One running app: what it printed so far, and a ``stop()`` that always kills and reaps."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, name: str) -> None:
        self.name = name
        self.url = ""      # the app's own URL, from its ready line
        self.control = ""  # where habanero-pack talks to it (the app's URL when mounted)
        self._lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """The first output line matching ``pattern``; fail with the output on exit or deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if found := pattern.search(line):
                        return found
                if self._eof:
                    raise AssertionError(f"{self.name} exited before printing {pattern.pattern!r}:\n"
                                         f"{''.join(self._lines)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name} printed no {pattern.pattern!r} within {timeout:g} s:\n"
                                         f"{''.join(self._lines)}")
                self._changed.wait(left)

    def stop(self) -> None:
        """Kill the whole process group, reap the leader, close the pipe. Safe to call twice."""
        if self.proc.returncode is None:  # not reaped yet, so the group id is still ours
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL cannot end
                pass
        self._reader.join(TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Launcher:
    """Starts app processes and stops every one of them, in reverse order, at teardown."""

    def __init__(self) -> None:
        self.started: list[AppProcess] = []

    def start(self, argv: list[str], *, env: dict[str, str], cwd: Path, name: str,
              ready: re.Pattern[str] = LISTENING) -> AppProcess:
        app = AppProcess(argv, env=env, cwd=cwd, name=name)
        self.started.append(app)  # registered before the wait: a failed start is still stopped
        app.url = app.wait_for(ready)["url"]
        app.control = app.url
        return app

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


# ---------------------------------------------------------------------------- projects and apps


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A child's environment: no HABANERO_* leaking in, an empty HOME, no bytecode in the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HABANERO_") or k == "HABANERO_RUNTIME_DIR"}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


@dataclass
class DevProject:
    """A developer's copy of an example, with a fresh key the app trusts and the app's own store."""

    example: str
    root: Path          # what habanero-pack builds: a copy of examples/<example>
    home: Path
    key: SigningKey
    trusted_keys: Path  # the app side's trust file
    store: Path         # the app side's store

    @property
    def app_id(self) -> str:
        import tomllib

        with (EXAMPLES / self.example / "pyproject.toml").open("rb") as fh:
            return str(tomllib.load(fh)["tool"]["habanero"]["app_id"])

    def pack(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real ``habanero-pack`` in the project, with a timeout."""
        return subprocess.run([*PACK, *args], cwd=self.root, env=env or base_env(self.home), text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)

    def push(self, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``habanero-pack --push URL``, which must succeed."""
        proc = self.pack("--push", url, *args)
        assert proc.returncode == 0, f"push failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc

    def edit(self, rel: str, old: str, new: str) -> None:
        path = self.root / rel
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} is not in {rel}"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    def append(self, rel: str, text: str) -> None:
        with (self.root / rel).open("a", encoding="utf-8") as fh:
            fh.write(text)

    def app_env(self, **extra: str) -> dict[str, str]:
        return base_env(self.home, HABANERO_STORE=str(self.store), HABANERO_TRUSTED_KEYS=str(self.trusted_keys),
                        PORT="0", **extra)


def make_project(base: Path, example: str = "aiohttp_app") -> DevProject:
    """Copy ``examples/<example>`` to ``base/dev`` and give it a key that ``base/trusted_keys`` trusts."""
    root = base / "dev"
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLES / example, root,
                    ignore=shutil.ignore_patterns("__pycache__", ".habanero", "trusted_keys"))
    key = generate_signing_key(root / ".habanero" / "deploy_key", comment="e2e@habanero")
    trusted = base / "trusted_keys"
    trusted.write_text(key.public.line() + "\n", encoding="utf-8")
    (base / "home").mkdir()
    return DevProject(example, root, base / "home", key, trusted, base / "store")


def start_example(launcher: Launcher, project: DevProject, **env: str) -> AppProcess:
    """Run the example's own ``serve.py`` (from the repo, as shipped) on port 0."""
    standalone = project.example == "wsgi_app"
    if standalone:
        env.setdefault("HABANERO_LISTEN", "127.0.0.1:0")
    serve = EXAMPLES / project.example / "serve.py"
    app = launcher.start([sys.executable, str(serve)], env=project.app_env(**env), cwd=project.root.parent,
                         name=project.example)
    if standalone:
        app.control = app.wait_for(CONTROL)["url"]
    return app


# The aiohttp example's app with a small body cap and a short upload deadline, which the refusal
# tests need and the example rightly does not expose.
LIMITED_APP = '''\
import asyncio, os, sys
from aiohttp import web
import overlay
from overlay.bundle import Limits

sys.path.insert(0, os.environ["E2E_APP_DIR"])
app = web.Application()
ov = overlay.install(packages=["hello"], app=app, upload_timeout=float(os.environ["E2E_UPLOAD_TIMEOUT"]),
                     limits=Limits(max_bundle_bytes=int(os.environ["E2E_MAX_BUNDLE_BYTES"])))
from hello import views
app.router.add_get("/", views.index)


async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
'''


def start_limited_app(launcher: Launcher, project: DevProject, *, max_bytes: int = 32 << 10,
                      upload_timeout: float = 5.0, **env: str) -> AppProcess:
    script = project.root.parent / "limited_app.py"
    script.write_text(LIMITED_APP, encoding="utf-8")
    return launcher.start([sys.executable, str(script)], cwd=project.root.parent, name="limited app",
                          env=project.app_env(E2E_APP_DIR=str(EXAMPLES / "aiohttp_app"),
                                              E2E_MAX_BUNDLE_BYTES=str(max_bytes),
                                              E2E_UPLOAD_TIMEOUT=str(upload_timeout), **env))


def free_port() -> int:
    """A port nobody listens on (bound, then released): for "the server is not there" tests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------- HTTP


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), \
            f"not JSON ({self.headers.get('content-type')}): {self.body[:300]!r}"
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The JSON error every refusal must be: ``{"code", "message"}``, never an HTML page."""
        data = self.json()
        assert isinstance(data.get("code"), str) and isinstance(data.get("message"), str), data
        assert "Traceback" not in data["message"]
        return data


def request(url: str, path: str = "/", *, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> Reply:
    """One HTTP request on a fresh connection."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=TIMEOUT, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def get_json(url: str, path: str = "/") -> dict[str, Any]:
    reply = request(url, path)
    assert reply.status == 200, reply
    return reply.json()


def push_bytes(url: str, data: bytes, *, key_ids: list[str] | None = None, app_id: str | None = None) -> Reply:
    """A push as habanero-pack sends it: the bundle, with the key ids it claims (by default those
    it is signed by) and optionally its app id in the headers."""
    headers = {"Content-Type": "application/octet-stream"}
    claimed = list(claimed_key_ids(data)) if key_ids is None else key_ids
    if claimed:
        headers[H_KEY] = ",".join(claimed)
    if app_id is not None:
        headers[H_APP] = app_id
    return request(url, "/_habanero/push", method="POST", body=data, headers=headers)


def signed(project: DevProject, method: str, path: str, body: bytes = b"", *,
           key: SigningKey | None = None, now: float | None = None) -> dict[str, str]:
    return sign_request(key or project.key, method, path, project.app_id, body, now=now)


def status_of(project: DevProject, url: str) -> dict[str, Any]:
    reply = request(url, "/_habanero/status", headers=signed(project, "GET", "/_habanero/status"))
    assert reply.status == 200, reply
    return reply.json()


def rollback_request(project: DevProject, url: str, *, to: int | None = None, expect: int | None = None,
                     headers: dict[str, str] | None = None, body: bytes | None = None) -> Reply:
    body = json.dumps({"to": to, "expect": expect}).encode() if body is None else body
    headers = headers or signed(project, "POST", "/_habanero/rollback", body)
    return request(url, "/_habanero/rollback", method="POST", body=body,
                   headers={"Content-Type": "application/json", **headers})


class Upload:
    """A push written by hand on a raw socket: headers now, the body when and how the test says."""

    def __init__(self, url: str, *, length: int | None = None, expect_continue: bool = False,
                 key_id: str | None = None) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
        framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
        head = (f"POST /_habanero/push HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: application/octet-stream\r\n{framing}\r\n")
        if key_id is not None:  # the key the push claims to be signed by
            head += f"{H_KEY}: {key_id}\r\n"
        if expect_continue:
            head += "Expect: 100-continue\r\n"
        self.sock.sendall((head + "\r\n").encode("ascii"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_chunk(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def wait_continue(self) -> None:
        """Block until the server sends ``100 Continue``: the push handler is running."""
        seen = b""
        while not seen.endswith(b"\r\n\r\n"):
            byte = self.sock.recv(1)
            assert byte, f"connection closed before 100 Continue: {seen!r}"
            seen += byte
        assert seen.startswith(b"HTTP/1.1 100"), seen

    def response(self) -> Reply:
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())

    def close(self) -> None:
        self.sock.close()


# -------------------------------------------------------------------------------------- bundles


def hello_bundle(key: SigningKey, version: int, *, greeting: str = "Hello, world", app_id: str = "hello",
                 extra: str = "") -> bytes:
    """The aiohttp example's ``hello`` package as a signed bundle, saying ``greeting``."""
    base = EXAMPLES / "aiohttp_app" / "hello"
    views = (base / "views.py").read_text(encoding="utf-8").replace('"Hello, world"', repr(greeting)) + extra
    files = {"hello": ("package", (base / "__init__.py").read_bytes()),
             "hello.views": ("module", views.encode("utf-8"))}
    return build_bundle(files, app_id=app_id, version=version, signers=[key])


_HEADER = struct.Struct(">8sHHII")


def unsigned(bundle: bytes) -> bytes:
    """The same bundle with an empty signature block."""
    magic, fmt, flags, manifest_len, sig_len = _HEADER.unpack_from(bundle)
    manifest = bundle[_HEADER.size:_HEADER.size + manifest_len]
    rest = bundle[_HEADER.size + manifest_len + sig_len:]
    return _HEADER.pack(magic, fmt, flags, manifest_len, 1) + manifest + b"\x00" + rest


def tampered(bundle: bytes) -> bytes:
    """The same bundle with one bit of its signed manifest flipped."""
    data = bytearray(bundle)
    data[_HEADER.size + 40] ^= 0x01
    return bytes(data)


# ------------------------------------------------------------------------------------------ TLS


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "habanero e2e")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path

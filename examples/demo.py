"""``make demo``: push code into a running app, change it live, refuse a broken push, roll back.

Everything happens in a throw-away copy of ``examples/aiohttp_app`` in a temporary directory, with a
throw-away deploy key, driven by the real ``habanero-pack`` command. Each step says what it does and
checks that it happened. Whatever happens (success, a failed check, Ctrl-C, SIGTERM), the app process
is stopped and the temporary directory removed. Exit status: 0 when every step did what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "aiohttp_app"
TIMEOUT = 30  # seconds, for every command and for the app to start
_PACK = Path(sys.executable).with_name("habanero-pack")
PACK = [str(_PACK)] if _PACK.exists() else [sys.executable, "-m", "packer"]


class DemoFailed(Exception):
    """A step did not do what it said; the message says which and what happened instead."""


def say(text: str, indent: str = "") -> None:
    """Narrate: one paragraph, wrapped; steps flush left, remarks under a step indented."""
    print(textwrap.fill(" ".join(text.split()), width=100, initial_indent=indent, subsequent_indent="   "),
          flush=True)


def show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"     {line}", flush=True)


class App:
    """The example app as a child process in its own process group, so stopping it stops it all."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self.proc = subprocess.Popen([sys.executable, str(directory / "serve.py")], cwd=directory, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            if not self._ready.wait(TIMEOUT) or not self.url:
                raise DemoFailed("the app did not start:\n" + "".join(self.lines[-20:]))
        except BaseException:  # Ctrl-C included: nobody else holds this process yet
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("listening on ") and not self.url:
                self.url = line.split()[2]
                self._ready.set()
        self._ready.set()  # the app exited: start() reports what it printed

    def get(self) -> dict:
        print(f"   $ curl {self.url}/", flush=True)
        try:
            with urllib.request.urlopen(self.url + "/", timeout=10) as response:
                body = response.read().decode()
        except OSError as exc:
            raise DemoFailed(f"the app did not answer: {exc}") from None
        show(body)
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.returncode is None:  # not reaped yet: the process group is still ours
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Demo:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HABANERO_")}
        self.app: App | None = None

    def pack(self, *args: str, ok: bool = True, lines: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run habanero-pack, show the command and (the first ``lines`` of) what it printed."""
        shown = " ".join(args)
        print(f"   $ habanero-pack {shown}", flush=True)
        proc = subprocess.run([*PACK, *args], cwd=self.dir, env=self.env, text=True, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=TIMEOUT)
        show("\n".join((proc.stdout + proc.stderr).splitlines()[:lines]))
        if ok and proc.returncode != 0:
            raise DemoFailed(f"habanero-pack {shown} failed with exit status {proc.returncode}")
        if not ok and proc.returncode == 0:
            raise DemoFailed(f"habanero-pack {shown} should have been refused, but it succeeded")
        return proc

    @property
    def url(self) -> str:
        assert self.app is not None
        return self.app.url

    def edit(self, old: str, new: str) -> None:
        path = self.dir / "hello" / "views.py"
        text = path.read_text(encoding="utf-8")
        if old not in text:
            raise DemoFailed(f"hello/views.py no longer contains {old!r}")
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
        print(f"   - {old.strip()}\n   + {new.strip()}", flush=True)

    def expect(self, answer: dict, message: str, pid: int, hits: int) -> None:
        got = (answer.get("message"), answer.get("pid"), answer.get("hits"))
        if got != (message, pid, hits):
            raise DemoFailed(f"expected message {message!r} from pid {pid} with {hits} hits, got {got}")

    def run(self) -> None:
        say(f"1. Set up a copy of examples/aiohttp_app in {self.dir} and a throw-away deploy key. "
            "The app trusts only the keys in its trusted_keys file.")
        shutil.copytree(EXAMPLE, self.dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", ".habanero", "trusted_keys"))
        keygen = self.pack("keygen", lines=3)
        public = next(line for line in keygen.stdout.splitlines() if line.startswith("ssh-ed25519 "))
        (self.dir / "trusted_keys").write_text(public + "\n", encoding="utf-8")
        say("The public key line goes into the app's trusted_keys file.", indent="   ")

        say("2. Start the app. serve.py calls overlay.install(app=app), which mounts habanero's endpoint "
            "at /_habanero inside the app's own aiohttp server.")
        self.app = App(self.dir, {**self.env, "PORT": "0"})
        show(self.app.lines[-1])
        pid = self.app.proc.pid

        say("3. Push the first version: habanero-pack builds a signed bundle of the `hello` package, "
            "sends it, and checks that the app now runs it.")
        self.pack("--push", self.url)
        self.expect(self.app.get(), "Hello, world", pid, 1)

        say("4. Edit greeting() in hello/views.py and push again. Nothing restarts.")
        self.edit('return "Hello, world"', 'return "Hello from a hot deploy"')
        self.pack("--push", self.url)
        self.expect(self.app.get(), "Hello from a hot deploy", pid, 2)
        say(f"Same process (pid {pid}), and the hit counter went on from 1 to 2: the module's state "
            "survived, only greeting() changed.", indent="   ")

        say("5. Push a broken version: a syntax error. The app compiles everything before running "
            "anything, so it refuses the whole bundle.")
        self.edit('return "Hello from a hot deploy"', 'return "Hello from a typo"(')
        self.pack("--push", self.url, ok=False)
        self.expect(self.app.get(), "Hello from a hot deploy", pid, 3)
        say("Refused, and the app still serves version 2.", indent="   ")

        say("6. Push code that compiles but fails while it runs (an exception at import time). The app "
            "runs it, it fails, and every change is undone.")
        self.edit('return "Hello from a typo"(', 'return "never served"')
        with (self.dir / "hello" / "views.py").open("a", encoding="utf-8") as fh:
            fh.write('\nraise RuntimeError("the database is not configured")\n')
        print('   + raise RuntimeError("the database is not configured")', flush=True)
        self.pack("--push", self.url, ok=False)
        self.expect(self.app.get(), "Hello from a hot deploy", pid, 4)
        say("The traceback above points at this project's own hello/views.py; the app still serves "
            "version 2.", indent="   ")

        say("7. Roll back to the previous version (a signed request; same transaction as a push).")
        self.pack("rollback", self.url)
        self.expect(self.app.get(), "Hello, world", pid, 5)
        say("Version 1 answers again, in the same process, with the counter still counting.", indent="   ")

        say("8. Ask the app what it runs.")
        self.pack("status", self.url)

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()


def _remove(directory: Path) -> None:
    # The app's store keeps each version as a read-only tree; give write access back before deleting.
    for root, dirs, _ in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(directory, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    started = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)  # stop the app and clean up, as for Ctrl-C
    print("habanero demo: hot-deploying code into a running aiohttp app\n", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="habanero-demo-"))
    demo = Demo(directory / "app")
    try:
        demo.run()
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        if demo.app is not None:
            print("the app's output:\n" + textwrap.indent("".join(demo.app.lines[-30:]), "  "), file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"\ndemo failed: {' '.join(map(str, exc.cmd))} did not finish within {exc.timeout:g} s",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; stopping the app", file=sys.stderr)
        return 130
    finally:
        demo.stop()
        _remove(directory)
    print(f"\nDone in {time.monotonic() - started:.1f} s. The app process is stopped and {directory} "
          "removed.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

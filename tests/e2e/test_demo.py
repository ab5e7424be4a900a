"""``make demo`` stays true: the README's first command runs, narrates, and cleans up after itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT
from support.e2e import TIMEOUT, base_env

pytestmark = pytest.mark.slow  # the demo and its app, as processes

DEMO = ROOT / "examples" / "demo.py"


def test_the_demo_pushes_edits_refuses_and_rolls_back_a_live_app(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(DEMO)], cwd=ROOT, env=base_env(tmp_path), text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=4 * TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    pid = re.search(r"listening on http://127\.0\.0\.1:\d+ \(pid (\d+)", out)[1]
    for line in ("pushed version 1 to ",
                 '{"message": "Hello, world", "hits": 1, "pid": %s}' % pid,
                 '{"message": "Hello from a hot deploy", "hits": 2, "pid": %s}' % pid,
                 f"Same process (pid {pid}), and the hit counter went on from 1 to 2",
                 "push refused: syntax_error: hello.views does not compile",
                 "push refused: activation_failed: version 3 failed while running: RuntimeError",
                 "rolled back http://127.0.0.1:",
                 '{"message": "Hello, world", "hits": 5, "pid": %s}' % pid,
                 "active     version 1 ",
                 "The app process is stopped"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert_gone(int(pid), demo_dir(out))


def test_ctrl_c_stops_the_demos_app_and_removes_its_directory(tmp_path: Path) -> None:
    demo = subprocess.Popen([sys.executable, str(DEMO)], cwd=ROOT, env=base_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    seen = ""
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # until the app is up: the demo has something to clean up
            seen += line
            if "listening on " in line:
                break
        pid = int(re.search(r"\(pid (\d+)", seen)[1])
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=TIMEOUT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(TIMEOUT)
    assert demo.returncode == 130, err
    assert "demo interrupted; stopping the app" in err
    assert_gone(pid, demo_dir(seen))


def demo_dir(out: str) -> Path:
    return Path(re.search(r"(/\S*habanero-demo-[^/\s]+)/app", out)[1])


def assert_gone(pid: int, directory: Path) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        os.killpg(pid, signal.SIGKILL)  # the app leads its own process group
        raise AssertionError(f"the demo left its app running (pid {pid})")
    assert not directory.exists()

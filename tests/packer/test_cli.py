"""habanero-pack keygen, build and inspect: the real console script, and main() in-process."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.project import HABANERO_PACK, clean_env, make_project, write_files

from packer.cli import main
from packer.commands import VERBS

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                      reason="ssh-keygen (OpenSSH) is not installed")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and no HABANERO_* settings, for main() and for child processes alike."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("HABANERO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def project(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    return root


def pack(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; every run must be free of tracebacks."""
    proc = subprocess.run([str(HABANERO_PACK), *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("habanero-pack: error: ")
    return lines[0]


def ssh_keygen(path: Path, *, kind: str = "ed25519", passphrase: str = "") -> Path:
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", passphrase, "-C", "me@laptop",
                    "-f", str(path)], check=True, capture_output=True)
    return path


def test_the_console_script_is_installed() -> None:
    assert HABANERO_PACK.exists(), f"{HABANERO_PACK} is missing; run `make test` to install habanero"


# ------------------------------------------------------------------------------------- keygen


@pytest.mark.slow
def test_keygen_writes_a_0600_private_key_and_a_pub_line(project: Path) -> None:
    proc = pack("keygen", cwd=project)
    assert proc.returncode == 0, proc.stderr
    private, public = project / ".habanero" / "deploy_key", project / ".habanero" / "deploy_key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    kind, blob, comment = public.read_text().strip().split(" ", 2)
    assert kind == "ssh-ed25519" and blob.startswith("AAAAC3NzaC1lZDI1NTE5") and "@" in comment
    assert public.read_text().strip() in proc.stdout.splitlines()  # the line to copy
    assert "trusted keys file" in proc.stdout


@pytest.mark.slow
@needs_ssh_keygen
def test_keygen_key_id_is_the_fingerprint_ssh_keygen_prints(project: Path) -> None:
    proc = pack("keygen", "--out", "k", "--comment", "ci deploy", cwd=project)
    key_id = next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("key id "))
    listed = subprocess.run(["ssh-keygen", "-lf", str(project / "k.pub")], capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed[1] == key_id
    assert (project / "k.pub").read_text().strip().endswith(" ci deploy")


@pytest.mark.slow
def test_keygen_refuses_to_overwrite_unless_forced(project: Path) -> None:
    assert main(["keygen", "--out", "k"]) == 0
    first = (project / "k.pub").read_text()
    proc = pack("keygen", "--out", "k", cwd=project)
    assert proc.returncode == 1 and "already exists" in one_error_line(proc.stderr)
    assert main(["keygen", "--out", "k", "--force"]) == 0
    assert (project / "k.pub").read_text() != first


@pytest.mark.slow
def test_the_readme_keygen_command_works(project: Path, home: Path) -> None:
    proc = pack("keygen", "--out", "~/.config/habanero/deploy_key", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert (home / ".config" / "habanero" / "deploy_key.pub").read_text().startswith("ssh-ed25519 ")
    assert "HABANERO_KEY=" in proc.stdout  # not the project default: says how to point at it


def test_keygen_outside_a_project_writes_into_the_cwd(tmp_path: Path, home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(home)
    assert main(["keygen"]) == 0
    assert (home / ".habanero" / "deploy_key.pub").exists()


# -------------------------------------------------------------------------------------- build


@pytest.mark.slow
def test_build_then_inspect_with_trusted_keys_verifies_and_names_the_key(project: Path) -> None:
    env = clean_env(project.parent / "home")
    keygen = pack("keygen", "--comment", "alice@laptop", cwd=project, env=env)
    key_id = next(line.split()[2] for line in keygen.stdout.splitlines() if line.startswith("key id "))
    built = pack("build", "--bundle-version", "7", cwd=project, env=env)
    assert built.returncode == 0, built.stderr
    summary = built.stdout.strip()
    assert summary.startswith("wrote shop-v7.hbn: shop v7, 6 entries, ") and key_id in summary
    assert " ms" in summary and "ratio" in summary

    inspected = pack("inspect", "shop-v7.hbn", "--trusted-keys", ".habanero/deploy_key.pub",
                     cwd=project, env=env)
    assert inspected.returncode == 0, inspected.stderr
    out = inspected.stdout
    assert f"signature  verified with {key_id} (alice@laptop)" in out
    for expected in ("app        shop", "version    7", "parent     none", "payload    zstd",
                     "package", "shop.admin.views", "shop/templates/index.html"):
        assert expected in out


@pytest.mark.slow
def test_inspect_against_the_wrong_key_reports_unknown_key(project: Path) -> None:
    assert main(["keygen"]) == 0
    assert main(["keygen", "--out", "other"]) == 0
    assert main(["build"]) == 0
    proc = pack("inspect", "shop-v1.hbn", "--trusted-keys", "other.pub", cwd=project)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert line.startswith("habanero-pack: error: unknown_key: key SHA256:")
    assert "is not trusted" in line and "REFUSED unknown_key" in proc.stdout


@pytest.mark.slow
def test_inspect_of_a_tampered_bundle_reports_bad_signature(project: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert main(["build", "-o", "v1.hbn"]) == 0
    data = (project / "v1.hbn").read_bytes()
    (project / "v1.hbn").write_bytes(data.replace(b'"version":1', b'"version":9', 1))
    capsys.readouterr()
    assert main(["inspect", "v1.hbn", "--trusted-keys", ".habanero/deploy_key.pub"]) == 1
    out, err = capsys.readouterr()
    assert one_error_line(err).startswith("habanero-pack: error: bad_signature: ")
    assert "REFUSED bad_signature" in out and "version    9" in out


@pytest.mark.slow
def test_inspect_without_trusted_keys_says_the_signature_was_not_checked(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert main(["build"]) == 0
    capsys.readouterr()
    assert main(["inspect", "shop-v1.hbn"]) == 0
    out = capsys.readouterr().out
    public = (project / ".habanero" / "deploy_key.pub").read_text()
    assert "signature  not checked: pass --trusted-keys FILE (claims SHA256:" in out
    assert "verified" not in out and public.split()[1] not in out


@pytest.mark.slow
def test_inspect_json_carries_the_manifest_and_verdict(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert main(["build"]) == 0
    capsys.readouterr()
    assert main(["inspect", "shop-v1.hbn", "--json", "--trusted-keys", ".habanero/deploy_key.pub"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signature"]["verified"] is True
    assert report["manifest"]["app_id"] == "shop" and len(report["manifest"]["entries"]) == 6


@pytest.mark.slow
def test_inspect_takes_trusted_keys_from_the_environment(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert main(["build"]) == 0
    monkeypatch.setenv("HABANERO_TRUSTED_KEYS", str(project / ".habanero" / "deploy_key.pub"))
    capsys.readouterr()
    assert main(["inspect", "shop-v1.hbn"]) == 0
    assert "signature  verified with SHA256:" in capsys.readouterr().out


@pytest.mark.slow
def test_build_flags_override_pyproject(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_files(project, {"worker.py": "JOBS = 1\n"})
    assert main(["keygen", "--out", "k"]) == 0
    assert main(["build", "--key", "k", "--app-id", "shop-staging", "--packages", "worker.py",
                 "-o", "out/w.hbn"]) == 1  # out/ does not exist: an error line, not a traceback
    assert "No such file or directory" in one_error_line(capsys.readouterr().err)
    (project / "out").mkdir()
    assert main(["build", "--key", "k", "--app-id", "shop-staging", "--packages", "worker.py",
                 "-o", "out/w.hbn"]) == 0
    assert "wrote out/w.hbn: shop-staging v1, 1 entries" in capsys.readouterr().out


@pytest.mark.slow
def test_project_options_work_before_and_after_the_command(project: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", "k"]) == 0
    assert main(["--key", "k", "--app-id", "before", "build"]) == 0
    assert main(["build", "--key", "k", "--app-id", "after"]) == 0
    assert main(["--app-id", "ignored", "build", "--key", "k", "--app-id", "wins"]) == 0
    out = capsys.readouterr().out
    assert "wrote before-v1.hbn" in out and "wrote after-v1.hbn" in out and "wrote wins-v1.hbn" in out


@pytest.mark.slow
def test_build_warns_about_skipped_native_files_on_stderr_unless_quiet(project: Path) -> None:
    write_files(project, {"shop/_fast.so": b"\x7fELF"})
    env = clean_env(project.parent / "home")
    pack("keygen", cwd=project, env=env)
    proc = pack("build", cwd=project, env=env)
    assert proc.returncode == 0
    assert proc.stderr.strip() == ("habanero-pack: warning: skipped 1 file (native code and path hooks "
                                   "never ride in a bundle): shop/_fast.so")
    for quiet in (["-q", "build"], ["build", "-q"]):
        assert pack(*quiet, cwd=project, env=env).stderr == ""


# ------------------------------------------------------------------------- keys users already have


@pytest.mark.slow
@needs_ssh_keygen
def test_an_ssh_keygen_ed25519_key_signs_bundles(project: Path, home: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (home / ".ssh").mkdir()
    key = ssh_keygen(home / ".ssh" / "id_ed25519")
    assert main(["build"]) == 0  # the ~/.ssh/id_ed25519 default
    assert main(["inspect", "shop-v1.hbn", "--trusted-keys", f"{key}.pub"]) == 0
    assert "(me@laptop)" in capsys.readouterr().out


@pytest.mark.slow
@needs_ssh_keygen
def test_a_passphrase_protected_key_signs_with_habanero_key_passphrase(project: Path) -> None:
    ssh_keygen(project / "locked", passphrase="open sesame")
    env = {**clean_env(project.parent / "home"), "HABANERO_KEY": "locked"}
    proc = pack("build", cwd=project, env={**env, "HABANERO_KEY_PASSPHRASE": "open sesame"})
    assert proc.returncode == 0, proc.stderr

    wrong = pack("build", cwd=project, env={**env, "HABANERO_KEY_PASSPHRASE": "guess"})
    assert wrong.returncode == 1 and "wrong passphrase" in one_error_line(wrong.stderr)

    missing = pack("build", cwd=project, env=env)  # no terminal to ask on
    assert missing.returncode == 1
    assert "set HABANERO_KEY_PASSPHRASE" in one_error_line(missing.stderr)


@pytest.mark.slow
@needs_ssh_keygen
def test_an_rsa_key_is_refused_with_a_clear_message(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ssh_keygen(project / "rsa_key", kind="rsa")
    assert main(["build", "--key", "rsa_key"]) == 1
    assert "only ed25519 keys are supported" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ errors and hooks


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["build"], 1, "no signing key: pass --key"),
        (["build", "--key", "nope"], 1, "nope does not exist; create one with `habanero-pack keygen"),
        (["build", "--bundle-version", "0"], 2,
         "build: argument --bundle-version: --bundle-version takes a positive integer"),
        (["build", "--project", "/nonexistent"], 1, "/nonexistent has no pyproject.toml"),
        (["inspect", "missing.hbn"], 1, "missing.hbn: No such file or directory"),
        (["inspect", "pyproject.toml"], 1, "this is not a habanero bundle (bad magic)"),
        (["inspect", "pyproject.toml", "--trusted-keys", "pyproject.toml"], 1, "pyproject.toml, line 1"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        ([], 2, "choose a command: push, status, history, rollback, build, inspect, keygen"),
        (["--push"], 1, "no URL: pass it"),
        (["--push", "http://127.0.0.1:9"], 1, "no signing key: pass --key"),
        (["--watch"], 2, "--watch goes with push"),
        (["--watch", "status"], 2, "--check and --debounce go with --watch, and --watch with push"),
        (["push", "--check", "true"], 2, "--check and --debounce go with --watch"),
        (["--push", "http://127.0.0.1:8765", "build"], 2, "--push is the push command itself; drop the 'build'"),
        (["push"], 1, "no URL: pass it"),
    ],
)
def test_user_errors_are_one_line_and_a_nonzero_exit(project: Path, capsys: pytest.CaptureFixture[str],
                                                    argv: list[str], status: int, message: str) -> None:
    assert main(argv) == status
    line = one_error_line(capsys.readouterr().err)
    assert message in line


@pytest.mark.parametrize("argv", [["--push", "http://127.0.0.1:9", "--check", "true"],
                                  ["--push", "http://127.0.0.1:9", "--debounce", "50"],
                                  ["--check", "true", "build"]])
def test_check_and_debounce_go_with_watch(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "--check and --debounce go with --watch" in capsys.readouterr().err


@pytest.mark.slow
def test_errors_from_the_real_command_are_one_line_without_traceback(project: Path) -> None:
    (project / "pyproject.toml").write_text("[tool.habanero]\npackages = 3\n")
    proc = pack("build", cwd=project, env=clean_env(project.parent / "home"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "packages must be a list of names" in one_error_line(proc.stderr)


@pytest.mark.slow
def test_version_and_help(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "habanero-pack 0.1.0"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in VERBS) and "--push [URL]" in out and "--watch" in out
    proc = subprocess.run([sys.executable, "-m", "packer", "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == "habanero-pack 0.1.0"


@pytest.mark.slow
def test_importing_the_cli_stays_light() -> None:
    code = ("import sys, packer.cli; heavy = {'zstandard', 'cryptography', 'aiohttp', 'overlay.bundle', "
            "'packer.build', 'tomllib'} & set(sys.modules); print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_building_and_signing_loads_neither_the_store_nor_ctypes(project: Path) -> None:
    """The developer's side writes files as the store does, and signs with cryptography: the store
    and the app side's signature checker (ctypes) would only add to every command's start-up."""
    assert main(["keygen"]) == 0  # the project's default key, .habanero/deploy_key
    code = ("import sys; from packer.cli import main; code = main(['build', '-q']); "
            "print(code, sorted({'overlay.store', 'ctypes', 'overlay.ed25519'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "0 []", proc.stderr


def test_main_leaves_logging_as_it_found_it(project: Path) -> None:
    import logging

    before = (logging.getLogger("packer").handlers[:], logging.getLogger("packer").level)
    main(["build"])
    assert (logging.getLogger("packer").handlers, logging.getLogger("packer").level) == before

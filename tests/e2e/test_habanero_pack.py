"""``habanero-pack`` end to end: the real console script against the examples' real processes.

Mounted mode is the aiohttp example (the endpoint lives in the app's own server); standalone mode is
the WSGI example with ``listen=``, plain and over TLS. The developer's project is a temporary copy
of the example with a fresh key; the app runs the example's ``serve.py`` as shipped, with its store
and trust file in the test's temporary directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from support.e2e import (
    PACK,
    TIMEOUT,
    AppProcess,
    DevProject,
    base_env,
    free_port,
    get_json,
    make_project,
    request,
    self_signed_cert,
    start_example,
    status_of,
)

pytestmark = pytest.mark.slow  # real app processes and the real CLI

HELLO_VIEWS = "hello/views.py"
GREETING = 'return "Hello, world"'


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The failure is exactly one ``habanero-pack: error: ...`` line, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("habanero-pack: error: "), proc.stderr
    return lines[0]


def greeting(app: AppProcess) -> dict:
    return get_json(app.url)


@pytest.fixture
def hello(launcher, tmp_path) -> tuple[AppProcess, DevProject]:
    """The aiohttp example running (nothing pushed yet) and the developer's copy of it."""
    project = make_project(tmp_path / "hello", "aiohttp_app")
    return start_example(launcher, project), project


# ------------------------------------------------------------------------------- mounted (aiohttp)


def test_an_edit_is_served_by_the_same_process_with_its_memory_kept(hello) -> None:
    app, project = hello
    first = project.push(app.control)
    assert first.stdout.startswith("pushed version 1 to ")
    assert greeting(app)["message"] == "Hello, world"
    assert greeting(app)["hits"] == 2

    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, habanero"')
    second = project.push(app.control)
    assert "pushed version 2" in second.stdout
    assert "patched in hello.views: greeting" in second.stdout
    now = greeting(app)
    assert (now["message"], now["hits"], now["pid"]) == ("Hello, habanero", 3, app.pid)


def test_a_syntax_error_is_refused_with_the_local_path_and_the_old_version_keeps_serving(hello) -> None:
    app, project = hello
    project.push(app.control)
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, (broken"(')
    proc = project.pack("--push", app.control)
    assert proc.returncode == 1
    assert "push refused: syntax_error: hello.views does not compile" in proc.stderr
    assert f"({project.root / HELLO_VIEWS}, line " in proc.stderr  # mapped onto the developer's file
    assert "/tree/" not in proc.stderr
    assert "the app still serves its previous version" in proc.stderr
    assert greeting(app)["message"] == "Hello, world"
    assert status_of(project, app.url)["version"] == 1


def test_an_import_time_exception_is_undone_and_its_traceback_points_at_local_files(hello) -> None:
    app, project = hello
    project.push(app.control)
    project.edit(HELLO_VIEWS, GREETING, 'return "never served"')
    project.append(HELLO_VIEWS, '\nraise RuntimeError("boom at import")\n')
    proc = project.pack("--push", app.control)
    assert proc.returncode == 1
    assert "push refused: activation_failed: version 2 failed while running: RuntimeError: boom at import" \
        in proc.stderr
    assert "--- traceback in the app (paths mapped to this project) ---" in proc.stderr
    assert re.search(rf'File "{re.escape(str(project.root / HELLO_VIEWS))}", line \d+, in <module>', proc.stderr)
    assert "/tree/" not in proc.stderr
    assert greeting(app)["message"] == "Hello, world"
    assert status_of(project, app.url)["version"] == 1


def test_rollback_returns_to_the_previous_version_in_the_same_process(hello) -> None:
    app, project = hello
    project.push(app.control)
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, two"')
    project.push(app.control)
    proc = project.pack("rollback", app.control)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"rolled back {app.control} from version 2 to 1 in ")
    now = greeting(app)
    assert (now["message"], now["pid"]) == ("Hello, world", app.pid)


def test_rollback_to_a_named_version(hello) -> None:
    app, project = hello
    project.push(app.control)
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, two"')
    project.push(app.control)
    project.edit(HELLO_VIEWS, 'return "Hello, two"', 'return "Hello, three"')
    project.push(app.control)
    assert greeting(app)["message"] == "Hello, three"
    proc = project.pack("rollback", app.control, "--to", "1")
    assert proc.returncode == 0, proc.stderr
    assert "from version 3 to 1" in proc.stdout
    assert greeting(app)["message"] == "Hello, world"
    assert status_of(project, app.url)["version"] == 1


def test_rollback_with_nothing_to_roll_back_to_says_so_in_one_line(hello) -> None:
    app, project = hello
    project.push(app.control)
    line = one_error_line(project.pack("rollback", app.control))
    assert "no earlier stored version to roll back to" in line
    assert greeting(app)["message"] == "Hello, world"


def test_rollback_before_any_push_says_there_is_nothing_to_roll_back(hello) -> None:
    app, project = hello
    line = one_error_line(project.pack("rollback", app.control))
    assert "nothing to roll back" in line and "runs the code on disk" in line
    assert greeting(app)["message"] == "Hello, world"


def test_status_shows_the_active_version_for_people_and_as_json(hello) -> None:
    app, project = hello
    project.push(app.control)
    human = project.pack("status", app.control)
    assert human.returncode == 0, human.stderr
    assert f"app        hello at {app.control} (pid {app.pid}," in human.stdout
    assert re.search(r"^active     version 1 \([0-9a-f]{12}\), 2 entries, built ", human.stdout, re.M)
    assert "highest    1" in human.stdout
    as_json = project.pack("status", app.control, "--json")
    status = json.loads(as_json.stdout)
    assert (status["version"], status["highest"], status["pid"]) == (1, 1, app.pid)
    assert f"active     version 1 ({status['active']['digest'][:12]})" in human.stdout


def test_history_lists_pushes_refusals_and_rollbacks_with_local_paths(hello) -> None:
    app, project = hello
    project.push(app.control)
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, two"')
    project.push(app.control)
    project.edit(HELLO_VIEWS, 'return "Hello, two"', 'return "broken"(')
    assert project.pack("--push", app.control).returncode == 1
    assert project.pack("rollback", app.control).returncode == 0
    proc = project.pack("history", app.control)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[1:4] for line in proc.stdout.splitlines()]
    assert rows == [["push", "v1", "ok"], ["push", "v2", "ok"], ["push", "v3", "failed"],
                    ["rollback", "v1", "ok"]]
    assert f"syntax_error: hello.views does not compile: '(' was never closed ({project.root / HELLO_VIEWS}" \
        in proc.stdout
    entries = json.loads(project.pack("history", app.control, "--json").stdout)
    assert [e["outcome"] for e in entries] == ["ok", "ok", "failed", "ok"]


def test_push_json_reports_client_and_server_timings(hello) -> None:
    app, project = hello
    result = json.loads(project.push(app.control, "--json").stdout)
    assert (result["ok"], result["version"]) == (True, 1)
    assert {"build", "transfer", "server", "total"} <= set(result["timings_ms"])
    assert {"verify", "apply", "total"} <= set(result["report"]["timings_ms"])


def test_two_pushes_at_once_leave_one_consistent_version(hello) -> None:
    app, project = hello
    env = base_env(project.home)
    procs = [subprocess.Popen([*PACK, "--push", app.control], cwd=project.root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outcomes = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            outcomes.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
    assert any(code == 0 for code, _, _ in outcomes), outcomes
    for code, out, err in outcomes:
        # The one that lost the race reads the status again (stale_version is retried once) and finds
        # the app runs this very code: nothing to push, no version spent. Or the app was busy.
        assert (code == 0 and re.match(r"(pushed version|nothing to push)", out)
                or re.search(r"push refused: deploy_in_progress: ", err)), (out, err)
    status = status_of(project, app.url)
    pushed = sum(out.startswith("pushed version") for _, out, _ in outcomes)
    assert status["version"] == status["highest"] == pushed == 1
    assert greeting(app)["message"] == "Hello, world"


# ---------------------------------------------------------------------------------- wrong targets


def test_a_server_that_is_not_habanero_gets_one_clear_line(launcher, tmp_path) -> None:
    project = make_project(tmp_path)
    plain = launcher.start([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], cwd=tmp_path,
                           env=base_env(project.home), name="http.server",
                           ready=re.compile(r"\((?P<url>http://127\.0\.0\.1:\d+)/\)"))
    for args in (["--push", plain.url], ["status", plain.url], ["rollback", plain.url]):
        line = one_error_line(project.pack(*args))
        assert f"{plain.url} answered HTTP 404 but is not a habanero endpoint" in line


def test_an_unreachable_port_gets_one_clear_line(tmp_path) -> None:
    project = make_project(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["--push", url], ["status", url], ["history", url]):
        line = one_error_line(project.pack(*args))
        assert f"cannot reach {url}: connection refused" in line


def test_a_missing_key_gets_one_clear_line(hello) -> None:
    app, project = hello
    (project.root / ".habanero" / "deploy_key").unlink()
    line = one_error_line(project.pack("--push", app.control))
    assert f"signing key {project.root / '.habanero' / 'deploy_key'}" in line and "habanero-pack keygen" in line
    assert greeting(app)["message"] == "Hello, world"


# ------------------------------------------------------------------------- standalone (listen=)


@pytest.fixture
def counter(launcher, tmp_path) -> tuple[AppProcess, DevProject]:
    """The WSGI example with habanero on its own port, and the developer's copy of it."""
    project = make_project(tmp_path, "wsgi_app")
    return start_example(launcher, project), project


def test_standalone_server_serves_an_edit_from_the_same_process(counter) -> None:
    app, project = counter
    assert app.control != app.url  # habanero's own port, printed as really bound
    project.push(app.control)
    assert request(app.url).body == b"counting: 1\n"
    project.edit("counter/__init__.py", 'return "counting"', 'return "tallying"')
    assert "patched in counter: message" in project.push(app.control).stdout
    assert request(app.url).body == b"tallying: 2\n"
    assert status_of(project, app.control)["pid"] == app.pid


def test_standalone_server_refuses_a_syntax_error_and_keeps_serving(counter) -> None:
    app, project = counter
    project.push(app.control)
    project.edit("counter/__init__.py", 'return "counting"', 'return "tallying" +')
    proc = project.pack("--push", app.control)
    assert proc.returncode == 1 and "push refused: syntax_error" in proc.stderr
    assert request(app.url).body == b"counting: 1\n"


# ------------------------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_counter(launcher, tmp_path):
    project = make_project(tmp_path / "tls", "wsgi_app")
    cert, key = self_signed_cert(project.root.parent)
    app = start_example(launcher, project, HABANERO_TLS_CERT=str(cert), HABANERO_TLS_KEY=str(key))
    return app, project, cert


def test_push_over_tls_trusts_the_ca_file_from_flag_environment_or_pyproject(tls_counter) -> None:
    app, project, cert = tls_counter
    assert app.control.startswith("https://127.0.0.1:")
    assert "pushed version 1" in project.push(app.control, "--ca-file", str(cert)).stdout
    from_env = project.pack("status", app.control, env=base_env(project.home, HABANERO_CA_FILE=str(cert)))
    assert from_env.returncode == 0 and "active     version 1" in from_env.stdout, from_env.stderr
    with (project.root / "pyproject.toml").open("a", encoding="utf-8") as fh:
        fh.write('ca_file = "../cert.pem"\n')  # relative to the project
    from_pyproject = project.pack("rollback", app.control)
    assert from_pyproject.returncode == 1 and "no earlier stored version" in from_pyproject.stderr
    assert request(app.url).body == b"counting: 1\n"


def test_push_over_tls_without_the_ca_file_fails_with_one_tls_line(tls_counter) -> None:
    app, project, _ = tls_counter
    line = one_error_line(project.pack("--push", app.control))
    assert f"TLS with {app.control} failed: CERTIFICATE_VERIFY_FAILED" in line
    assert "--ca-file" in line


def test_the_wrong_scheme_for_the_server_gets_one_clear_line(tls_counter, hello) -> None:
    tls_app, project, _ = tls_counter
    plain_app, _ = hello
    as_plain = one_error_line(project.pack("status", tls_app.control.replace("https://", "http://")))
    assert "if the app serves TLS, use an https:// URL" in as_plain
    as_tls = one_error_line(project.pack("status", plain_app.control.replace("http://", "https://")))
    assert "the server does not speak TLS: use an http:// URL" in as_tls


def test_a_ca_file_that_is_not_a_certificate_gets_one_clear_line(tls_counter) -> None:
    app, project, _ = tls_counter
    missing = project.root / "missing.pem"
    line = one_error_line(project.pack("status", app.control, "--ca-file", str(missing)))
    assert f"cannot use {missing} as the CA file" in line


# ---------------------------------------------------------------------------------- the verbs


def test_the_push_verb_and_the_push_flag_are_the_same_command(hello) -> None:
    app, project = hello
    first = project.pack("push", app.control)
    assert first.returncode == 0 and first.stdout.startswith("pushed version 1 to "), first.stderr
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, verb"')
    second = project.pack("--push", app.control)
    assert second.returncode == 0 and second.stdout.startswith("pushed version 2 to "), second.stderr
    assert greeting(app)["message"] == "Hello, verb"


def test_a_push_of_the_code_the_app_runs_sends_nothing_and_spends_no_version(hello) -> None:
    app, project = hello
    project.push(app.control)
    again = project.pack("push", app.control)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"nothing to push: {app.control}") and "version 1" in again.stdout
    assert "no version number was spent" in again.stdout
    status = status_of(project, app.url)
    assert (status["version"], status["highest"]) == (1, 1)
    assert [e["action"] for e in status["history"]] == ["push"]  # no refused or empty push recorded


def test_quiet_prints_only_errors(hello) -> None:
    app, project = hello
    quiet = project.pack("-q", "push", app.control)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert project.pack("status", app.control, "-q").stdout == ""
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, (broken"(')
    refused = project.pack("push", "-q", app.control)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "push refused: syntax_error" in refused.stderr


def test_status_history_and_rollback_work_from_any_directory_with_url_key_and_app_id(hello, tmp_path) -> None:
    app, project = hello
    project.push(app.control)
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, two"')
    project.push(app.control)
    elsewhere = tmp_path / "on-the-server"
    elsewhere.mkdir()
    key = str(project.root / ".habanero" / "deploy_key")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PACK, *args], cwd=elsewhere, env=base_env(project.home, **env), text=True,
                              capture_output=True, timeout=TIMEOUT)

    status = run("status", app.control, "--app-id", "hello", "--key", key, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["version"] == 2
    history = run("history", app.control, HABANERO_APP_ID="hello", HABANERO_KEY=key)
    assert history.returncode == 0 and len(history.stdout.splitlines()) == 2, history.stderr
    back = run("rollback", HABANERO_URL=app.control, HABANERO_APP_ID="hello", HABANERO_KEY=key)
    assert back.returncode == 0 and "from version 2 to 1" in back.stdout, back.stderr
    assert greeting(app)["message"] == "Hello, world"
    missing = run("status", app.control, "--key", key)
    assert "no pyproject.toml here or above, so give its app id (--app-id or HABANERO_APP_ID)" \
        in one_error_line(missing)


def test_a_control_request_for_another_app_id_names_both(hello) -> None:
    app, project = hello
    proc = project.pack("status", app.control, "--app-id", "shop")
    line = one_error_line(proc)
    assert "the signer's app id 'shop' differs from the app's, 'hello'" in line
    assert "--app-id hello" in line


def test_a_bundle_for_another_app_id_is_refused_naming_both(hello) -> None:
    app, project = hello
    proc = project.pack("push", app.control, "--app-id", "shop")
    assert proc.returncode == 1  # the status request comes first, and already names the two ids
    assert "push refused: wrong_app: the signer's app id 'shop' differs from the app's, 'hello'" in proc.stderr
    assert greeting(app)["message"] == "Hello, world"


def test_output_into_a_closed_pipe_ends_quietly(hello) -> None:
    # ``habanero-pack history | head -1``: the reader goes away before everything is written.
    app, project = hello
    project.push(app.control)
    proc = subprocess.Popen([*PACK, "history", app.control], cwd=project.root, env=base_env(project.home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed before the command starts writing: every write hits a broken pipe
    try:
        err = proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stderr.close()
    assert err == ""

"""Pushes and restarts across processes: what a fresh interpreter on the same store serves.

Each test pushes in one child interpreter through ``Overlay.apply`` / ``Overlay.rollback`` and then
starts another on the same store, the way a supervisor restarts an app. Bundles are built here and
handed over as files; every child runs with a timeout (``run_python``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.overlay import run_python
from support.upgrade import APP, snippet_files

from overlay.bundle import build_bundle
from overlay.cluster.registry import Registry

pytestmark = pytest.mark.slow  # fresh interpreters

PUSHER = """
    import json, sys
    import overlay

    store, keys, *steps = sys.argv[1:]
    ov = overlay.install(packages=["upapp"], trusted_keys=keys, store=store)
    outcomes = []
    for step in steps:
        try:
            if step == "rollback":
                outcomes.append(["rollback", ov.rollback().version])
            else:
                with open(step, "rb") as fh:
                    outcomes.append(["push", ov.apply(fh.read()).version])
                import upapp.core  # imported once the first version is live, then upgraded in place
        except overlay.HabaneroError as exc:
            outcomes.append(["failed", exc.code])
    print(json.dumps({"outcomes": outcomes, "version": ov.version, "greet": upapp.core.greet("ann")}))
"""

RESTARTED = """
    import importlib, json, sys
    import overlay

    store, keys = sys.argv[1:]
    ov = overlay.install(packages=["upapp"], trusted_keys=keys, store=store)
    import upapp.core
    try:
        importlib.import_module("upapp.extra")
        extra = "importable"
    except ModuleNotFoundError:
        extra = "not served"
    print(json.dumps({"version": ov.version, "greet": upapp.core.greet("ann"), "extra": extra,
                      "file": upapp.core.__file__, "problems": ov.status()["startup_problems"],
                      "history": [[h["action"], h["version"], h["outcome"]] for h in ov.history()]}))
"""


@pytest.fixture
def bundles(tmp_path, signing_key):
    """``bundles(("function_body", "v1"), ...)`` -> paths of signed bundles numbered 1, 2, ..."""

    def make(*trees: tuple[str, str]) -> list[str]:
        paths = []
        for number, (scenario, version) in enumerate(trees, start=1):
            path = tmp_path / f"push-{number}.hbn"
            path.write_bytes(build_bundle(snippet_files(scenario, version), app_id=APP, version=number,
                                          signers=[signing_key]))
            paths.append(str(path))
        return paths

    return make


def run(code: str, tmp_path: Path, *args: str) -> dict:
    proc = run_python(code, cwd=tmp_path, args=list(args))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restart_serves_the_last_committed_version(tmp_path, trusted_keys_file, bundles):
    store, keys = str(tmp_path / "store"), str(trusted_keys_file)
    steps = bundles(("function_body", "v1"), ("function_body", "v2"))

    pushed = run(PUSHER, tmp_path, store, keys, *steps)
    restarted = run(RESTARTED, tmp_path, store, keys)

    assert pushed == {"outcomes": [["push", 1], ["push", 2]], "version": 2, "greet": "hello ann from v2"}
    assert restarted["version"] == 2 and restarted["greet"] == "hello ann from v2"
    file = Path(restarted["file"])  # in the restarted process's own tree
    assert file.parents[3] == Registry(Path(store)).root and file.parts[-3:] == ("tree", "upapp", "core.py")
    assert restarted["problems"] == []
    assert "from v2" in Path(restarted["file"]).read_text()  # the tree shows the version that runs


def test_after_a_failed_push_a_restart_serves_the_previous_version(tmp_path, trusted_keys_file, bundles):
    store, keys = str(tmp_path / "store"), str(trusted_keys_file)
    # import_error v2 changes core (and adds upapp.extra), then its views module raises while running
    steps = bundles(("import_error", "v1"), ("import_error", "v2"))
    code = PUSHER.replace("import upapp.core  #", "import upapp.core, upapp.views  #")

    pushed = run(code, tmp_path, store, keys, *steps)
    restarted = run(RESTARTED, tmp_path, store, keys)

    assert pushed == {"outcomes": [["push", 1], ["failed", "activation_failed"]], "version": 1,
                      "greet": "hello ann (v1)"}
    assert restarted["version"] == 1 and restarted["greet"] == "hello ann (v1)"
    assert restarted["extra"] == "not served" and restarted["problems"] == []
    assert "(v1)" in Path(restarted["file"]).read_text()  # the failed push's files are gone
    assert restarted["history"] == [["push", 1, "ok"], ["push", 2, "failed"]]


def test_after_a_rollback_a_restart_serves_the_version_rolled_back_to(tmp_path, trusted_keys_file, bundles):
    store, keys = str(tmp_path / "store"), str(trusted_keys_file)
    steps = bundles(("function_body", "v1"), ("function_body", "v2"), ("function_body", "v3"))

    pushed = run(PUSHER, tmp_path, store, keys, *steps, "rollback")
    restarted = run(RESTARTED, tmp_path, store, keys)

    assert pushed["outcomes"][-1] == ["rollback", 2] and pushed["greet"] == "hello ann from v2"
    assert restarted["version"] == 2 and restarted["greet"] == "hello ann from v2"
    assert restarted["history"][-1] == ["rollback", 2, "ok"]

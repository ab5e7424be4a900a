"""Run a library's own test suite in a child interpreter, on a fresh import or after a live upgrade.

``python live_upgrade.py SPEC OUT``: SPEC is a JSON file written by ``test_live_upgrades.py``::

    {"mode": "fresh" | "live", "packages": ["packaging"], "old": dir, "new": dir, "tests": dir,
     "path": [extra sys.path entries], "store": dir, "rootdir": dir, "deselect": [test ids],
     "version_of": "packaging.__version__"}

``fresh`` imports the newer release from ``new`` and runs ``tests``. ``live`` imports every module of
the older release from ``old`` under an installed overlay, pushes the newer release's sources as one
signed bundle into that same process (``Overlay.apply``: the path a push takes), then runs the same
tests against the upgraded modules. OUT receives what happened, as JSON: the failed test ids, the
number that passed, the push's refusal (if it was refused) and what the push re-ran.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: support.overlay.tree_entries


#: At most this many cases of one parametrized test run (an even spread, the same in both modes):
#: packaging's version and specifier tests alone are 25,000 cases, a minute of pytest's own overhead.
CASES = 40


class _Outcomes:
    """A pytest plugin that keeps each test's outcome, and thins out large parametrizations."""

    def __init__(self) -> None:
        self.failed: set[str] = set()
        self.passed = 0

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        groups: dict[str, list[Any]] = {}
        for item in items:
            groups.setdefault(item.nodeid.partition("[")[0], []).append(item)
        keep = set()
        for group in groups.values():
            step = max(1, -(-len(group) // CASES))
            keep.update(id(item) for item in group[::step])
        items[:] = [item for item in items if id(item) in keep]

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            self.failed.add(report.nodeid)
        elif report.passed and report.when == "call":
            self.passed += 1

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.failed.add(f"{report.nodeid} (collection)")


def _import_everything(packages: list[str]) -> list[str]:
    """Import every module of the older release, so that the push finds them all live."""
    imported = []
    for name in packages:
        top = importlib.import_module(name)
        imported.append(name)
        for info in pkgutil.walk_packages(getattr(top, "__path__", []), prefix=f"{name}."):
            if ".tests" in info.name:
                continue
            try:
                importlib.import_module(info.name)
            except Exception:  # an optional dependency the library guards itself  # noqa: BLE001
                continue
            imported.append(info.name)
    return imported


def _upgrade(spec: dict[str, Any]) -> dict[str, Any]:
    import overlay
    from support.overlay import tree_entries

    from overlay.bundle import build_bundle
    from overlay.keys import generate_signing_key

    store = Path(spec["store"])
    key = generate_signing_key(store.parent / "deploy_key")
    ov = overlay.install(packages=spec["packages"], trusted_keys=[key.public.line()], store=str(store),
                         app_id="lib")
    imported = _import_everything(spec["packages"])
    files: dict[str, tuple[str, bytes]] = {}
    for name in spec["packages"]:
        root = Path(spec["new"]) / name
        files.update((n, e) for n, e in tree_entries(root, Path(spec["new"])).items()
                     if ".tests" not in n and "/tests/" not in n)  # the suite runs from the sdist
    data = build_bundle(files, app_id="lib", version=1, signers=[key])
    try:
        report = ov.apply(data)
    except Exception as exc:  # noqa: BLE001  (the refusal is the result)
        return {"refused": f"{type(exc).__name__}: {exc}", "imported": len(imported),
                "traceback": getattr(exc, "remote_traceback", None) or traceback.format_exc()}
    reran = {m.module: m.reran for m in report.modules}
    return {"refused": None, "imported": len(imported), "reran": reran,
            "notes": {m.module: m.notes for m in report.modules if m.notes},
            "replaced": {m.module: m.replaced for m in report.modules if m.replaced},
            "apply_ms": report.timings_ms.get("apply")}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    result: dict[str, Any] = {}
    sys.path[:0] = [spec["old"] if spec["mode"] == "live" else spec["new"], *spec["path"]]
    if spec["mode"] == "live":
        result = _upgrade(spec)
        if result["refused"]:
            out.write_text(json.dumps(result))
            return
    import pytest

    outcomes = _Outcomes()
    code = pytest.main([spec["tests"], "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--import-mode=importlib",
                        "--rootdir", spec["rootdir"], "-o", "addopts=", "-W", "ignore::DeprecationWarning",
                        "--no-header", *(f"--deselect={t}" for t in spec["deselect"])], plugins=[outcomes])
    top = spec["packages"][0]
    version = eval(spec["version_of"], {top: sys.modules[top]})  # noqa: S307  (the test's own expression)
    result.update(failed=sorted(outcomes.failed), passed=outcomes.passed, exit=int(code), version=version,
                  files={n: getattr(m, "__file__", None) for n, m in sys.modules.items()
                         if n.partition(".")[0] in spec["packages"]})
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

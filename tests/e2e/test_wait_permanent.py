"""Probation through the real CLI: ``habanero-pack push --wait-permanent`` against the aiohttp
example run with ``HABANERO_PROBATION`` and ``HABANERO_HEALTH``: a healthy push becomes permanent
(exit 0); one whose health check answers 500 is reverted by the app itself (exit 1, with why), and
the app serves the last permanent version again."""

from __future__ import annotations

import pytest
from support.e2e import get_json, make_project, request, start_example, status_of

pytestmark = pytest.mark.slow  # a real app process and the real CLI

VIEWS = "hello/views.py"


def test_push_wait_permanent_exits_zero_when_permanent_and_non_zero_when_the_app_reverts_it(launcher, tmp_path):
    project = make_project(tmp_path)
    app = start_example(launcher, project, HABANERO_PROBATION="1", HABANERO_HEALTH="/")
    project.edit(VIEWS, '"Hello, world"', '"permanent one"')
    good = project.pack("push", app.url, "--wait-permanent")
    assert good.returncode == 0, good.stderr
    assert "v1 is permanent: it passed its probation" in good.stdout
    project.edit(VIEWS, 'return "permanent one"', 'raise RuntimeError("broken")')
    bad = project.pack("push", app.url, "--wait-permanent")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "v2 reverted: v2 failed its probation: the health check / answered HTTP 500" in bad.stderr
    assert "reverted to v1, the last permanent version" in bad.stderr
    assert get_json(app.url)["message"] == "permanent one"
    status = status_of(project, app.url)
    assert status["version"] == 1 and status["probation"]["state"] == "reverted"
    history = [(e["action"], e["version"], e["outcome"]) for e in status["history"]]
    assert history[-2:] == [("revert", 1, "ok"), ("probation", 2, "reverted")]
    assert request(app.url, "/").status == 200

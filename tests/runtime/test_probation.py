"""Probation: a pushed version becomes permanent when healthy, reverts by itself when not, and a
restart during probation boots the last permanent version.

In-process: an overlay serving ``upapp`` from a store in the test's directory, with a health check
the test turns on and off and a short window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

import overlay
from overlay.bundle import build_bundle
from overlay.storage.state import StateFile

WINDOW = 0.3
HEALTHY = [True]


def health() -> bool:
    return HEALTHY[0]


def version(n: int, key) -> bytes:
    return build_bundle({"upapp": ("package", f"VERSION = {n}\n".encode())}, app_id="upapp", version=n,
                        signers=[key])


@pytest.fixture
def installing(import_state, tmp_path, trusted_keys_file, monkeypatch) -> Iterator[Callable[..., overlay.Overlay]]:
    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE", "PROBATION", "GATE"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)
    HEALTHY[0] = True
    made: list[overlay.Overlay] = []

    def install(**kw) -> overlay.Overlay:
        kw.setdefault("probation", WINDOW)
        kw.setdefault("health", health)
        ov = overlay.install(packages=["upapp"], trusted_keys=trusted_keys_file, store=tmp_path / "store", **kw)
        made.append(ov)
        return ov

    try:
        yield install
    finally:
        for ov in made:
            ov.uninstall()


def verdict(ov: overlay.Overlay, version: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ov.status()["probation"]
        if state and state["version"] == version and state["state"] != "probation":
            return state
        time.sleep(0.02)
    raise AssertionError(f"no verdict on v{version}: {ov.status()['probation']}")


def test_a_healthy_version_becomes_permanent_when_its_window_passes(installing, signing_key):
    ov = installing()
    ov.apply(version(1, signing_key))
    assert ov.status()["probation"]["state"] == "probation"
    assert ov.store.on_probation() == (True, None)
    assert verdict(ov, 1)["state"] == "permanent"
    assert ov.store.on_probation() == (False, None)
    assert ov.history()[-1]["action"] == "probation" and ov.history()[-1]["outcome"] == "permanent"


def test_a_failing_health_check_reverts_every_process_to_the_last_permanent_version_and_says_why(
        installing, signing_key):
    ov = installing()
    ov.apply(version(1, signing_key))
    verdict(ov, 1)
    HEALTHY[0] = False
    ov.apply(version(2, signing_key))
    result = verdict(ov, 2)
    import upapp

    assert result["state"] == "reverted"
    assert "health check" in result["reason"] and "returned a false value" in result["reason"]
    assert "reverted to v1, the last permanent version" in result["reason"]
    assert ov.version == 1 and upapp.VERSION == 1 and ov.store.pointer()[0]["version"] == 1
    actions = [(e["action"], e["version"], e["outcome"]) for e in ov.history()[-2:]]
    assert actions == [("revert", 1, "ok"), ("probation", 2, "reverted")]
    assert 2 in [v for v, _ in ov.store.stored()]  # kept: it can be rolled forward to again
    HEALTHY[0] = True
    ov.rollback(to=2)
    assert upapp.VERSION == 2


def test_requests_failing_above_the_previous_versions_rate_revert_it(installing, signing_key):
    ov = installing(health=None, probation=1.0)
    ov.apply(version(1, signing_key))
    verdict(ov, 1)
    for _ in range(20):  # v1: every unit of work succeeds
        with ov.running():
            pass
    ov.apply(version(2, signing_key))
    for _ in range(5):  # v2: they fail
        with pytest.raises(RuntimeError), ov.running():
            raise RuntimeError("v2 is broken")
    result = verdict(ov, 2)
    assert result["state"] == "reverted" and "5 of 5 requests failed (100%), above the previous version's 0%" \
        in result["reason"]
    assert ov.version == 1


def test_a_restart_during_probation_boots_the_last_permanent_version_and_keeps_the_other(
        installing, signing_key, tmp_path):
    ov = installing()
    ov.apply(version(1, signing_key))
    verdict(ov, 1)
    ov.probation.seconds = 60  # the next push is still on probation when the app stops
    ov.apply(version(2, signing_key))
    state = json.loads((tmp_path / "store" / "state.json").read_text())
    assert state["active"]["version"] == 2 and state["permanent"]["version"] == 1 and state["format"] == 2
    ov.uninstall()

    again = installing()
    import upapp

    assert again.version == 1 and upapp.VERSION == 1
    assert again.store.pointer() == ({"version": 1, "digest": again.active.digest}, 2)  # the mark stays
    probation = again.status()["probation"]
    assert probation["state"] == "reverted" and "restarted while v2 was on probation" in probation["reason"]
    assert 2 in [v for v, _ in again.store.stored()]
    again.probation.seconds = 60
    again.rollback(to=2)  # rolled forward to again: an operator's choice is permanent
    assert upapp.VERSION == 2 and again.store.on_probation() == (False, None)


def test_a_state_file_without_the_probation_field_has_every_version_permanent(tmp_path, installing, signing_key):
    ov = installing(probation=0)
    ov.apply(version(1, signing_key))
    raw = json.loads((tmp_path / "store" / "state.json").read_text())
    assert set(raw) == {"format", "app_id", "active", "highest"} and raw["format"] == 1  # as older habanero wrote
    state, why = StateFile(str(tmp_path / "store" / "state.json"), "upapp").read()
    assert why == "" and state is not None and "permanent" not in state
    assert ov.store.on_probation() == (False, None)
    assert ov.status()["probation"] is None


def test_a_health_that_is_neither_a_callable_nor_a_path_is_refused_with_the_fix(installing):
    with pytest.raises(overlay.ConfigError, match="pass a callable .* or a URL path of the app's own"):
        installing(health="healthz")


def test_probation_with_a_fleet_channel_is_refused_at_install_with_the_way_out(installing):
    with pytest.raises(overlay.ConfigError) as refused:
        installing(channel="redis://127.0.0.1:1/0")

    assert refused.value.code == "bad_config"
    assert "probation= cannot be combined with channel=" in str(refused.value)
    assert "HABANERO_PROBATION=0" in str(refused.value)

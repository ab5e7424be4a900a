"""The store: durable versions, the never-decreasing mark, fallbacks at start, retention, the tree."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlay.bundle import Bundle, ParentManifest, build_bundle, open_bundle
from overlay.errors import BadEntryName, StaleVersion, StoreError, WrongApp
from overlay.keys import SigningKey, TrustedKeys, generate_signing_key
from overlay import store as store_module
from overlay.storage import tree as _trees
from overlay.storage.tree import SourceTree
from overlay.store import Store

APP = "shop"


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return generate_signing_key(tmp_path / "keys" / "dev")


@pytest.fixture
def other_key(tmp_path: Path) -> SigningKey:
    return generate_signing_key(tmp_path / "keys" / "other")


@pytest.fixture
def trusted(key: SigningKey, other_key: SigningKey) -> TrustedKeys:
    return TrustedKeys([key.public, other_key.public], source="test keys")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def opener(store_dir: Path, trusted: TrustedKeys) -> Iterator[Callable[..., Store]]:
    """Open the store under test (as many times as a test likes); close them all afterwards."""
    opened: list[Store] = []

    def open_store(**kwargs: object) -> Store:
        kwargs.setdefault("trusted", trusted)
        kwargs.setdefault("app_id", APP)
        store = Store.open(store_dir, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def make(key: SigningKey, version: int, files: dict[str, tuple[str, bytes]] | None = None,
         app_id: str = APP) -> Bundle:
    files = files or {
        "shop": ("package", f"VERSION = {version}\n".encode()),
        "shop.mod": ("module", b"def f():\n    return 1\n"),
        "shop/templates/x.html": ("data", b"<p>hi</p>\n"),
    }
    data = build_bundle(files, app_id=app_id, version=version, signers=[key])
    return open_bundle(data, TrustedKeys([key.public]), app_id=app_id)


def push(store: Store, bundle: Bundle) -> None:
    store.check_fresh(bundle)
    store.stage(bundle)
    store.commit(bundle)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for directories): to prove nothing changed.
    Temp files are left out: the store's worker removes those of earlier commits when it gets to it."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*")) if not p.name.startswith(".tmp-")}


def bundle_file(store_dir: Path, bundle: Bundle) -> Path:
    (path,) = (store_dir / "bundles").glob(f"*{bundle.version}-{bundle.digest}.hbn")
    return path


def flip_last_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ round trip


def test_committed_bundle_is_active_after_reopen_with_same_highest(opener, store_dir, key):
    store = opener()
    assert store.active is None and store.highest == 0 and store.startup_problems == []
    bundle = make(key, 1)
    staged = store.stage(bundle)
    assert staged.read_bytes() == bundle.raw
    assert store.active is None, "stage() must not activate"
    store.commit(bundle)
    store.close()

    again = opener()
    assert again.active is not None
    assert (again.active.version, again.active.digest) == (1, bundle.digest)
    assert again.highest == 1
    assert again.startup_problems == []
    assert again.stored() == [(1, bundle.digest)]
    file = bundle_file(store_dir, bundle)
    assert f"{bundle.version:010d}" in file.name and bundle.digest in file.name
    state = json.loads((store_dir / "state.json").read_text())
    assert state == {"format": 1, "app_id": APP, "active": {"version": 1, "digest": bundle.digest},
                     "highest": 1}


def test_store_directory_is_private_and_documented_parts_exist(opener, store_dir):
    opener()
    assert store_dir.stat().st_mode & 0o777 == 0o700
    for part in ("bundles", "objects", "lock"):
        assert (store_dir / part).exists()


def test_open_refuses_a_path_that_cannot_be_a_directory(tmp_path, trusted):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        Store.open(blocker / "store", trusted=trusted, app_id=APP)
    assert info.value.code == "store_error"
    assert str(blocker / "store") in info.value.message


def test_store_of_another_app_is_refused_at_open(opener, key):
    push(opener(), make(key, 1))
    with pytest.raises(StoreError) as info:
        opener(app_id="billing")
    assert info.value.code == "store_app_mismatch"


def test_bundle_of_another_app_is_refused_by_stage(opener, key):
    with pytest.raises(WrongApp):
        opener().stage(make(key, 1, app_id="billing"))


# ------------------------------------------------------------------------------ freshness


@pytest.mark.parametrize("version", [3, 2, 1])
def test_replayed_or_older_version_is_refused_and_nothing_written(opener, store_dir, key, version):
    store = opener()
    push(store, make(key, 1))
    push(store, make(key, 3))
    before = snapshot(store_dir)
    replay = make(key, version) if version != 3 else open_bundle(
        bundle_file(store_dir, store.active).read_bytes(), store.trusted, app_id=APP)

    for attempt in (store.check_fresh, store.commit):
        with pytest.raises(StaleVersion) as info:
            attempt(replay)
        assert info.value.code == "stale_version"
        assert f"version {version} is not newer than 3" in info.value.message
        assert "push version 4 or later" in info.value.message
    if version == 3:  # the very bundle already stored: stage() has nothing to write
        assert store.stage(replay) == bundle_file(store_dir, replay)
    else:
        with pytest.raises(StaleVersion):
            store.stage(replay)
    assert snapshot(store_dir) == before
    assert store.highest == 3


def test_version_jump_past_the_cap_is_refused(opener, store_dir, key):
    store = opener(max_version_jump=10)
    push(store, make(key, 1))
    before = snapshot(store_dir)
    with pytest.raises(StaleVersion) as info:
        store.check_fresh(make(key, 12))
    assert info.value.code == "version_jump_too_large"
    assert "reset_highest" in info.value.message
    with pytest.raises(StaleVersion):
        store.stage(make(key, 10**18))
    assert snapshot(store_dir) == before
    store.check_fresh(make(key, 11))  # exactly at the cap is fine


def test_a_push_committed_by_another_store_object_makes_ours_stale(opener, key):
    first, second = opener(), opener()
    push(first, make(key, 1))
    late = make(key, 1, files={"shop": ("package", b"other = True\n")})
    with pytest.raises(StaleVersion):
        second.check_fresh(late)
    second.check_fresh(make(key, 2))
    stage_then_lose = make(key, 2)
    second.stage(stage_then_lose)
    push(first, make(key, 2, files={"shop": ("package", b"first = True\n")}))
    with pytest.raises(StaleVersion):  # re-checked under the lock at commit
        second.commit(stage_then_lose)


def test_reset_highest_is_recorded_and_reopens_with_the_new_mark(opener, key):
    store = opener()
    push(store, make(key, 1))
    store.reset_highest(500)
    store.check_fresh(make(key, 501))
    store.reset_highest(1)
    assert opener().highest == 1
    entry = store.history()[-1]
    assert entry["action"] == "reset_highest" and entry["version"] == 1 and entry["outcome"] == "ok"
    assert "500 -> 1" in entry["reason"]


def test_reset_highest_refuses_to_go_below_the_active_version(opener, key):
    store = opener()
    push(store, make(key, 1))
    push(store, make(key, 2))
    with pytest.raises(StoreError) as info:
        store.reset_highest(1)
    assert info.value.code == "bad_highest"
    assert store.highest == 2


def test_reset_highest_drops_bundles_above_the_new_mark(opener, key):
    store = opener()
    push(store, make(key, 1))
    push(store, make(key, 900))
    store.commit(store.load(1), action="rollback")
    store.reset_highest(1)
    assert [v for v, _ in store.stored()] == [1]
    push(store, make(key, 2))
    assert opener().active.version == 2


def test_highest_never_decreases_on_rollback(opener, key):
    store = opener()
    for version in (1, 2, 3):
        push(store, make(key, version))
    store.commit(store.previous(), action="rollback")
    assert (store.active.version, store.highest) == (2, 3)
    reopened = opener()
    assert (reopened.active.version, reopened.highest) == (2, 3)
    with pytest.raises(StaleVersion):
        reopened.check_fresh(make(key, 3))


def test_rollback_target_must_already_be_stored(opener, key):
    store = opener()
    push(store, make(key, 2))
    with pytest.raises(StoreError) as info:
        store.commit(make(key, 1), action="rollback")
    assert info.value.code == "unknown_version"


def test_load_of_an_absent_version_says_which_are_stored(opener, key):
    store = opener()
    push(store, make(key, 1))
    with pytest.raises(StoreError) as info:
        store.load(7)
    assert info.value.code == "unknown_version"
    assert "stored versions: 1" in info.value.message


# ------------------------------------------------------------------------------ history


def test_history_records_push_rollback_and_failure_with_key_ids(opener, key, other_key):
    store = opener()
    v1, v2 = make(key, 1), make(other_key, 2)
    push(store, v1)
    push(store, v2)
    store.commit(store.previous(), action="rollback")
    store.record_failure(action="push", version=3, digest="ab" * 32, key_ids=[key.key_id],
                         code="activation_failed", reason="ImportError in shop.mod")

    entries = opener().history()
    assert [(e["action"], e["version"], e["outcome"]) for e in entries] == [
        ("push", 1, "ok"), ("push", 2, "ok"), ("rollback", 1, "ok"), ("push", 3, "failed")]
    assert entries[1]["key_ids"] == [other_key.key_id] and entries[1]["digest"] == v2.digest
    assert entries[2]["key_ids"] == [key.key_id] and entries[2]["digest"] == v1.digest
    assert entries[3]["code"] == "activation_failed" and "ImportError" in entries[3]["reason"]
    assert all(e["time"].endswith("Z") and "T" in e["time"] for e in entries)
    assert store.history(limit=1) == entries[-1:]


def test_record_failure_changes_nothing_but_the_history(opener, store_dir, key):
    store = opener()
    push(store, make(key, 1))
    state = (store_dir / "state.json").read_bytes()
    store.record_failure(action="push", version=2, digest=None, key_ids=[], code="syntax_error",
                         reason="bad")
    assert (store_dir / "state.json").read_bytes() == state and store.stored() == [(1, store.active.digest)]


def test_torn_history_line_is_skipped_and_the_next_entry_survives(opener, store_dir, key):
    store = opener()
    push(store, make(key, 1))
    with open(store_dir / "history.jsonl", "ab") as fh:
        fh.write(b'{"time": "2024-01-01T00:00:00Z", "act')  # a crash mid-append
    assert [e["version"] for e in store.history()] == [1]
    push(store, make(key, 2))
    assert [e["version"] for e in opener().history()] == [1, 2]


# ------------------------------------------------------------------------------ recovery at start


def test_corrupt_active_bundle_falls_back_to_the_previous_that_verifies(opener, store_dir, key, caplog):
    store = opener()
    bundles = [make(key, v) for v in (1, 2, 3)]
    for bundle in bundles:
        push(store, bundle)
    store.close()
    flip_last_byte(bundle_file(store_dir, bundles[2]))
    flip_last_byte(bundle_file(store_dir, bundles[1]))

    reopened = opener()
    assert reopened.active is not None and reopened.active.digest == bundles[0].digest
    assert reopened.highest == 3
    assert "v3" in reopened.startup_problems[0] and "serving v1" in reopened.startup_problems[0]
    assert any("v2" in p for p in reopened.startup_problems[1:])
    assert any(r.levelname == "ERROR" and "v3" in r.getMessage() for r in caplog.records)
    with pytest.raises(StaleVersion):  # the mark did not move back with the fallback
        reopened.check_fresh(make(key, 3))


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage", "torn", "duplicate keys", "wrong type"])
def test_damaged_state_file_falls_back_to_the_newest_bundle_that_verifies(opener, store_dir, key, damage):
    store = opener()
    for version in (1, 2, 3):
        push(store, make(key, version))
    store.close()
    state = store_dir / "state.json"
    good = state.read_text()
    state.write_text({
        "missing": "", "empty": "", "garbage": "\x00\x01not json",
        "torn": good[: len(good) // 2],
        "duplicate keys": good.replace('"highest": 3', '"highest": 3, "highest": 0'),
        "wrong type": good.replace('"highest": 3', '"highest": "3"'),
    }[damage])
    if damage == "missing":
        state.unlink()

    reopened = opener()
    assert reopened.active is not None and reopened.active.version == 3
    assert reopened.highest == 3
    assert len(reopened.startup_problems) == 1 and "state file" in reopened.startup_problems[0]


def test_missing_state_after_a_rollback_serves_the_rolled_back_to_version(opener, store_dir, key):
    store = opener()
    for version in (1, 2):
        push(store, make(key, version))
    store.commit(store.previous(), action="rollback")
    store.close()
    (store_dir / "state.json").unlink()
    reopened = opener()
    assert (reopened.active.version, reopened.highest) == (1, 2)


def test_every_bundle_corrupt_serves_the_code_on_disk_and_still_starts(opener, store_dir, key):
    store = opener()
    for version in (1, 2):
        push(store, make(key, version))
    store.close()
    for path in (store_dir / "bundles").iterdir():
        flip_last_byte(path)
    (store_dir / "state.json").write_text("{")

    reopened = opener()
    assert reopened.active is None
    assert reopened.highest == 2
    assert "serving the code on disk" in reopened.startup_problems[0]
    push(reopened, make(key, 3))  # and a new push repairs the store
    assert opener().startup_problems == []


def test_bundles_signed_by_a_removed_key_are_no_longer_served(opener, key, other_key):
    store = opener()
    push(store, make(other_key, 1))
    push(store, make(key, 2))
    only_other = opener(trusted=TrustedKeys([other_key.public]))
    assert only_other.active.version == 1
    assert "unknown_key" in only_other.startup_problems[0]
    nobody = opener(trusted=TrustedKeys([]))
    assert nobody.active is None and nobody.highest == 2


def test_fresh_store_opens_without_problems(opener):
    store = opener()
    assert (store.active, store.highest, store.startup_problems, store.stored()) == (None, 0, [], [])


def test_leftovers_of_interrupted_writes_are_removed_at_open(opener, store_dir, key):
    store = opener()
    push(store, make(key, 1))
    unfinished = make(key, 2)
    store.stage(unfinished)
    store.close()
    (store_dir / ".tmp-abc123").write_bytes(b"half a state file")
    (store_dir / "bundles" / ".tmp-def456").write_bytes(b"half a bundle")
    (store_dir / "objects" / ".tmp-789").write_bytes(b"half an object")
    (store_dir / "tree" / "shop").mkdir(parents=True)  # the one shared tree of an older habanero
    (store_dir / "tree" / "shop" / ".tmp-link").write_bytes(b"a link a push did not rename yet")
    promoted = make(key, 3)  # promoted to bundles/ by a commit killed before its pointer flip
    (store_dir / "bundles" / f"{3:010d}-{promoted.digest}.hbn").write_bytes(promoted.raw)

    reopened = opener()
    reopened.settle()  # the old tree is taken out of the way at once, deleted on the worker
    assert reopened.startup_problems == []
    assert reopened.active.version == 1 and reopened.stored() == [(1, reopened.active.digest)]
    assert not (store_dir / "tree").exists()
    names = {p.name for p in store_dir.rglob("*")}
    assert not any(name.startswith(".tmp-") for name in names)
    assert list((store_dir / "staged").iterdir()) == []
    push(reopened, make(key, 2))  # the interrupted version number is still free


def test_commit_works_when_the_staged_file_vanished(opener, key):
    first = opener()
    bundle = make(key, 1)
    first.stage(bundle)
    opener()  # another process starting up clears staged/
    first.commit(bundle)
    assert opener().active.digest == bundle.digest


# ------------------------------------------------------------------------------ retention


def test_retention_keeps_the_last_n_and_always_the_active_and_the_one_before(opener, store_dir, key):
    store = opener(keep=1)
    bundles = {v: make(key, v, files={"shop": ("package", f"V = {v}\n".encode()),
                                      "shop.same": ("module", b"SAME = 1\n")}) for v in range(1, 6)}
    for version in (1, 2, 3, 4):
        push(store, bundles[version])
    store.settle()  # retention runs on the worker, after the commit has answered
    assert [v for v, _ in store.stored()] == [3, 4]  # the last 1, plus the one before the active

    store.commit(store.previous(), action="rollback")
    store.settle()
    assert [v for v, _ in store.stored()] == [3, 4]  # active 3 is not among the last 1, but kept
    push(store, bundles[5])
    store.settle()
    assert [v for v, _ in store.stored()] == [4, 5]


def test_retention_runs_after_the_commit_not_inside_it(opener, key):
    store = opener(keep=1)
    for version in (1, 2):
        push(store, make(key, version))
    store.settle()
    gate = threading.Event()
    store.later(gate.wait)  # hold the worker
    try:
        push(store, make(key, 3))
        assert [v for v, _ in store.stored()] == [1, 2, 3], "the commit dropped nothing itself"
    finally:
        gate.set()
    store.settle()
    assert [v for v, _ in store.stored()] == [2, 3]


def objects_in(store_dir: Path) -> set[str]:
    return {p.name for p in (store_dir / "objects").rglob("*") if p.is_file()}


def test_objects_of_dropped_versions_are_swept_in_the_background_and_kept_ones_stay(
        opener, store_dir, key, monkeypatch):
    monkeypatch.setattr(store_module, "SWEEP_EVERY", 2)
    store = opener(keep=1)
    bundles = {v: make(key, v, files={"shop": ("package", f"V = {v}\n".encode()),
                                      "shop.same": ("module", b"SAME = 1\n")}) for v in range(1, 6)}
    for version in (1, 2, 3):
        push(store, bundles[version])
    store.settle()
    assert {e.sha256 for e in bundles[1].entries.values()} <= objects_in(store_dir), \
        "one drop is below SWEEP_EVERY: nothing swept yet"
    push(store, bundles[4])  # the second drop: a sweep runs on the worker
    store.settle()
    kept = {e.sha256 for v in (3, 4) for e in bundles[v].entries.values()}
    gone = {e.sha256 for v in (1, 2) for e in bundles[v].entries.values()} - kept
    assert kept <= objects_in(store_dir)
    assert gone and not gone & objects_in(store_dir), "objects only dropped versions used must go"
    store.close()
    reopened = opener(keep=1)  # and every stored delta still opens from what is left
    assert reopened.load(3).read("shop") == b"V = 3\n" and reopened.startup_problems == []


def test_a_sweep_never_takes_the_objects_of_a_push_staged_meanwhile(opener, store_dir, key):
    store = opener(keep=0)
    push(store, make(key, 1))
    staged = make(key, 2, files={"shop": ("package", b"NEW = 2\n")})
    with store._lock:  # white box: the sweep reads manifests outside the lock, deletes under it
        sweep = threading.Thread(target=store._sweep_objects)
        sweep.start()
        time.sleep(0.05)
        store.stage(staged)
    sweep.join(10)
    assert {e.sha256 for e in staged.entries.values()} <= objects_in(store_dir)
    store.commit(staged)
    assert opener().active.digest == staged.digest


def test_default_retention_keeps_twenty(opener, key):
    store = opener()
    for version in range(1, 24):
        push(store, make(key, version))
    store.settle()
    assert [v for v, _ in store.stored()] == list(range(4, 24))


# ------------------------------------------------------------------------------ trees


def tree_of(store: Store) -> SourceTree:
    """A source tree laid out from ``store`` (a process's own, outside the store as a slot's is)."""
    return store.source_tree(store.path.parent / "w0" / "tree")


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_tree_lays_out_every_entry_as_read_only_files(opener, key):
    store = opener()
    bundle = make(key, 1, files={
        "shop": ("package", b"A = 1\n"),
        "shop.mod": ("module", b"B = 2\n"),
        "shop.sub": ("package", b""),
        "shop.sub.deep": ("module", b"C = 3\n"),
        "shop/templates/x.html": ("data", b"<p>x</p>\n"),
    })
    push(store, bundle)
    tree_of(store).update(None, bundle)
    root = tree_of(store).root
    assert tree_files(root) == {"shop/__init__.py": b"A = 1\n", "shop/mod.py": b"B = 2\n",
                                "shop/sub/__init__.py": b"", "shop/sub/deep.py": b"C = 3\n",
                                "shop/templates/x.html": b"<p>x</p>\n"}
    assert all(p.stat().st_mode & 0o777 == 0o444 for p in root.rglob("*") if p.is_file())
    assert not [p for p in root.rglob(".tmp-*")]


def test_a_one_file_change_rewrites_that_file_only_and_its_undo_puts_it_back(opener, key):
    store = opener()
    files = {"shop": ("package", b"")} | {f"shop.m{i}": ("module", f"X = {i}\n".encode()) for i in range(50)}
    v1 = make(key, 1, files=files)
    v2 = make(key, 2, files=files | {"shop.m7": ("module", b"X = 'changed'\n")})
    push(store, v1)
    tree_of(store).update(None, v1)
    root = tree_of(store).root
    inodes = {p.name: p.stat().st_ino for p in (root / "shop").iterdir()}
    store.stage(v2)
    undo = tree_of(store).update(v1, v2)
    assert (root / "shop/m7.py").read_bytes() == b"X = 'changed'\n"
    after = {p.name: p.stat().st_ino for p in (root / "shop").iterdir()}
    assert {n for n in inodes if inodes[n] != after[n]} == {"m7.py"}
    undo()
    assert tree_files(root) == {v1.entries[n].path: v1.read(n) for n in v1.entries}


def test_a_removed_module_leaves_the_tree_with_its_empty_directory_and_the_undo_restores_it(opener, key):
    # An empty directory left behind would import as a namespace package of the same name.
    store = opener()
    files = {"shop": ("package", b""), "shop.sub": ("package", b"S = 1\n"),
             "shop.sub.deep": ("module", b"D = 1\n"), "shop.mod": ("module", b"M = 1\n")}
    v1 = make(key, 1, files=files)
    v2 = make(key, 2, files={"shop": files["shop"], "shop.mod": ("module", b"M = 2\n")})
    push(store, v1)
    tree_of(store).update(None, v1)
    store.stage(v2)
    undo = tree_of(store).update(v1, v2)
    assert tree_files(tree_of(store).root) == {"shop/__init__.py": b"", "shop/mod.py": b"M = 2\n"}
    assert not (tree_of(store).root / "shop" / "sub").exists()
    undo()
    assert tree_files(tree_of(store).root) == {v1.entries[n].path: v1.read(n) for n in v1.entries}


def test_a_module_that_becomes_a_package_moves_its_file(opener, key):
    store = opener()
    v1 = make(key, 1, files={"shop": ("package", b""), "shop.mod": ("module", b"X = 1\n")})
    v2 = make(key, 2, files={"shop": ("package", b""), "shop.mod": ("package", b"X = 1\n")})
    push(store, v1)
    tree_of(store).update(None, v1)
    store.stage(v2)
    tree_of(store).update(v1, v2)
    assert tree_files(tree_of(store).root) == {"shop/__init__.py": b"", "shop/mod/__init__.py": b"X = 1\n"}


@pytest.mark.parametrize("evil", ["shop/../../escaped.py", "{tmp}/escaped.py", "../escaped.py", "."])
def test_tree_refuses_an_entry_path_outside_the_tree(opener, store_dir, tmp_path, key, evil):
    """bundle.py refuses such names; the store must not trust that alone (defence in depth)."""
    evil = evil.format(tmp=tmp_path)
    store = opener()
    bundle = make(key, 1)
    push(store, bundle)
    entry = bundle.entries["shop.mod"]._replace(name=evil, kind="data")
    forged = Bundle(bundle.manifest, bundle.manifest_bytes, bundle.raw, bundle.key_ids,
                    {**bundle.entries, evil: entry}, bundle.bodies)
    with pytest.raises(BadEntryName):
        tree_of(store).update(None, forged)
    assert not list(tmp_path.rglob("escaped.py"))
    assert tree_files(tree_of(store).root) == {}, "the steps done before the refusal are undone"


def test_cache_dir_is_created_inside_the_store(opener, store_dir):
    assert opener().cache_dir == store_dir / "pycache" and (store_dir / "pycache").is_dir()


# ------------------------------------------------------------------------------ two writers


@dataclass
class HeldLock:
    let_go: threading.Event  # set by the test (or its teardown) to release the lock early
    released: threading.Event  # set right before the lock is released


@pytest.fixture
def held_lock(store_dir: Path) -> Iterator[Callable[..., HeldLock]]:
    """Hold <store>/lock from another open file description (as another process would), for
    ``seconds`` or until the test ends. ``released`` is set just before the lock goes: a call that
    returns with it unset did not wait for the lock, one that returns with it set did (the order of
    events proves it, however slow the machine)."""
    held: list[tuple[HeldLock, threading.Thread]] = []

    def hold(seconds: float = 30.0) -> HeldLock:
        lock = HeldLock(threading.Event(), threading.Event())
        locked = threading.Event()

        def run() -> None:
            fd = os.open(store_dir / "lock", os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked.set()
            lock.let_go.wait(seconds)
            lock.released.set()
            os.close(fd)

        thread = threading.Thread(target=run)
        thread.start()
        held.append((lock, thread))
        assert locked.wait(5)
        return lock

    yield hold
    for lock, thread in held:
        lock.let_go.set()
        thread.join()


def test_a_second_writer_waits_for_the_lock(opener, key, held_lock):
    store = opener()
    push(store, make(key, 1))
    lock = held_lock(0.4)
    push(store, make(key, 2))
    assert lock.released.is_set(), "the push went through while another writer held the lock"
    assert opener().active.version == 2


def test_a_writer_gives_up_with_store_locked_after_its_timeout(opener, key, held_lock):
    store = opener(lock_timeout=0.1)
    held_lock()  # until the test ends: the writer cannot get it, however late it tries
    with pytest.raises(StoreError) as info:
        store.record_failure(action="push", version=1, digest=None, key_ids=[], code="x", reason="y")
    assert info.value.code == "store_locked" and "lock" in info.value.message


def test_readers_and_open_never_wait_for_a_writer(opener, key, held_lock):
    store = opener()
    push(store, make(key, 1))
    tree_of(store).update(None, store.active)
    lock = held_lock()  # released at teardown, or after 30 s if a reader waited for it
    other = opener()
    assert other.active.version == 1
    assert other.history() and other.stored() and other.load(1)
    tree = other.source_tree(other.path / "another-process-tree")
    tree.lay_out(other.active)  # a process starting up lays out its own tree: no lock either
    assert (tree.root / "shop" / "mod.py").read_bytes() == other.active.read("shop.mod")
    assert not lock.released.is_set(), "a reader waited for the writer's lock"


def test_two_store_objects_racing_for_each_version_accept_exactly_one(opener, key):
    stores = [opener(), opener()]
    winners: dict[int, list[int]] = {}
    barrier = threading.Barrier(2, timeout=10)

    def run(i: int) -> None:
        for version in range(1, 7):
            bundle = make(key, version, files={"shop": ("package", f"WRITER = {i}\n".encode())})
            barrier.wait()
            try:
                push(stores[i], bundle)
                winners.setdefault(version, []).append(i)
            except StaleVersion:
                pass

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {v: len(w) for v, w in winners.items()} == {v: 1 for v in range(1, 7)}
    final = opener()
    assert final.highest == 6 and final.startup_problems == []
    assert [e["version"] for e in final.history()] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------ trees after a crash


@pytest.mark.parametrize("damage", ["truncate", "remove", "another version's file", "object removed"])
def test_a_damaged_tree_or_object_is_repaired_when_the_tree_is_laid_out(opener, store_dir, key, damage):
    # A tree is derived data and not fsynced, and a crash mid-push leaves the files of a version
    # that never committed; objects are not fsynced either: laying out a tree checks it file by
    # file against the (verified) active bundle and writes what is wrong again.
    store = opener()
    bundle = make(key, 1)
    push(store, bundle)
    tree_of(store).update(None, bundle)
    victim = tree_of(store).root / "shop" / "mod.py"
    if damage == "truncate":
        os.chmod(victim, 0o644)
        victim.write_bytes(b"")
    elif damage == "remove":
        victim.unlink()
    elif damage == "object removed":  # objects are not fsynced either (sync="background")
        sha = bundle.entries["shop.mod"].sha256
        (store_dir / "objects" / sha[:2] / sha).unlink()
    else:  # a push that never committed: its files, as habanero wrote them
        v2 = make(key, 2, files={"shop": ("package", b"VERSION = 2\n"), "shop.mod": ("module", b"M = 2\n"),
                                 "shop.added": ("module", b"X = 'never committed'\n"),
                                 "shop/templates/new.html": ("data", b"<p>new</p>\n")})
        store.stage(v2)
        tree_of(store).update(bundle, v2)
    store.close()
    reopened = opener()
    assert reopened.active is not None and reopened.active.digest == bundle.digest
    tree_of(reopened).lay_out(reopened.active)
    assert tree_files(tree_of(reopened).root) == {bundle.entries[n].path: bundle.read(n) for n in bundle.entries}
    assert all(reopened.object(e.sha256) == bundle.read(n) for n, e in bundle.entries.items())


def test_history_read_incrementally_sees_appends_from_another_store_object(opener, key):
    first, second = opener(), opener()
    push(first, make(key, 1))
    assert [e["version"] for e in second.history()] == [1]
    push(first, make(key, 2))
    first.record_failure(action="push", version=3, digest=None, key_ids=[], code="syntax_error", reason="x")
    assert [(e["version"], e["outcome"]) for e in second.history()] == [(1, "ok"), (2, "ok"), (3, "failed")]
    assert second.history(1)[0]["code"] == "syntax_error"


def test_a_commit_never_waits_on_the_background_clean_up(opener, key, monkeypatch):
    # Retention hands a sweep of objects to a worker that needs the store lock; a commit holds that
    # lock while it prunes, so it must never wait for the worker (that would deadlock).
    monkeypatch.setattr(store_module, "SWEEP_EVERY", 1)
    store = opener(keep=1)

    def version(v: int) -> Bundle:
        bundle = make(key, v, files={"shop": ("package", f"V = {v}\n".encode())})
        store.stage(bundle)
        return bundle

    for v in (1, 2, 3):
        store.commit(version(v))
    done = threading.Event()

    def two_prunes_under_the_lock() -> None:
        with store._lock:  # white box: as a commit holds it while retention runs
            store.commit(version(4))  # drops v2: the worker now waits for the lock
            store.commit(version(5))  # drops v3: must not wait for that worker
        done.set()

    worker = threading.Thread(target=two_prunes_under_the_lock, daemon=True)
    worker.start()
    worker.join(30)
    assert done.is_set(), "a commit waited on the clean-up worker"
    store.settle()
    assert [v for v, _ in store.stored()] == [4, 5]


# ------------------------------------------------------------------------------ sync modes


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of what gets fsynced, in order (a file's name via /proc/self/fd); ``fsynced.here``
    holds those the test's own thread did (not the store's worker)."""
    calls = _Fsynced()
    real = os.fsync

    def recording(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(path)
        if threading.current_thread() is threading.main_thread():
            calls.here.append(path)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


class _Fsynced(list):
    def __init__(self) -> None:
        super().__init__()
        self.here: list[str] = []

    def clear(self) -> None:
        super().clear()
        self.here.clear()


def test_sync_background_answers_before_any_fsync_and_flushes_right_after(opener, store_dir, key, fsynced):
    store = opener()  # sync="background" is the default
    push(store, make(key, 1))
    store.settle()
    fsynced.clear()
    bundle = make(key, 2)
    store.stage(bundle)
    store.commit(bundle)
    assert fsynced.here == [], "a background-sync commit waits for no disk flush"
    store.settle()
    changed = bundle.entries["shop"].sha256
    assert {str(bundle_file(store_dir, bundle)), str(store_dir / "state.json"), str(store_dir / "history.jsonl"),
            str(store_dir / "objects" / changed[:2] / changed), str(store_dir / "bundles"),
            str(store_dir)} <= set(fsynced)


def test_sync_commit_fsyncs_before_the_commit_returns(opener, store_dir, key, fsynced):
    store = opener(sync="commit")
    push(store, make(key, 1))
    store.settle()
    fsynced.clear()
    bundle = make(key, 2)
    store.stage(bundle)
    staged = list(fsynced)
    store.commit(bundle)
    # Temp files are fsynced before their rename: the object, the staged bundle, then state.json.
    assert len([p for p in staged if ".tmp-" in p]) == 2 and str(store_dir / "objects") in staged[-1]
    committed = fsynced[len(staged):]
    assert str(store_dir / "bundles") in committed and str(store_dir) in committed
    assert str(store_dir / "history.jsonl") in committed
    store.settle()
    assert len(fsynced) == len(staged) + len(committed), "nothing is left for the worker"


def test_an_unknown_sync_mode_is_refused(opener):
    with pytest.raises(ValueError, match="sync must be one of"):
        opener(sync="sometimes")


def test_a_relative_store_path_with_dot_dot_lays_out_its_tree(tmp_path, trusted, key, monkeypatch):
    (tmp_path / "app").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    with Store.open("../store", trusted=trusted, app_id=APP) as store:
        bundle = make(key, 1)
        push(store, bundle)
        tree_of(store).update(None, bundle)
        assert tree_of(store).root == tmp_path / "w0" / "tree"  # normalised: paths are checked against it
        assert tree_files(tree_of(store).root)["shop/mod.py"] == bundle.read("shop.mod")


def test_an_undo_that_cannot_restore_one_file_still_restores_the_others(opener, store_dir, key):
    store = opener()
    files = {"shop": ("package", b""), "shop.a": ("module", b"A = 1\n"), "shop.b": ("module", b"B = 1\n")}
    v1 = make(key, 1, files=files)
    v2 = make(key, 2, files={**files, "shop.a": ("module", b"A = 2\n"), "shop.b": ("module", b"B = 2\n")})
    push(store, v1)
    tree_of(store).update(None, v1)
    store.stage(v2)
    undo = tree_of(store).update(v1, v2)
    lost = v1.entries["shop.b"].sha256  # the object the undo needs for shop/b.py
    (store_dir / "objects" / lost[:2] / lost).unlink()
    with pytest.raises(OSError):
        undo()
    assert (tree_of(store).root / "shop" / "a.py").read_bytes() == b"A = 1\n"


def test_a_background_commit_frees_the_replaced_state_file_on_the_worker(opener, store_dir, key, monkeypatch):
    # Replacing state.json frees the old file's blocks inside the rename (~0.2 ms on ext4); a
    # commit keeps it under a temp name instead and the worker unlinks that after its flush.
    store = opener()
    push(store, make(key, 1))
    store.settle()
    gate = threading.Event()
    store.later(gate.wait)  # hold the worker so what it would do next is visible
    old_state = (store_dir / "state.json").read_bytes()
    push(store, make(key, 2))
    kept = [p for p in store_dir.iterdir() if p.name.startswith(".tmp-old-")]
    assert [p.read_bytes() for p in kept] == [old_state]
    assert json.loads((store_dir / "state.json").read_text())["active"]["version"] == 2
    gate.set()
    store.settle()
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_commit_sync_commit_keeps_no_second_name(opener, store_dir, key):
    store = opener(sync="commit")
    push(store, make(key, 1))
    push(store, make(key, 2))
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_second_name_left_by_a_crash_is_removed_at_open(opener, store_dir, key):
    store = opener()
    push(store, make(key, 1))
    store.settle()
    gate = threading.Event()
    store.later(gate.wait)  # the worker does not get to it before the reopen: as if killed
    try:
        push(store, make(key, 2))
        assert [p for p in store_dir.iterdir() if p.name.startswith(".tmp-old-")]
        reopened = opener()
        assert reopened.active is not None and reopened.active.version == 2
        assert not [p for p in store_dir.iterdir() if p.name.startswith(".tmp-")]
    finally:
        gate.set()


def test_only_objects_are_preallocated_never_the_state_file(opener, store_dir, key, monkeypatch):
    # A preallocated file skips ext4's write-back at rename: after a power cut it may read as
    # zeros. Objects are hashed where they are used; state.json, the commit point, must not be.
    store = opener()
    push(store, make(key, 1))
    preallocated: list[str] = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate",
                        lambda fd, *a: preallocated.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd, *a))
    push(store, make(key, 2))
    assert preallocated and all(str(store_dir / "objects") in p for p in preallocated), preallocated


def test_a_replace_that_fails_leaves_no_second_name(opener, store_dir, key, monkeypatch):
    store = opener()
    push(store, make(key, 1))
    store.settle()
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("state.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    bundle = make(key, 2)
    store.stage(bundle)
    with pytest.raises(StoreError):
        store.commit(bundle)
    monkeypatch.setattr(os, "replace", real)
    store.settle()
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".tmp-")]
    assert json.loads((store_dir / "state.json").read_text())["active"]["version"] == 1


def test_the_tree_root_is_resolved_again_when_a_link_in_its_path_moved(tmp_path):
    first, second = tmp_path / "release-1", tmp_path / "release-2"
    for d in (first, second):
        (d / "tree" / "app").mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(first)
    root = str(link / "tree")
    assert _trees._below(str(first / "tree" / "app"), root)  # resolved and cached
    link.unlink()
    link.symlink_to(second)  # a deploy tool re-points the store's path
    assert _trees._below(str(second / "tree" / "app"), root)
    assert not _trees._below(str(tmp_path), root)


def test_a_rollback_through_a_store_with_a_stale_view_never_lowers_the_mark(opener, key):
    # Two processes of one app: `late` opened the store at v1 and saw nothing since.
    early, late = opener(), opener()
    for version in (1,):
        push(early, make(key, version))
    late_view = opener()
    for version in (2, 3):
        push(early, make(key, version))
    assert (late_view.highest, early.highest) == (1, 3)
    v1 = late_view.load(1)
    late_view.commit(v1, action="rollback")  # back to v1, through the process that knew nothing newer
    assert opener().highest == 3 and late_view.highest == 3
    for replayed in (make(key, 2), make(key, 3)):
        with pytest.raises(StaleVersion):
            late_view.check_fresh(replayed)  # superseded bundles stay refused, whoever asks
    assert late.pointer()[0] == {"version": 1, "digest": v1.digest}


# ------------------------------------------------------------------- bodies let go after commit


def released(opener, key) -> tuple[Store, Bundle, dict[str, bytes]]:
    store = opener()
    bundle = make(key, 1)
    bodies = dict(bundle.bodies)
    push(store, bundle)
    store.release(bundle)
    return store, bundle, bodies


def test_a_committed_bundle_lets_go_of_its_bodies_and_reads_them_back_from_the_store(opener, key):
    store, bundle, bodies = released(opener, key)
    assert all(bundle.bodies.held(name) is None for name in bodies)  # nothing kept in memory
    assert {name: bundle.read(name) for name in bodies} == bodies
    assert bundle.size > 0 and bundle.summary()["size"] == bundle.size
    with pytest.raises(RuntimeError, match="released"):
        bundle.raw  # noqa: B018


def test_a_damaged_object_of_a_released_bundle_is_read_from_its_bundle_file(opener, store_dir, key, caplog):
    store, bundle, bodies = released(opener, key)
    obj = store.objects.path(bundle.entries["shop.mod"].sha256)
    os.chmod(obj, 0o644)
    Path(obj).write_bytes(b"def f():\n    return 2\n")  # same size, other bytes
    assert bundle.read("shop.mod") == bodies["shop.mod"]
    assert "missing or damaged" in caplog.text and "shop.mod" in caplog.text


def test_a_body_gone_from_objects_and_bundle_file_is_a_store_error_naming_it(opener, store_dir, key):
    store, bundle, _ = released(opener, key)
    os.unlink(store.objects.path(bundle.entries["shop.mod"].sha256))
    bundle_file(store_dir, bundle).unlink()
    with pytest.raises(StoreError, match="'shop.mod'.*push the app again") as raised:
        bundle.read("shop.mod")
    assert raised.value.code == "store_error"


def test_a_delta_opened_against_a_released_bundle_holds_only_what_it_carries(opener, key):
    store, v1, bodies = released(opener, key)
    files = {"shop": ("package", bodies["shop"]), "shop.mod": ("module", b"def f():\n    return 2\n"),
             "shop/templates/x.html": ("data", bodies["shop/templates/x.html"]),
             "shop/copy.html": ("data", bodies["shop/templates/x.html"])}  # a known body, another name
    data = build_bundle(files, app_id=APP, version=2, signers=[key], base=ParentManifest.from_manifest(v1.manifest_bytes))
    v2 = open_bundle(data, TrustedKeys([key.public]), app_id=APP, content=store.objects.get, base=v1)
    assert v2.bodies.held("shop.mod") == b"def f():\n    return 2\n"
    assert v2.bodies.held("shop") is None and v2.read("shop") == bodies["shop"]  # read back, checked
    assert v2.read("shop/copy.html") == bodies["shop/templates/x.html"]
    push(store, v2)
    store.release(v2)
    assert v2.read("shop.mod") == b"def f():\n    return 2\n"


def test_reading_an_object_back_follows_no_link_and_reads_no_more_than_its_entry(opener, key):
    store, bundle, bodies = released(opener, key)
    entry = bundle.entries["shop.mod"]
    path = store.objects.path(entry.sha256)
    assert store.objects.get(entry.sha256, entry.size) == bodies["shop.mod"]
    os.chmod(path, 0o644)
    os.unlink(path)
    os.symlink("/dev/zero", path)  # endless bytes: a read of them all would never end
    assert store.objects.get(entry.sha256, entry.size) is None  # a link is not an object
    os.unlink(path)
    Path(path).write_bytes(bodies["shop.mod"] + b"x" * 10_000_000)
    assert len(store.objects.get(entry.sha256, entry.size) or b"") == entry.size + 1
    assert bundle.read("shop.mod") == bodies["shop.mod"]  # the bundle file had it right

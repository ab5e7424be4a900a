"""The store under faults: failed commits, planted links and foreign files, stale parents, replays.

Each rule here is one a real app relies on when something went wrong: a version whose commit failed
is never run again; habanero writes nothing through a link or into a file it did not create, and
still starts; a push built on another version than the running one is refused; a signed control
request is taken once by the app, whichever process and however many restarts.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.bundle import Bundle, build_bundle, open_bundle
from overlay.control import RequestVerifier, sign_request
from overlay.errors import ControlRejected, StaleVersion, StoreError
from overlay.keys import SigningKey, TrustedKeys, generate_signing_key
from overlay.storage import requests as requests_module
from overlay.store import Store

APP = "shop"


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return generate_signing_key(tmp_path / "keys" / "dev")


@pytest.fixture
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys([key.public], source="test keys")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the store, where nothing may ever be created."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def opener(store_dir: Path, trusted: TrustedKeys) -> Iterator[Callable[..., Store]]:
    opened: list[Store] = []

    def open_store(**kwargs: object) -> Store:
        store = Store.open(store_dir, trusted=trusted, app_id=APP, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def make(key: SigningKey, version: int, *, parent: str | None = None) -> Bundle:
    files = {"shop": ("package", f"VERSION = {version}\n".encode()),
             "shop/templates/x.html": ("data", f"<p>{version}</p>\n".encode())}
    data = build_bundle(files, app_id=APP, version=version, signers=[key], parent=parent)
    return open_bundle(data, TrustedKeys([key.public]), app_id=APP)


def push(store: Store, bundle: Bundle) -> None:
    store.check_fresh(bundle)
    store.stage(bundle)
    store.commit(bundle)


def fail_commit(store: Store, bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage ``bundle`` and have its commit fail where a full disk would: replacing the state file."""
    store.check_fresh(bundle)
    store.stage(bundle)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(store._state, "write", no_space)
        with pytest.raises(StoreError):
            store.commit(bundle)
    store.discard(bundle)  # what a failed deploy does


# ------------------------------------------------------------------------------- failed commits


def test_a_version_whose_commit_failed_can_never_be_rolled_back_to(opener, key, monkeypatch):
    store = opener()
    push(store, make(key, 1))
    fail_commit(store, make(key, 2), monkeypatch)
    push(store, make(key, 3))  # the mark passes the failed version: it is not "above highest" any more
    assert [v for v, _ in store.stored()] == [1, 3]
    with pytest.raises(StoreError) as info:
        store.load(2)
    assert info.value.code == "unknown_version"
    assert store.previous().version == 1
    assert opener().previous(below=3).version == 1


def test_a_version_whose_commit_failed_is_never_started_on(opener, store_dir, key, monkeypatch):
    store = opener()
    push(store, make(key, 1))
    fail_commit(store, make(key, 2), monkeypatch)
    store.close()
    (store_dir / "state.json").write_text("{torn")  # the newest stored bundle that verifies is used
    (store_dir / "history.jsonl").unlink()
    restarted = opener()
    assert restarted.active is not None and restarted.active.version == 1
    assert os.listdir(store_dir / "staged") == []


def test_a_commit_cut_short_after_its_commit_point_is_served_and_finished_at_open(opener, store_dir, key,
                                                                                  monkeypatch):
    store = opener()
    push(store, make(key, 1))
    v2 = make(key, 2)
    monkeypatch.setattr(store, "_promote", lambda *args, **kwargs: None)  # killed before the move
    push(store, v2)
    monkeypatch.undo()
    assert [v for v, _ in store.stored()] == [1] and len(os.listdir(store_dir / "staged")) == 1
    store.prune()  # retention never takes the state file's bundle out of staged/
    assert len(os.listdir(store_dir / "staged")) == 1
    store.close()
    restarted = opener()
    assert restarted.active is not None and restarted.active.digest == v2.digest
    assert [v for v, _ in restarted.stored()] == [1, 2] and os.listdir(store_dir / "staged") == []


# ------------------------------------------------------------------------------------ parents


def test_a_push_built_on_another_version_than_the_running_one_is_refused_naming_both(opener, key):
    store = opener()
    v1 = make(key, 1)
    push(store, v1)
    v2 = make(key, 2, parent=v1.digest)
    store.check_parent(v2, v1)
    push(store, v2)
    stale = make(key, 3, parent=v1.digest)  # built while v1 ran; v2 went live meanwhile
    with pytest.raises(StaleVersion) as info:
        store.check_parent(stale, v2)
    assert info.value.code == "stale_parent" and info.value.http_status == 409
    assert "built on v1" in info.value.message and "runs v2" in info.value.message
    assert "--force" in info.value.message and "rebuild on the active version" in info.value.message


def test_a_push_that_claims_no_parent_is_a_deliberate_replacement(opener, key):
    store = opener()
    v1 = make(key, 1)
    push(store, v1)
    store.check_parent(make(key, 2), v1)  # parent null: --force, a bundle built alone, a first push


def test_a_push_naming_a_parent_to_an_app_on_the_code_on_disk_is_refused(opener, key):
    store = opener()
    with pytest.raises(StaleVersion, match="runs the code on disk") as info:
        store.check_parent(make(key, 2, parent="ab" * 32), None)
    assert info.value.code == "stale_parent"


# ------------------------------------------------------------------------- links and foreign files


def _plant_link(store_dir: Path, name: str, outside: Path) -> Path:
    """Put a symbolic link at ``store_dir/name`` into ``outside``; returns its target."""
    path = store_dir / name
    if path.is_dir():
        target = outside / name
        os.rename(path, target)  # what it held stays readable, through the link
    else:
        target = outside / f"{name}.target"
        if path.exists():
            os.rename(path, target)
    path.symlink_to(target)
    return target


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("name", ["bundles", "staged", "objects", "pycache", "state.json", "history.jsonl",
                                  "lock", "deploy.lock", "requests.jsonl"])
def test_a_link_in_the_store_is_never_written_through_and_the_store_still_opens(opener, store_dir, outside, key,
                                                                                name):
    store = opener()
    push(store, make(key, 1))
    push(store, make(key, 2))
    store.cache_dir
    store.close()
    _plant_link(store_dir, name, outside)
    before = _listing(outside)
    restarted = opener()  # never raises: the app always starts
    assert any(name in problem and "symbolic link" in problem for problem in restarted.startup_problems)
    served = restarted.active.version if restarted.active is not None else None
    assert served == 2 or name in ("bundles", "objects")  # what verifies through the link is served
    with pytest.raises(StoreError) as info:
        push(restarted, make(key, 3))
    assert info.value.code == "store_unsafe" and name in info.value.message
    verifier = RequestVerifier(restarted.trusted, APP, nonces=restarted.requests)
    verifier.verify("GET", "/_habanero/status", sign_request(key, "GET", "/_habanero/status", APP), b"")
    assert restarted.cache_dir is None or name != "pycache"
    restarted.settle()
    assert _listing(outside) == before


def test_a_link_planted_after_open_is_refused_before_anything_is_written(opener, store_dir, outside, key):
    store = opener()
    push(store, make(key, 1))
    _plant_link(store_dir, "staged", outside)
    with pytest.raises(StoreError) as info:
        push(store, make(key, 2))
    assert info.value.code == "store_unsafe"
    assert _listing(outside) == ["staged"]


def test_a_link_in_place_of_an_object_directory_is_never_written_through(opener, store_dir, outside, key):
    store = opener()
    v1 = make(key, 1)
    shards = {entry.sha256[:2] for entry in v1.entries.values()}
    for shard in shards:
        (store_dir / "objects" / shard).symlink_to(outside)
    with pytest.raises(StoreError) as info:
        push(store, v1)
    assert info.value.code == "store_unsafe"
    assert _listing(outside) == []
    restarted = opener()
    assert any("objects" in problem for problem in restarted.startup_problems)


def test_a_fifo_in_place_of_the_state_file_never_blocks_the_start(opener, store_dir, key):
    store = opener()
    push(store, make(key, 1))
    store.close()
    (store_dir / "state.json").unlink()
    os.mkfifo(store_dir / "state.json")
    restarted = opener()
    assert restarted.active is not None and restarted.active.version == 1
    assert any("state.json" in problem for problem in restarted.startup_problems)


def test_a_link_in_place_of_a_package_directory_of_a_tree_creates_nothing_outside(opener, tmp_path, outside,
                                                                                  key):
    store = opener()
    v1 = make(key, 1)
    push(store, v1)
    root = tmp_path / "tree"
    root.mkdir()
    (root / "shop").symlink_to(outside)
    tree = store.source_tree(root)
    with pytest.raises(StoreError) as info:
        tree.lay_out(v1)
    assert info.value.code == "store_unsafe" and "shop" in info.value.message
    (root / "shop").unlink()
    tree.lay_out(v1)
    (root / "shop" / "templates").rename(tmp_path / "moved")
    (root / "shop" / "templates").symlink_to(outside)  # planted between two pushes
    with pytest.raises(StoreError):
        tree.update(v1, make(key, 2))
    assert _listing(outside) == []


# ------------------------------------------------------------------------------ control requests


def test_a_signed_request_taken_before_a_restart_is_refused_after_it(opener, trusted, key):
    headers = sign_request(key, "POST", "/_habanero/rollback", APP, b"{}")
    first = opener()
    RequestVerifier(trusted, APP, nonces=first.requests).verify("POST", "/_habanero/rollback", headers, b"{}")
    first.close()
    restarted = opener()
    with pytest.raises(ControlRejected) as info:
        RequestVerifier(trusted, APP, nonces=restarted.requests).verify("POST", "/_habanero/rollback", headers,
                                                                        b"{}")
    assert info.value.code == "replayed_request"


def test_a_signed_request_is_taken_once_by_all_the_processes_of_a_store(opener, trusted, key):
    worker_a, worker_b = opener(), opener()
    headers = sign_request(key, "GET", "/_habanero/history", APP)
    RequestVerifier(trusted, APP, nonces=worker_a.requests).verify("GET", "/_habanero/history", headers, b"")
    with pytest.raises(ControlRejected, match="already used"):
        RequestVerifier(trusted, APP, nonces=worker_b.requests).verify("GET", "/_habanero/history", headers, b"")


def test_the_request_file_keeps_only_the_nonces_within_their_window(opener, store_dir, trusted, key, monkeypatch):
    monkeypatch.setattr(requests_module, "COMPACT_AT", 2)
    store = opener()
    verifier = RequestVerifier(trusted, APP, nonces=store.requests)
    start = 1_900_000_000
    for _ in range(5):
        verifier.verify("GET", "/_habanero/status", sign_request(key, "GET", "/_habanero/status", APP, now=start),
                        b"", now=start)
    later = start + 3 * verifier.window
    verifier.verify("GET", "/_habanero/status", sign_request(key, "GET", "/_habanero/status", APP, now=later),
                    b"", now=later)
    assert len((store_dir / "requests.jsonl").read_text().splitlines()) == 1

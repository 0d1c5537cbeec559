"""The `Store` protocol, one suite for both implementations: SQLiteStore (a file) and EtcdStore
(a real 3-member etcd cluster, one per module; each test under a prefix of its own).

`open_store()` opens the same store again each time it is called: two calls are two
replicas on one etcd cluster, or two connections to one SQLite file (as two processes would).
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshlib.control.store import SQLiteStore, Store, StoreConflict
from meshlib.rules import RuleSet, parse_documents
from tests.control import DESTINATION, ROUTE

OpenStore = Callable[[], Store]


def _rules(*docs: dict) -> RuleSet:
    return parse_documents(list(docs))


@pytest.fixture(params=["sqlite", "etcd"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[Store] = []
    if request.param == "sqlite":

        def open_one() -> Store:
            opened.append(SQLiteStore(tmp_path / "rules.db"))
            return opened[-1]
    else:
        from meshlib.control.etcd_store import EtcdStore

        cluster = request.getfixturevalue("etcd_cluster")
        url = f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"

        def open_one() -> Store:
            opened.append(EtcdStore(url))
            return opened[-1]

    yield open_one
    for s in opened:
        s.close()  # type: ignore[attr-defined]


@pytest.fixture
def store(open_store: OpenStore) -> Store:
    return open_store()


def test_new_store_is_version_0_and_empty(store: Store) -> None:
    assert isinstance(store, Store)
    version, rules = store.current()
    assert version == 0 and rules == RuleSet.EMPTY
    info, rules0 = store.get(0)
    assert info.version == 0 and info.documents == 0 and info.message == "empty" and rules0 == RuleSet.EMPTY
    assert [i.version for i in store.history()] == [0]


def test_commit_current_history_get(store: Store) -> None:
    one = _rules(DESTINATION)
    two = _rules(DESTINATION, ROUTE)
    assert store.commit(one, "first") == 1
    assert store.commit(two, "second") == 2
    version, rules = store.current()
    assert version == 2 and rules == two
    history = store.history()
    assert [(i.version, i.message, i.documents) for i in history] == [
        (2, "second", 2),
        (1, "first", 1),
        (0, "empty", 0),
    ]
    assert history[0].created >= history[1].created > 0
    info, rules1 = store.get(1)
    assert info.message == "first" and rules1 == one
    assert info.to_dict() == {"version": 1, "created": info.created, "documents": 1, "message": "first"}


def test_history_is_newest_first_and_limited(store: Store) -> None:
    for i in range(1, 6):
        store.commit(_rules(DESTINATION), f"v{i}")
    assert [i.version for i in store.history()] == [5, 4, 3, 2, 1, 0]
    assert [i.version for i in store.history(limit=1)] == [5]
    assert [i.message for i in store.history(limit=3)] == ["v5", "v4", "v3"]
    assert store.history(limit=0) == []
    assert [i.version for i in store.history(limit=1 << 70)] == [5, 4, 3, 2, 1, 0]


def test_get_of_a_missing_version_is_a_key_error(store: Store) -> None:
    store.commit(_rules(DESTINATION), "first")
    for missing in (2, 1000, -1, 1 << 70):
        with pytest.raises(KeyError):
            store.get(missing)


def _commit_concurrently(stores: list[Store], threads_per_store: int, commits: int) -> dict[str, int]:
    """Every thread commits `commits` versions; returns message -> the version it got."""
    got: dict[str, int] = {}
    lock = threading.Lock()
    rules = _rules(DESTINATION)

    def work(store: Store, name: str) -> None:
        for i in range(commits):
            version = store.commit(rules, f"{name}-{i}")
            with lock:
                got[f"{name}-{i}"] = version

    threads = [
        threading.Thread(target=work, args=(s, f"s{n}t{t}"))
        for n, s in enumerate(stores)
        for t in range(threads_per_store)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def _assert_all_landed(store: Store, got: dict[str, int]) -> None:
    """Unique consecutive versions; history holds each commit once, at the version it returned;
    each thread's commits are in the order it made them."""
    assert sorted(got.values()) == list(range(1, len(got) + 1))
    history = {i.version: i.message for i in store.history(limit=len(got) + 1)}
    assert history == {0: "empty", **{v: m for m, v in got.items()}}
    for name in {m.rsplit("-", 1)[0] for m in got}:
        mine = [got[f"{name}-{i}"] for i in range(sum(m.startswith(f"{name}-") for m in got))]
        assert mine == sorted(mine)


def test_concurrent_commits_from_threads_land_in_order(store: Store) -> None:
    got = _commit_concurrently([store], threads_per_store=4, commits=6)
    _assert_all_landed(store, got)


def test_concurrent_commits_from_two_stores_land_in_order(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()  # two replicas
    got = _commit_concurrently([a, b], threads_per_store=2, commits=6)
    _assert_all_landed(a, got)
    assert a.current() == b.current() == (len(got), _rules(DESTINATION))


def test_commit_on_a_base_refuses_a_stale_one(store: Store) -> None:
    assert store.commit(_rules(DESTINATION), "first", base=0) == 1
    with pytest.raises(StoreConflict) as refused:
        store.commit(_rules(DESTINATION, ROUTE), "stale", base=0)
    assert (refused.value.base, refused.value.version) == (0, 1)
    assert [i.message for i in store.history()] == ["first", "empty"]  # nothing written
    assert store.commit(_rules(DESTINATION, ROUTE), "second", base=1) == 2


def test_read_modify_write_on_a_base_loses_no_change(open_store: OpenStore) -> None:
    """Two replicas each add documents to whatever is current; on a conflict they read again
    and recompute (what the control plane's apply does): every document is in the end state."""
    stores = [open_store(), open_store()]

    def add(n: int) -> None:
        store = stores[n % 2]
        for i in range(5):
            while True:
                version, current = store.current()
                new = current.apply([{"kind": "Destination", "service": f"s{n}-{i}"}], source="test")
                try:
                    store.commit(new, f"add s{n}-{i}", base=version)
                    break
                except StoreConflict:
                    continue

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    version, rules = stores[0].current()
    assert version == 20
    assert sorted(d.service for d in rules.documents) == sorted(
        f"s{n}-{i}" for n in range(4) for i in range(5)
    )


def test_reopening_loses_nothing(open_store: OpenStore) -> None:
    s = open_store()
    s.commit(_rules(DESTINATION), "first")
    s.commit(_rules(DESTINATION, ROUTE), "second")
    s.close()  # type: ignore[attr-defined]
    s = open_store()
    assert s.current() == (2, _rules(DESTINATION, ROUTE))
    assert [i.message for i in s.history()] == ["second", "first", "empty"]
    assert s.get(1)[1] == _rules(DESTINATION)
    assert s.commit(RuleSet.EMPTY, "cleared") == 3
    assert s.current() == (3, RuleSet.EMPTY)


def test_closed_store_refuses_use(open_store: OpenStore) -> None:
    s = open_store()
    s.close()  # type: ignore[attr-defined]
    s.close()  # type: ignore[attr-defined]  # idempotent
    with pytest.raises(RuntimeError):
        s.current()


# -- SQLite only ------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "rules.db")
    yield s
    s.close()


def test_sqlite_wal_mode_and_one_table(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "rules.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [r[1] for r in db.execute("PRAGMA table_info(versions)")]
        assert cols == ["version", "created", "message", "documents"]
    finally:
        db.close()


def test_sqlite_failed_commit_leaves_nothing_behind(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    store.commit(_rules(DESTINATION), "first")

    def boom() -> float:
        raise OSError("disk on fire")

    monkeypatch.setattr("meshlib.control.store.time.time", boom)
    with pytest.raises(OSError):
        store.commit(_rules(DESTINATION, ROUTE), "lost")
    monkeypatch.undo()
    assert store.current() == (1, _rules(DESTINATION))
    assert [i.version for i in store.history()] == [1, 0]
    assert store.commit(_rules(DESTINATION, ROUTE), "next") == 2  # no gap, no duplicate

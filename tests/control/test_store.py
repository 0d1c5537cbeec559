"""SQLiteStore: versions, history, atomic commits, reopening."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from meshlib.control.store import SQLiteStore, Store
from meshlib.rules import RuleSet, parse_documents
from tests.control import DESTINATION, ROUTE


def _rules(*docs: dict) -> RuleSet:
    return parse_documents(list(docs))


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "rules.db")
    yield s
    s.close()


def test_new_store_is_version_0_and_empty(store: SQLiteStore) -> None:
    assert isinstance(store, Store)
    version, rules = store.current()
    assert version == 0 and rules == RuleSet.EMPTY
    info, rules0 = store.get(0)
    assert info.version == 0 and info.documents == 0 and rules0 == RuleSet.EMPTY
    assert [i.version for i in store.history()] == [0]


def test_commit_current_history_get(store: SQLiteStore) -> None:
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
    assert [i.version for i in store.history(limit=1)] == [2]
    info, rules1 = store.get(1)
    assert info.message == "first" and rules1 == one
    assert info.to_dict() == {"version": 1, "created": info.created, "documents": 1, "message": "first"}
    for missing in (3, -1, 1 << 70):
        with pytest.raises(KeyError):
            store.get(missing)


def test_wal_mode_and_one_table(store: SQLiteStore, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "rules.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [r[1] for r in db.execute("PRAGMA table_info(versions)")]
        assert cols == ["version", "created", "message", "documents"]
    finally:
        db.close()


def test_failed_commit_leaves_nothing_behind(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_concurrent_commits_get_distinct_consecutive_versions(store: SQLiteStore) -> None:
    rules = _rules(DESTINATION)
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            v = store.commit(rules, "t")
            with lock:
                got.append(v)

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 51))


def test_reopen_keeps_versions(tmp_path: Path) -> None:
    path = tmp_path / "rules.db"
    with SQLiteStore(path) as s:
        s.commit(_rules(DESTINATION), "first")
        s.commit(_rules(DESTINATION, ROUTE), "second")
    with SQLiteStore(path) as s:
        assert s.current() == (2, _rules(DESTINATION, ROUTE))
        assert [i.message for i in s.history()] == ["second", "first", "empty"]
        assert s.commit(RuleSet.EMPTY, "cleared") == 3
        assert s.current() == (3, RuleSet.EMPTY)


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "rules.db")
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError):
        s.current()

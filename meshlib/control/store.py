"""Versioned rules storage for the control service.

A store keeps every committed version of the rules: version 0 is the empty set, and each commit
adds version N+1 holding the whole rule set (not a diff), so history, `get` and rollback are
simple reads. The `Store` protocol is deliberately small (current, commit, history, get) so an
etcd backend (meshlib.control.etcd_store) implements it with a key per version and one
transaction per commit.

`commit(..., base=N)` commits only if version N is still the latest (StoreConflict otherwise):
a change computed from version N by one replica must not silently undo a version another
replica committed meanwhile; the caller reads the new current version and computes again.

`SQLiteStore` keeps everything in one file in the data dir, in WAL mode. Each commit is one
`BEGIN IMMEDIATE` transaction that reads the last version and inserts the next, so a crash or a
concurrent writer never leaves a half-written version or two versions with one number. A file it
cannot use (not a database, another process holding its lock past the busy timeout, a disk
error) raises `StoreUnavailable`, which the control API answers with a 503 and the command
line names at start-up; a commit that raises it wrote nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from meshlib.rules import RuleSet, parse_documents

log = logging.getLogger("meshlib.control")

MAX_VERSION = (1 << 63) - 1
"""The largest version an SQLite INTEGER can hold; larger numbers are never found."""


class StoreUnavailable(Exception):
    """The store cannot be used now: `reason` says why, without the file's path (what a client
    is told); the message names the path too (what the log and the command line say)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _unavailable(path: Path, exc: sqlite3.Error) -> StoreUnavailable:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreUnavailable(path, f"busy: another process holds a lock on {path.name} ({exc})")
    return StoreUnavailable(path, f"unavailable: {exc}")


class StoreConflict(Exception):
    """A commit with `base` refused: another version became the latest first (nothing written)."""

    def __init__(self, base: int, version: int) -> None:
        super().__init__(f"version {base} is no longer the latest: {version} is")
        self.base = base
        self.version = version  # the latest version when the commit was refused


@dataclass(frozen=True)
class VersionInfo:
    """What the history says about one version: when, why, and how many documents."""

    version: int
    created: float  # unix seconds
    message: str
    documents: int  # how many documents the version holds

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": self.created,
            "documents": self.documents,
            "message": self.message,
        }


@runtime_checkable
class Store(Protocol):
    """Where committed rule versions live. Implementations must be safe to call from threads."""

    def current(self) -> tuple[int, RuleSet]:
        """The latest version and its rules; (0, RuleSet.EMPTY) for a new store."""
        ...

    def commit(self, rules: RuleSet, message: str, *, base: int | None = None) -> int:
        """Store `rules` as the next version, atomically; return the new version number.

        With `base`, only if version `base` is the latest: StoreConflict otherwise."""
        ...

    def history(self, limit: int = 100) -> list[VersionInfo]:
        """Up to `limit` versions, newest first."""
        ...

    def get(self, version: int) -> tuple[VersionInfo, RuleSet]:
        """One version and its rules; KeyError if there is no such version."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version   INTEGER PRIMARY KEY,
    created   REAL NOT NULL,
    message   TEXT NOT NULL,
    documents TEXT NOT NULL
)
"""


class SQLiteStore:
    """Rule versions in one SQLite file (WAL mode); thread-safe through one connection and a lock.

    The lock serialises use of the connection; the transaction makes each commit atomic on disk,
    also against another process on the same file.
    """

    def __init__(self, path: str | Path, *, timeout: float = 10.0) -> None:
        """`timeout`: how long a statement waits for another process's lock on the file before
        it raises StoreUnavailable. A file that is not an SQLite database (or cannot be opened)
        raises StoreUnavailable naming it."""
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=timeout
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.path, f"cannot open it: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO versions (version, created, message, documents) VALUES (0, ?, ?, ?)",
                (time.time(), "empty", "[]"),
            )
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreUnavailable(self.path, f"cannot open it: {exc}") from None
        except BaseException:
            self._db.close()
            raise
        self._closed = False

    # -- Store --------------------------------------------------------------------------------

    def current(self) -> tuple[int, RuleSet]:
        with self._lock, self._errors():
            row = (
                self._conn()
                .execute("SELECT version, documents FROM versions ORDER BY version DESC LIMIT 1")
                .fetchone()
            )
        if row is None:  # pragma: no cover - version 0 is inserted on open
            return 0, RuleSet.EMPTY
        version, documents = row
        return version, _rules(documents, version)

    def commit(self, rules: RuleSet, message: str, *, base: int | None = None) -> int:
        documents = json.dumps(rules.to_dicts(), separators=(",", ":"), ensure_ascii=False)
        with self._lock, self._errors():
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")  # waits up to the busy timeout for another writer
            try:
                (last,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()
                if base is not None and last != base:
                    raise StoreConflict(base, last)
                version = last + 1
                db.execute(
                    "INSERT INTO versions (version, created, message, documents) VALUES (?, ?, ?, ?)",
                    (version, time.time(), message, documents),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (a disk error)
                    db.execute("ROLLBACK")
                raise
        return version

    def history(self, limit: int = 100) -> list[VersionInfo]:
        limit = max(0, min(int(limit), MAX_VERSION))
        with self._lock, self._errors():
            rows = (
                self._conn()
                .execute(
                    "SELECT version, created, message, json_array_length(documents) FROM versions "
                    "ORDER BY version DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [VersionInfo(v, c, m, n) for v, c, m, n in rows]

    def get(self, version: int) -> tuple[VersionInfo, RuleSet]:
        if not 0 <= version <= MAX_VERSION:
            raise KeyError(version)
        with self._lock, self._errors():
            row = (
                self._conn()
                .execute(
                    "SELECT version, created, message, documents, json_array_length(documents) "
                    "FROM versions WHERE version = ?",
                    (version,),
                )
                .fetchone()
            )
        if row is None:
            raise KeyError(version)
        v, created, message, documents, count = row
        return VersionInfo(v, created, message, count), _rules(documents, v)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as StoreUnavailable (busy: another process holds the lock)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from None

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"store {self.path} is closed")
        return self._db

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


def _rules(documents: str, version: int) -> RuleSet:
    return parse_documents(json.loads(documents), source=f"stored version {version}")

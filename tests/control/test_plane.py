"""ControlPlane start-up: stored rule versions that today's bounds refuse do not keep the control
service down."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from meshlib.control import ControlPlane, ControlSettings
from meshlib.control.plane import STORE_FILE
from meshlib.control.store import SQLiteStore
from meshlib.rules import RulesError, parse_documents
from tests.control import DESTINATION, ROUTE, Control

HUGE = {"kind": "Destination", "service": "orders", "max_concurrent_requests": 10**4000}
BOOLEAN = {"kind": "Destination", "service": "orders", "max_concurrent_requests": True}


def store_with(data: Path, *versions: list[dict]) -> None:
    """A store whose versions 1, 2, ... hold `versions` as committed, valid today or not (written
    as an older meshlib that accepted them would have)."""
    data.mkdir(parents=True, exist_ok=True)
    SQLiteStore(data / STORE_FILE).close()
    db = sqlite3.connect(data / STORE_FILE)
    try:
        for n, docs in enumerate(versions, start=1):
            sql = "INSERT INTO versions (version, created, message, documents) VALUES (?, ?, ?, ?)"
            db.execute(sql, (n, time.time(), f"v{n}", json.dumps(docs)))
        db.commit()
    finally:
        db.close()


def test_start_on_the_newest_version_valid_today(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store_with(tmp_path, [DESTINATION], [DESTINATION, ROUTE], [HUGE], [BOOLEAN])
    with caplog.at_level(logging.WARNING, logger="meshlib.control"):
        plane = ControlPlane(ControlSettings(tmp_path))
    try:
        assert plane.version == 2
        assert plane.rules == parse_documents([DESTINATION, ROUTE])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 3, warnings
        assert "newest stored version is not valid" in warnings[0] and "stored version 4" in warnings[0]
        assert "stored version 3 is not valid" in warnings[1] and "max_concurrent_requests" in warnings[1]
        assert warnings[2] == "rules: serving stored version 2, the newest valid one"

        # the next change supersedes them; the old versions stay listed, and refused by name
        done = asyncio.run(plane.apply([{**DESTINATION, "max_concurrent_requests": 10}]))
        assert done == {"version": 5, "changed": True}
        assert [row["version"] for row in asyncio.run(plane.history(10))] == [5, 4, 3, 2, 1, 0]
        with pytest.raises(RulesError, match="stored version 3"):
            asyncio.run(plane.rollback(3))
    finally:
        plane.close()


def test_nothing_valid_but_version_0_starts_empty(tmp_path: Path) -> None:
    store_with(tmp_path, [HUGE])
    plane = ControlPlane(ControlSettings(tmp_path))
    try:
        assert (plane.version, len(plane.rules)) == (0, 0)
    finally:
        plane.close()


def test_a_valid_newest_version_is_read_as_before(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store_with(tmp_path, [HUGE], [DESTINATION])
    with caplog.at_level(logging.WARNING, logger="meshlib.control"):
        plane = ControlPlane(ControlSettings(tmp_path))
    try:
        assert plane.version == 2 and not caplog.records  # an old bad version is no concern
    finally:
        plane.close()


def test_over_http_the_refused_version_is_a_422_naming_it(tmp_path: Path) -> None:
    store_with(tmp_path / "data", [DESTINATION], [HUGE])
    control = Control(tmp_path / "data")
    try:
        assert control.http.get("/v1/config").json()["version"] == 1
        for r in (
            control.http.get("/v1/history/2"),
            control.http.post("/v1/rollback/2", headers=control.admin),
        ):
            assert r.status_code == 422, r.text
            assert r.json()["problems"][0]["document"].endswith("(document 1 of stored version 2)")
        assert control.http.get("/v1/history/1").status_code == 200
    finally:
        control.stop()


def test_a_registry_that_cannot_be_saved_warns_once_until_it_is_saved_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reaper retries a failed save every half second: one WARNING for the failure, DEBUG
    for the retries, one INFO once a save works again; the next failure warns again."""
    from meshlib.rules import EndpointSpec

    plane = ControlPlane(ControlSettings(tmp_path))
    blocker = tmp_path / ".registry.json.tmp"  # the atomic write's temporary file cannot be made
    blocker.mkdir()

    def saves() -> list[tuple[int, str]]:
        said = [(r.levelno, r.getMessage()) for r in caplog.records]
        return [(level, m) for level, m in said if m.startswith(("registry: cannot save", "registry: saved"))]

    async def scenario() -> None:
        await plane.register("orders", EndpointSpec(address="127.0.0.1:8001"), 60)
        for _ in range(5):  # as the reaper retries
            await plane.save_registry()
        levels = [level for level, _ in saves()]
        assert levels == [logging.WARNING] + [logging.DEBUG] * 4, saves()
        assert f"cannot save {tmp_path / 'registry.json'}" in saves()[0][1]
        blocker.rmdir()
        await plane.save_registry()
        assert saves()[-1] == (logging.INFO, f"registry: saved {tmp_path / 'registry.json'} again")
        assert json.loads((tmp_path / "registry.json").read_text())[0]["address"] == "127.0.0.1:8001"
        await plane.save_registry()  # nothing changed: nothing to say
        assert len(saves()) == 6
        blocker.mkdir()
        await plane.register("orders", EndpointSpec(address="127.0.0.1:8002"), 60)
        await plane.save_registry()
        assert saves()[-1][0] == logging.WARNING and len(saves()) == 7

    with caplog.at_level(logging.DEBUG, logger="meshlib.control"):
        try:
            asyncio.run(scenario())
        finally:
            plane.close()


def test_a_busy_rules_store_is_a_503_that_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holding rules.db's lock (a backup, an sqlite3 shell) past the busy timeout:
    the change is answered 503 with the reason (nothing was written), logged as one WARNING
    without a traceback; once the lock is gone the change lands."""
    control = Control(tmp_path / "data", store_timeout=0.2)
    holder = sqlite3.connect(tmp_path / "data" / STORE_FILE, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.WARNING, logger="meshlib.control"):
            r = control.apply([DESTINATION])
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        error = r.json()["error"]
        assert error.startswith("the rules store is busy: another process holds a lock on rules.db"), error
        assert error.endswith("nothing was changed: try again") and str(tmp_path) not in error
        assert [(rec.levelno, rec.exc_info) for rec in caplog.records] == [(logging.WARNING, None)]
        assert control.http.get("/v1/history").status_code == 200  # reads go on (WAL)
        holder.execute("ROLLBACK")
        assert control.apply([DESTINATION]).json() == {"version": 1, "changed": True}
    finally:
        holder.close()
        control.stop()


def test_a_store_file_that_is_not_a_database_is_named_at_start(tmp_path: Path) -> None:
    from meshlib.control.store import StoreUnavailable

    (tmp_path / STORE_FILE).write_text("junk\n")
    with pytest.raises(StoreUnavailable) as raised:
        ControlPlane(ControlSettings(tmp_path))
    assert str(raised.value) == f"{tmp_path / STORE_FILE}: cannot open it: file is not a database"
    assert not (tmp_path / "admin.token").exists()  # the store first: no token no one saw printed

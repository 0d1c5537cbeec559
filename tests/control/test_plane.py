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

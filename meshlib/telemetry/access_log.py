"""The structured access log: one JSON line per inbound request and per outbound call.

Opt-in (`Mesh(access_log=...)` or `MESH_ACCESS_LOG`). Lines go to the `meshlib.access` logger at
INFO (the app routes it), to stdout (`"-"`), or to a file of their own. Every line has the same
keys, null where a fact does not apply, so a log pipeline can parse them all alike (see
docs/observability.md for the format).

Nothing from the request's headers is logged except the calling service's name, and neither the
query string nor an exception's message: all can carry credentials (an Authorization or Cookie
header, an `?access_token=`). The path is logged; keep secrets out of paths.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

LOGGER = "meshlib.access"

KEYS = (
    "time",
    "direction",
    "trace_id",
    "span_id",
    "source",
    "destination",
    "route",
    "subset",
    "upstream",
    "method",
    "path",
    "status",
    "duration_ms",
    "attempts",
    "mirror",
    "error",
)
"""Every line's keys, in order."""


class AccessLog:
    """Writes access-log lines to a logger (one of its own for a file or stdout)."""

    def __init__(self, logger: logging.Logger, handler: logging.Handler | None = None) -> None:
        self.logger = logger
        self._handler = handler  # ours to close

    def write(
        self,
        *,
        started_wall: float,
        direction: str,
        trace_id: str | None,
        span_id: str | None,
        source: str | None,
        destination: str | None,
        route: str | None,
        subset: str | None,
        upstream: str | None,
        method: str,
        path: str,
        status: int | None,
        seconds: float,
        attempts: int | None,
        mirror: bool,
        error: str | None,
    ) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        when = dt.datetime.fromtimestamp(started_wall, dt.UTC).isoformat(timespec="milliseconds")
        entry = {
            "time": when.replace("+00:00", "Z"),
            "direction": direction,
            "trace_id": trace_id,
            "span_id": span_id,
            "source": source,
            "destination": destination,
            "route": route,
            "subset": subset,
            "upstream": upstream,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "attempts": attempts,
            "mirror": mirror,
            "error": error,
        }
        logger.info(json.dumps(entry, separators=(",", ":")))

    def close(self) -> None:
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def open_access_log(option: Any) -> AccessLog | None:
    """`Mesh(access_log=...)` (else `MESH_ACCESS_LOG`, read by meshlib.settings): False/None
    (off), True (the `meshlib.access` logger), `"-"` (stdout), a path (a file, appended to), or
    a Logger."""
    if option is None:
        option = False
    if option is False:
        return None
    if option is True:
        return AccessLog(logging.getLogger(LOGGER))
    if isinstance(option, logging.Logger):
        return AccessLog(option)
    if isinstance(option, str | os.PathLike):
        handler: logging.Handler
        if os.fspath(option) == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            handler = logging.FileHandler(os.fspath(option), encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        # a logger of its own, outside logging's tree: the lines go to this file only
        logger = logging.Logger(LOGGER, logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
        return AccessLog(logger, handler)
    raise TypeError(f"access_log= takes a bool, a path, '-' or a logging.Logger, not {type(option).__name__}")

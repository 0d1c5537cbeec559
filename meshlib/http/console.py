"""`Mesh.serve`'s console: the mesh's INFO lines on stderr while it serves, when the app has not
configured logging.

`serve()` quiets uvicorn to warnings and says itself when it is ready (one INFO line on the
`meshlib` logger). Python shows nothing below WARNING until logging is configured, so a script
that only calls `mesh.serve(app)` would print nothing at all. uvicorn configures its own
loggers when it runs for the same reason; `serve()` does the same for `meshlib`, in uvicorn's
format, and only while it runs. An app that configured logging (a handler on the way up from
`meshlib`) keeps its own configuration untouched.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger("meshlib")


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """While open: `meshlib` INFO and above on stderr, unless logging is configured already."""
    if _configured(log):
        yield
        return
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    if level == logging.NOTSET:  # a level the app set on `meshlib` stays
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _configured(logger: logging.Logger) -> bool:
    """Whether a record of `logger` reaches a handler that shows it somewhere (meshlib's own
    NullHandler, there so that Python does not print its warnings unasked, does not count)."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False

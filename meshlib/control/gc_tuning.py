"""Garbage collection in the control service: fewer and shorter stops of the event loop.

Each open watch stream keeps a few hundred long-lived objects (uvicorn's protocol, h11's state,
sse-starlette's task group, anyio scopes, the queue, the client record). With CPython's default
thresholds (700, 10, 10) the collector walks all of them again and again: at 1,000 streams it
made 5 full collections in a minute of connecting and pushing, 1.7 s in all, the longest 0.73 s,
during which no stream, ack or apply moved (docs/benchmarks.md, "Convergence").

So, once the app has started: everything allocated at start-up (modules, models, the rules) is
frozen, out of every collection for good; and the thresholds are raised, so that the young
generation is collected every 20,000 allocations instead of 700 and an old one less often. The
collector still runs: cycles among the objects of closed streams are reclaimed, a little later.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("meshlib.control")

THRESHOLDS = (20_000, 20, 20)


def tune_for_service() -> None:
    """Freeze what start-up allocated and raise the thresholds (the control process only: it
    changes the whole interpreter's collector)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.debug("control: %d objects frozen out of garbage collection", gc.get_freeze_count())

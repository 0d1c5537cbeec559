"""What a Mesh spends applying what its control service pushes: CPU per call of the link's sink
(`ControlLink.apply`: the rules parsed and validated, the registry's endpoints checked, a new
Snapshot swapped in), for the three kinds of push a failover and everyday changes bring.

The rule set is bench/convergence.py's (20 services: Endpoints, Destination and Route each, 60
documents, an event of about 10 KB), with 5 registered endpoints per service. Each pushed state
is built as the subscriber builds it (`subscriber.fold`, the documents decoded afresh from JSON):

- a new version whose Routes changed (20 of the 60 documents: what bench/convergence.py applies),
- a new version with the same documents (a rule set applied again, or sent again in full),
- an `endpoint` event (one instance of one service came).

CPU time of this process, no IO (the cache file is not written); a few seconds in all.

    python bench/control_sink.py
    python bench/control_sink.py --rounds 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convergence import documents  # noqa: E402

import meshlib  # noqa: E402
from meshlib.control.link import ControlLink  # noqa: E402
from meshlib.control.subscriber import ControlState, fold  # noqa: E402

SERVICES = 20


def decoded(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return json.loads(json.dumps(docs))


def start_state() -> ControlState:
    endpoints = {
        f"svc{i}": [{"address": f"10.0.{i}.{k}:80", "labels": {"version": "v1"}} for k in range(5)]
        for i in range(SERVICES)
    }
    data = {
        "epoch": "e",
        "revision": 1,
        "version": 1,
        "documents": documents(SERVICES, 0),
        "endpoints": endpoints,
    }
    return ControlState.from_json(decoded([data])[0])


def per_call_ms(link: ControlLink, states: list[ControlState]) -> float:
    started = time.process_time()
    for state in states:
        error = link.apply(state, cache=False)
        assert error is None, error
    return (time.process_time() - started) / len(states) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="pushes of each kind")
    args = parser.parse_args(argv)
    n = args.rounds
    mesh = meshlib.Mesh("bench")
    try:
        with tempfile.TemporaryDirectory(prefix="control-sink-") as tmp:
            link = ControlLink(mesh, "http://127.0.0.1:9", Path(tmp))
            state = start_state()
            assert link.apply(state, cache=False) is None
            changed = []
            for g in range(1, n + 1):
                data = {
                    "epoch": "e",
                    "revision": 2 * g,
                    "version": 1 + g,
                    "documents": decoded(documents(SERVICES, g)),
                }
                state = fold(state, "rules", data)  # type: ignore[assignment]
                changed.append(state)
            same = []
            for k in range(1, n + 1):
                data = {
                    "epoch": "e",
                    "revision": 10 * n + k,
                    "version": 2 + n + k,
                    "documents": decoded(list(state.documents)),
                }
                same.append(fold(changed[-1] if not same else same[-1], "rules", data))
            events = []
            current = same[-1]
            for k in range(n):
                address = f"10.9.{k // 250}.{k % 250}:80"
                data = {
                    "epoch": "e",
                    "revision": 20 * n + k,
                    "service": "svc3",
                    "address": address,
                    "endpoint": {"address": address, "labels": {}},
                    "id": f"i{k}",
                }
                current = fold(current, "endpoint", data)  # type: ignore[assignment]
                events.append(current)
            rows = [
                ("new version, 20 of 60 documents changed", per_call_ms(link, changed)),
                ("new version, the same documents", per_call_ms(link, [s for s in same if s is not None])),
                ("endpoint event", per_call_ms(link, events)),
            ]
    finally:
        mesh.close()
    for name, ms in rows:
        print(f"{name}: {ms:.2f} ms CPU per push", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The subscriber's event stream reader: the events of a stream, however its bytes are cut, and
whichever line endings it uses; the same events httpx-sse finds in it."""

from __future__ import annotations

import asyncio

import httpx
from httpx_sse import EventSource

from meshlib.control.sse_reader import SSEReader

STREAM = (
    ": ping\r\n"
    'id: e:1\r\nevent: snapshot\r\ndata: {"a": 1}\r\n\r\n'
    ": ping\r\n"
    "event: rules\r\ndata: line one\r\ndata:line two\r\nid: e:2\r\n\r\n"
    "data: no type, so message\r\n\r\n"  # keeps the last id
    "event: nothing\r\n\r\n"  # no data: not dispatched
    "retry: 1500\r\nid: bad\0id\r\nevent: endpoint\r\ndata: \u00e9\r\n\r\n"
    "event: cut\r\ndata: never finished"
)
EXPECTED = [
    ("snapshot", '{"a": 1}', "e:1", None),
    ("rules", "line one\nline two", "e:2", None),
    ("message", "no type, so message", "e:2", None),
    ("endpoint", "\u00e9", "e:2", 1500),
]


def events_of(chunks: list[bytes]) -> list[tuple[str, str, str, int | None]]:
    reader = SSEReader()
    return [(e.event, e.data, e.id, e.retry) for chunk in chunks for e in reader.feed(chunk)]


def test_every_cut_of_the_stream_gives_the_same_events() -> None:
    data = STREAM.encode()
    assert events_of([data]) == EXPECTED
    for cut in range(1, len(data)):
        assert events_of([data[:cut], data[cut:]]) == EXPECTED, cut
    assert events_of([bytes([b]) for b in data]) == EXPECTED


def test_lf_and_cr_line_endings_and_a_byte_order_mark() -> None:
    for ending in ("\n", "\r"):
        data = b"\xef\xbb\xbf" + STREAM.replace("\r\n", ending).encode()
        assert events_of([data]) == EXPECTED, repr(ending)
        assert events_of([bytes([b]) for b in data]) == EXPECTED, repr(ending)


def test_the_same_events_as_httpx_sse() -> None:
    data = STREAM.encode()
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)

    async def theirs() -> list[tuple[str, str, str, int | None]]:
        return [
            (e.event, e.data, e.id, e.retry)
            async for e in EventSource(response).aiter_sse()
            if e.data  # httpx-sse also dispatches an event without data
        ]

    assert asyncio.run(theirs()) == events_of([data])

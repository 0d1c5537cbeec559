"""Server-sent events from the bytes of a watch stream, as they arrive.

The subscriber reads its stream with this rather than httpx-sse's `aiter_sse`, which decodes
the body to text chunk by chunk through httpx's text decoder (and parses the Content-Type's
charset with the email package once per response) and then splits and dispatches it line by
line in Python: per event here, the bytes are split into lines at once and each field line is
decoded alone. A replica's subscribers all reconnect and read a push at the same moment when
another replica dies (docs/decisions.md, "A lean watch response").

The format is the WHATWG event stream's: lines end with CRLF, LF or CR (a CR at the end of a
chunk is held until the next byte says whether an LF follows); a line starting with ':' is a
comment (the control service's `: ping`); `event`, `data`, `id` and `retry` fields, one space
after the colon dropped; a blank line dispatches the event when it has data (an event without
data is not dispatched, as the format says); the last `id` carries over to later events; a
leading byte order mark is dropped. Events are httpx-sse's `ServerSentEvent`s.
"""

from __future__ import annotations

from httpx_sse import ServerSentEvent

_BOM = b"\xef\xbb\xbf"


class SSEReader:
    """Feed it chunks; it returns the events each one completes."""

    __slots__ = ("_data", "_event", "_held", "_id", "_retry", "_started")

    def __init__(self) -> None:
        self._held = b""  # an unfinished line (and a CR that may be the first half of a CRLF)
        self._event = ""
        self._data: list[str] = []
        self._id = ""
        self._retry: int | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buf = self._held + chunk if self._held else chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._held = buf
                return []
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
        if buf.endswith(b"\r"):  # CR or the start of CRLF: the next chunk tells
            buf, tail = buf[:-1], b"\r"
        else:
            tail = b""
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._held = lines.pop() + tail
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(
                        ServerSentEvent(
                            event=self._event or "message",
                            data="\n".join(self._data),
                            id=self._id,
                            retry=self._retry,
                        )
                    )
                self._event = ""
                self._data = []
                continue
            if line[0] == 0x3A:  # ':' a comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value.decode("utf-8", "replace"))
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\0" not in value:
                    self._id = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():
                self._retry = int(value)
        return events

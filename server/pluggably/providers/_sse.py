"""An incremental Server-Sent Events parser (the WHATWG event-stream rules), for provider streams.

Real provider streams use everything the format allows, and each trips a naive parser somewhere:
CRLF or bare CR line ends (Gemini), one JSON payload spread over several `data:` lines, comment
lines (`: keep-alive`), `event:` names (Anthropic), and reads that split anywhere, even between
the CR and LF of one line end.

One UTF-8 byte order mark at the very start of the stream is dropped, as the spec says (a
decoder that keeps it would turn the first field name into "\ufeffdata" and lose the event).
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: bytes  # the data lines joined with "\n"
    event: str = ""  # "" when the event named none (the spec's "message")
    id: str | None = None


class SSEParser:
    """Feed bytes as they arrive; get complete events back. An event is dispatched at the blank
    line that ends it; an unterminated event at the end of the stream is dropped (as browsers
    do), which the adapters then see as a stream without its terminator."""

    __slots__ = ("_buffer", "_data", "_event", "_has_data", "_id", "_started", "comments")

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False  # past the position of a leading byte order mark
        self._data: list[bytes] = []
        self._event = ""
        self._id: str | None = None
        self._has_data = False
        self.comments = 0  # comment lines seen (keep-alives)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer  # maybe the start of a BOM split over reads
                return []
            self._started = True
            buffer = buffer.removeprefix(_BOM)
        events: list[SSEEvent] = []
        start = 0
        end = len(buffer)
        while start < end:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else end)
            if cr >= 0:
                if cr == end - 1:
                    break  # a CR at the end of the read: it may be the first half of CRLF
                line = buffer[start:cr]
                start = cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
            elif lf >= 0:
                line = buffer[start:lf]
                start = lf + 1
            else:
                break
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[SSEEvent]:
        """Call at the end of the body. A CR held back as the possible first half of a CRLF
        was a line end after all (bare-CR framing), and may complete the last event; anything
        after the last line end is discarded."""
        buffer, self._buffer = self._buffer, b""
        if buffer.endswith(b"\r"):
            return self.feed(buffer + b"\n")
        return []

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:
            if not self._has_data:
                self._event = ""
                return None
            event = SSEEvent(b"\n".join(self._data), self._event, self._id)
            self._data = []
            self._event = ""
            self._has_data = False
            return event
        if line[0] == 0x3A:  # ":" comment
            self.comments += 1
            return None
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")
        # `retry:` and unknown fields are ignored, as the spec says.
        return None

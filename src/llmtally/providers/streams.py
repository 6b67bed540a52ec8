"""Incremental stream framing: Server-Sent Events and streamed JSON arrays.

Both splitters take chunks cut anywhere (mid-line, mid-UTF-8 sequence, mid-``\\r\\n``) and hand
back complete units; they keep only the unfinished tail, never the whole stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(slots=True)
class SSEEvent:
    #: ``event:`` field, None when absent.
    event: str | None
    #: ``data:`` lines joined by ``\n``; None for a block with no data (comments only).
    data: str | None
    #: The exact bytes of the block including its terminating blank line (only with keep_raw).
    raw: bytes


class SSESplitter:
    """Splits an SSE byte stream into events per the WHATWG rules (CRLF, LF or CR line ends)."""

    __slots__ = ("_buf", "_data", "_event", "_keep_raw", "_raw")

    def __init__(self, keep_raw: bool = False) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._keep_raw = keep_raw
        self._raw = bytearray()

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        pos = 0
        size = len(buf)
        for match in _EOL.finditer(buf):
            end = match.end()
            # A CR at the very end may be the first half of a CRLF split across chunks.
            if end == size and buf[-1:] == b"\r":
                break
            self._line(buf[pos : match.start()], buf, pos, end, events)
            pos = end
        self._buf = buf[pos:]
        return events

    def finish(self) -> tuple[list[SSEEvent], bytes]:
        """End of stream: the last events, and raw bytes of an unterminated block (kept mode)."""
        events: list[SSEEvent] = []
        if self._buf:
            buf, self._buf = self._buf, b""
            line = buf[:-1] if buf.endswith(b"\r") else buf
            self._line(line, buf, 0, len(buf), events)
        # An unterminated final block is still parsed (usage may be in it); its bytes go back
        # separately so the caller forwards them unchanged.
        tail = bytes(self._raw)
        if self._data:
            events.append(self._dispatch(b""))
        self._raw.clear()
        return events, tail

    def _line(self, line: bytes, buf: bytes, start: int, end: int, events: list[SSEEvent]) -> None:
        if self._keep_raw:
            self._raw += buf[start:end]
        if not line:
            if self._data or (self._keep_raw and self._raw):
                events.append(self._dispatch(bytes(self._raw)))
            self._raw.clear()
            return
        if line[:1] == b":":
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value

    def _dispatch(self, raw: bytes) -> SSEEvent:
        data = b"\n".join(self._data).decode("utf-8", "replace") if self._data else None
        event = self._event.decode("utf-8", "replace") if self._event is not None else None
        self._data = []
        self._event = None
        return SSEEvent(event=event, data=data, raw=raw)


_JSON_SPECIAL = re.compile(rb'["\\{}\[\]]')


class JSONArraySplitter:
    """Yields each top-level element (as bytes) of a JSON array streamed in pieces.

    Gemini's ``:streamGenerateContent`` without ``alt=sse`` sends ``[{...},\\r\\n{...}]``.
    """

    __slots__ = ("_buf", "_depth", "_in_string", "_scan", "_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._start = -1
        self._scan = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        out: list[bytes] = []
        buf = self._buf
        i = self._scan
        size = len(buf)
        while i < size:
            if self._in_string:
                # Jump to the next quote or backslash inside a string.
                j = _next_in_string(buf, i)
                if j < 0:
                    i = size
                    break
                if buf[j] == 0x5C:  # backslash: skip the escaped byte
                    if j + 1 >= size:
                        i = j  # rescan from the backslash once the next byte arrives
                        break
                    i = j + 2
                    continue
                self._in_string = False
                i = j + 1
                continue
            match = _JSON_SPECIAL.search(buf, i)
            if match is None:
                i = size
                break
            j = match.start()
            ch = buf[j]
            if ch == 0x22:  # "
                self._in_string = True
            elif ch in (0x7B, 0x5B):  # { [
                self._depth += 1
                if self._depth == 2 and ch == 0x7B:
                    self._start = j
            elif ch in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 1 and ch == 0x7D and self._start >= 0:
                    out.append(bytes(buf[self._start : j + 1]))
                    self._start = -1
            i = j + 1
        # Drop what no pending element needs.
        keep_from = self._start if self._start >= 0 else i
        if keep_from > 0:
            del buf[:keep_from]
            if self._start >= 0:
                self._start = 0
            i -= keep_from
        self._scan = i
        return out


def _next_in_string(buf: bytearray, start: int) -> int:
    q = buf.find(b'"', start)
    b = buf.find(b"\\", start)
    if q < 0:
        return b
    if b < 0:
        return q
    return min(q, b)

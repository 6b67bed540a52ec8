"""Amazon Bedrock's framing: AWS event-stream messages around the dialect's own events.

``InvokeModelWithResponseStream`` sends each of the model's events (Claude's ``message_start`` …
``message_stop``) base64-encoded in ``{"bytes": …}`` inside an event-stream ``chunk`` message. Messages
are read with botocore's parser (prelude and message CRC32 checked), and each event is handed to the
dialect's stream parser as the SSE event the direct API would have sent, so the dialect never knows
the route.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmtally.providers.base import ResponseSummary, StreamParser
from llmtally.record import Provider

#: genai-prices' provider for Bedrock: its model ids (``anthropic.claude-…-v1:0``, with the ``us.`` /
#: ``eu.`` / ``global.`` inference-profile prefixes and ARNs) and the regional vs global rates.
PRICE_DATA: Mapping[Provider, str] = {"anthropic": "aws"}


class FrameError(ValueError):
    """A message that is not what its event type promises (an InvokeModel chunk with no event)."""


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One event-stream message: ``message_type`` is ``event``, ``exception`` or ``error``."""

    message_type: str
    event_type: str | None
    exception_type: str | None
    payload: bytes


class EventStreamReader:
    """Whole messages out of an event-stream body fed in chunks cut anywhere.

    botocore is imported on first use: only Bedrock routes need it (the ``bedrock`` extra).
    """

    __slots__ = ("_buffer", "error")

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer

        self._buffer = EventStreamBuffer()
        #: Why the stream stopped being readable; nothing is read after it.
        self.error: str | None = None

    def feed(self, chunk: bytes) -> list[EventMessage]:
        """The messages this chunk completes; those before a corrupt one are returned, and ``error``
        is set from then on."""
        if self.error is not None:
            return []
        from botocore.eventstream import ParserError

        self._buffer.add_data(chunk)
        out: list[EventMessage] = []
        try:
            for message in self._buffer:
                headers = message.headers
                out.append(
                    EventMessage(
                        message_type=str(headers.get(":message-type", "event")),
                        event_type=_text(headers.get(":event-type")),
                        exception_type=_text(headers.get(":exception-type") or headers.get(":error-code")),
                        payload=bytes(message.payload),
                    )
                )
        except (ParserError, ValueError, UnicodeDecodeError) as exc:
            self.error = f"the event stream is corrupt ({type(exc).__name__})"
        return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def invoke_event_as_sse(message: EventMessage) -> bytes:
    """The SSE event the direct API sends for this InvokeModel stream message (b"" for none).

    A ``chunk``'s inner event goes as ``data: <event>``; an exception mid-stream (throttling, a
    model error) as the dialect's error event, so the record says the stream failed.
    """
    if message.message_type != "event":
        kind = message.exception_type or message.message_type
        return b'data: {"type":"error","error":{"type":"' + _json_safe(kind) + b'"}}\n\n'
    if message.event_type != "chunk":
        return b""
    try:
        wrapper = orjson.loads(message.payload)
        inner = base64.b64decode(wrapper["bytes"], validate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise FrameError(f"an InvokeModel chunk holds no event ({type(exc).__name__})") from None
    return b"data: " + inner.replace(b"\n", b" ") + b"\n\n"


def _json_safe(text: str) -> bytes:
    return orjson.dumps(text)[1:-1]


@dataclass(slots=True)
class InvokeStreamParser:
    """A dialect's :class:`StreamParser` behind Bedrock's event-stream framing."""

    dialect: StreamParser
    reader: EventStreamReader = field(default_factory=EventStreamReader)
    error: str | None = None
    #: Bytes of the SSE the dialect was fed (tests compare it with the direct API's stream).
    on_sse: Callable[[bytes], None] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        try:
            for message in self.reader.feed(chunk):
                sse = invoke_event_as_sse(message)
                if sse:
                    if self.on_sse is not None:
                        self.on_sse(sse)
                    self.dialect.feed(sse)
        except FrameError as exc:
            self.error = f"metering failed: {exc}"
        if self.reader.error is not None and self.error is None:
            self.error = f"metering failed: {self.reader.error}"

    def finish(self) -> ResponseSummary:
        summary = self.dialect.finish()
        if self.error is not None:
            summary.error = summary.error or self.error
        return summary

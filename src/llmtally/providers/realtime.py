"""WebSocket sessions (OpenAI Realtime, Gemini Live): what the transport asks of a dialect's reader.

A session is metered one record per billed response. The transport (:mod:`llmtally.proxy.websocket`)
forwards every message unchanged and hands each one, after it was forwarded, to the session's
:class:`SessionReader`, which parses the dialect's events and says when a response is complete (its
usage) and, when the session ends, which responses were cut off (their output text, to estimate).
Readers are pure: the transport passes the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from llmtally.providers.base import Endpoint, ResponseSummary
from llmtally.record import Provider


@dataclass(slots=True)
class SessionResponse:
    """One billed response of a session: its summary, and when it started and first produced output
    (the transport's clock, seconds; None when not seen)."""

    summary: ResponseSummary
    started: float | None = None
    first_output: float | None = None


class SessionReader(Protocol):
    """One session's reading of its messages."""

    endpoint: Endpoint
    #: The model the session runs (from the URL, then from the session's own events).
    model: str | None
    #: Messages that were not JSON (or not an event): forwarded, not metered.
    malformed: int
    #: The API sends its events in binary frames too (Gemini Live): they are read as text ones.
    binary_events: bool

    def server_message(self, data: str | bytes, now: float) -> list[SessionResponse]:
        """A message from the upstream; the responses it completed."""
        ...

    def client_message(self, data: str | bytes, now: float) -> None:
        """A message from the client."""
        ...

    def finish(self) -> list[SessionResponse]:
        """The session ended: the responses still open (cut off), with what they produced so far."""
        ...


#: A dialect's reader for a WebSocket path (the path after the route prefix, and its query), or None
#: when the path is not one of its WebSocket APIs.
ReaderFactory = Callable[[str, Mapping[str, str]], SessionReader | None]


def _readers() -> dict[Provider, ReaderFactory]:
    from llmtally.providers import live_gemini, realtime_openai

    return {"openai": realtime_openai.reader_for, "gemini": live_gemini.reader_for}


_READERS: dict[Provider, ReaderFactory] | None = None


def session_reader(dialect: Provider, tail: str, query: Mapping[str, str]) -> SessionReader | None:
    """The reader of a WebSocket session on ``tail`` in ``dialect``, or None: not a metered session."""
    global _READERS
    if _READERS is None:
        _READERS = _readers()
    factory = _READERS.get(dialect)
    return factory(tail, query) if factory is not None else None

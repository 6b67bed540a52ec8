"""OpenAI's Realtime API (``/v1/realtime?model=…``): its server events, read for metering.

Every ``response.done`` event is one billed response: ``response.usage`` has ``input_tokens`` (text,
audio and image, cached included), ``output_tokens`` (text and audio), ``input_token_details``
(``text_tokens``, ``audio_tokens``, ``image_tokens``, ``cached_tokens`` and its
``cached_tokens_details`` by modality) and ``output_token_details`` (``text_tokens``,
``audio_tokens``); see the openai SDK's ``types/realtime/realtime_response_usage*.py``. Each turn
re-bills the conversation so far as input, mostly from the cache. A response still open when the
session ends is returned by :meth:`OpenAIRealtimeReader.finish` with the text (and audio transcript)
deltas it produced, for an estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmtally.providers.base import Endpoint, InvalidUsage, ResponseSummary, as_int, get_path
from llmtally.providers.realtime import SessionResponse
from llmtally.record import TokenUsage

REALTIME = Endpoint(provider="openai", name="realtime")
#: Server events carrying output text of a response (GA names, then the beta API's).
_TEXT_DELTAS = frozenset({
    "response.output_text.delta", "response.output_audio_transcript.delta",
    "response.text.delta", "response.audio_transcript.delta",
})  # fmt: skip
_SESSION_EVENTS = frozenset({"session.created", "session.updated"})


def reader_for(tail: str, query: Mapping[str, str]) -> OpenAIRealtimeReader | None:
    """``v1/realtime`` (the SDK's ``client.realtime.connect`` and ``client.beta.realtime.connect``)."""
    if tail.rstrip("/") != "v1/realtime":
        return None
    return OpenAIRealtimeReader(query.get("model") or None)


def usage_from_realtime(usage: Any) -> TokenUsage | None:
    """A ``response.usage`` object as normalised usage (raises InvalidUsage for a non-count)."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_token_details")
    out_details = usage.get("output_token_details")
    return TokenUsage(
        input_tokens=as_int(usage.get("input_tokens")),
        output_tokens=as_int(usage.get("output_tokens")),
        cache_read_tokens=as_int(get_path(details, "cached_tokens")),
        input_audio_tokens=as_int(get_path(details, "audio_tokens")),
        output_audio_tokens=as_int(get_path(out_details, "audio_tokens")),
        cache_read_audio_tokens=as_int(get_path(details, "cached_tokens_details", "audio_tokens")),
    )


@dataclass(slots=True)
class _Open:
    """A response between ``response.created`` and ``response.done``."""

    started: float
    first_output: float | None = None
    summary: ResponseSummary = field(default_factory=ResponseSummary)
    kept: list[int] = field(default_factory=lambda: [0])


class OpenAIRealtimeReader:
    """One Realtime session's server events (client events carry nothing billed)."""

    __slots__ = ("_open", "malformed", "model")

    endpoint = REALTIME
    binary_events = False  # the Realtime API's events are text frames; binary ones are not read

    def __init__(self, model: str | None) -> None:
        self.model = model
        self.malformed = 0
        self._open: dict[str, _Open] = {}

    def client_message(self, data: str | bytes, now: float) -> None:
        return None

    def server_message(self, data: str | bytes, now: float) -> list[SessionResponse]:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return []
        if not isinstance(event, dict) or not isinstance(kind := event.get("type"), str):
            self.malformed += 1
            return []
        if kind in _TEXT_DELTAS:
            self._delta(event, now)
        elif kind == "response.created":
            response_id = get_path(event, "response", "id")
            if isinstance(response_id, str):
                self._open[response_id] = _Open(now)
        elif kind == "response.done":
            return [self._done(event, now)]
        elif kind in _SESSION_EVENTS:
            model = get_path(event, "session", "model")
            if isinstance(model, str) and model:
                self.model = model
        elif kind.startswith("response.") and kind.endswith(".delta"):  # audio: output, not text
            response = self._open.get(str(event.get("response_id")))
            if response is not None and response.first_output is None:
                response.first_output = now
        return []

    def finish(self) -> list[SessionResponse]:
        cut, self._open = self._open, {}
        out = []
        for response_id, response in cut.items():
            summary = response.summary
            summary.model = self.model
            summary.upstream_request_id = response_id
            summary.error = "the session ended before response.done: output estimated from its text"
            out.append(SessionResponse(summary, response.started, response.first_output))
        return out

    def _delta(self, event: dict[str, Any], now: float) -> None:
        response = self._open.get(str(event.get("response_id")))
        if response is None:
            return
        if response.first_output is None:
            response.first_output = now
        delta = event.get("delta")
        if isinstance(delta, str):
            response.summary.keep_text(delta, response.kept)

    def _done(self, event: dict[str, Any], now: float) -> SessionResponse:
        response = event.get("response")
        response_id = get_path(response, "id")
        opened = self._open.pop(response_id, None) if isinstance(response_id, str) else None
        summary = opened.summary if opened is not None else ResponseSummary()
        summary.model = self.model
        summary.upstream_request_id = response_id if isinstance(response_id, str) else None
        summary.complete = True
        try:
            summary.usage = usage_from_realtime(get_path(response, "usage"))
        except InvalidUsage as exc:
            summary.usage_error = f"provider usage is not a token count ({exc})"
        if get_path(response, "status") == "failed":
            kind = get_path(response, "status_details", "error", "type")
            summary.error = f"response failed: {kind}" if isinstance(kind, str) else "response failed"
        if summary.usage is not None or summary.usage_error is not None:
            summary.output_text = []  # reported usage: the text is not needed
        if opened is None:
            return SessionResponse(summary)
        return SessionResponse(summary, opened.started, opened.first_output)

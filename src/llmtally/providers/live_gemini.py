"""Gemini's Live API (``BidiGenerateContent`` over a WebSocket): its messages, read for metering.

The client's first message is ``{"setup": {"model": "models/…", …}}`` (the model the session runs).
The server's messages are JSON, sent in binary frames by the API (text frames are read alike);
``usageMetadata`` comes with the turns: ``promptTokenCount`` (cached included),
``cachedContentTokenCount``, ``responseTokenCount``, ``toolUsePromptTokenCount``,
``thoughtsTokenCount`` and the ``promptTokensDetails`` / ``cacheTokensDetails`` /
``responseTokensDetails`` lists by modality (google-genai's ``types.UsageMetadata``). A turn is one
billed response: it ends with ``serverContent.turnComplete`` (or ``interrupted``), and its usage may
come in the same message or the next; several usage messages within a turn are taken as cumulative
(the last one wins), as in Gemini's HTTP streams.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from llmtally.providers.base import Endpoint, InvalidUsage, ResponseSummary, as_int, get_path
from llmtally.providers.gemini import modality_tokens
from llmtally.providers.realtime import SessionResponse
from llmtally.record import TokenUsage

LIVE = Endpoint(provider="gemini", name="live")
_PATH = re.compile(
    r"ws/google\.ai\.generativelanguage\.(v1|v1beta|v1alpha)\.GenerativeService\.BidiGenerateContent"
)
_TURN_END = ("turnComplete", "interrupted")


def reader_for(tail: str, query: Mapping[str, str]) -> GeminiLiveReader | None:
    """``ws/google.ai.generativelanguage.{v1,v1beta,v1alpha}.GenerativeService.BidiGenerateContent``."""
    return GeminiLiveReader() if _PATH.fullmatch(tail) else None


def usage_from_live(meta: Any) -> TokenUsage | None:
    """A Live ``usageMetadata`` as normalised usage (raises InvalidUsage for a non-count)."""
    if not isinstance(meta, dict):
        return None
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    return TokenUsage(
        input_tokens=as_int(meta.get("promptTokenCount")) + as_int(meta.get("toolUsePromptTokenCount")),
        output_tokens=as_int(meta.get("responseTokenCount")) + thoughts,
        cache_read_tokens=as_int(meta.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        input_audio_tokens=modality_tokens(meta.get("promptTokensDetails"), "AUDIO")
        + modality_tokens(meta.get("toolUsePromptTokensDetails"), "AUDIO"),
        output_audio_tokens=modality_tokens(meta.get("responseTokensDetails"), "AUDIO"),
        input_image_tokens=modality_tokens(meta.get("promptTokensDetails"), "IMAGE", "DOCUMENT"),
        cache_read_audio_tokens=modality_tokens(meta.get("cacheTokensDetails"), "AUDIO"),
    )


class GeminiLiveReader:
    """One Live session: the setup's model, then each turn's output and usage."""

    __slots__ = ("_ended", "_first_output", "_kept", "_started", "_summary", "_usage", "malformed", "model")

    endpoint = LIVE
    binary_events = True

    def __init__(self) -> None:
        self.model: str | None = None
        self.malformed = 0
        self._reset()

    def _reset(self) -> None:
        self._summary = ResponseSummary()
        self._kept = [0]
        self._usage: dict[str, Any] | None = None
        self._started: float | None = None
        self._first_output: float | None = None
        #: The turn ended (turnComplete) and waits for its usage.
        self._ended = False

    def client_message(self, data: str | bytes, now: float) -> None:
        if self.model is not None:
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        model = get_path(message, "setup", "model")
        if isinstance(model, str) and model:
            self.model = model.removeprefix("models/")

    def server_message(self, data: str | bytes, now: float) -> list[SessionResponse]:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return []
        if not isinstance(message, dict):
            self.malformed += 1
            return []
        content = message.get("serverContent")
        if isinstance(content, dict):
            self._content(content, now)
        meta = message.get("usageMetadata")
        if isinstance(meta, dict):
            self._usage = meta
            if self._started is None:
                self._started = now
        ended = isinstance(content, dict) and any(content.get(key) is True for key in _TURN_END)
        if ended:
            self._ended = True
        if self._ended and self._usage is not None:
            return [self._emit(complete=True)]
        return []

    def finish(self) -> list[SessionResponse]:
        if self._started is None:
            return []
        response = self._emit(complete=False)
        if response.summary.usage is None:
            response.summary.error = (
                "the session ended before the turn's usage: output estimated from its text"
            )
        return [response]

    def _content(self, content: dict[str, Any], now: float) -> None:
        texts = [
            part.get("text")
            for part in get_path(content, "modelTurn", "parts") or ()
            if isinstance(part, dict)
        ]
        texts.append(get_path(content, "outputTranscription", "text"))
        produced = bool(get_path(content, "modelTurn", "parts"))
        for text in texts:
            if isinstance(text, str) and text:
                self._summary.keep_text(text, self._kept)
                produced = True
        if produced:
            if self._started is None:
                self._started = now
            if self._first_output is None:
                self._first_output = now

    def _emit(self, complete: bool) -> SessionResponse:
        summary = self._summary
        summary.model = self.model
        summary.complete = complete
        try:
            summary.usage = usage_from_live(self._usage)
        except InvalidUsage as exc:
            summary.usage_error = f"provider usage is not a token count ({exc})"
        if summary.usage is not None or summary.usage_error is not None:
            summary.output_text = []
        response = SessionResponse(summary, self._started, self._first_output)
        self._reset()
        return response

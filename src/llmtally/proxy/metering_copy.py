"""What the meter gets of a response the proxy forwards: its bytes, or its stream parsed as it passes.

A worker's event loop forwards every open stream's events, and on a 2-core sidecar a new stream's
first byte waits for the events ahead of it: parsing each event there was about a third of a
worker's CPU per stream (docs/performance.md). So the copy is parsed where it costs no latency:

- **a stream** is kept as it came and parsed in the record process with the provider's stream
  parser, as a non-streamed body is, while it fits: up to :data:`MAX_DEFERRED_STREAM` and within
  the worker's :class:`StreamBudget` (``[metering] deferred_stream_parse_mb``, shared by all its
  streams). Past either, it is parsed here, incrementally, from then on (what was kept goes first),
  so a worker's memory for this is bounded however many streams are open;
- **a body** (non-streamed, or an error answer to a stream) is kept up to ``max_response_body_mb``.

A stream llmtally edits (OpenAI usage injection) is metered the same way, from the bytes the upstream
sent; the edit itself is the provider's :class:`~llmtally.providers.StreamEditor`.

A metering failure is noted on the exchange and never reaches the client's bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmtally.exchange import Exchange
from llmtally.platforms import stream_parser
from llmtally.providers import MeteredRequest, ProviderAdapter, StreamParser
from llmtally.providers.encoding import Decoder, UndecodableBody

log = logging.getLogger("llmtally.proxy")

TOO_LARGE_TO_METER = "response body larger than metering.max_response_body_mb: not parsed"
#: Most of one stream kept for the record process; a longer stream gains nothing from waiting.
MAX_DEFERRED_STREAM = 1024 * 1024


@dataclass(slots=True)
class StreamBudget:
    """Bytes of streams one worker may hold for the record process (``limit``), and holds now."""

    limit: int
    held: int = 0


class MeteringCopy:
    """The meter's copy of one response; :meth:`hand_over` puts it on the exchange at the end."""

    __slots__ = (
        "_adapter", "_budget", "_chunks", "_decode", "_encoding", "_exchange", "_max_body", "_request",
        "_size", "_stream", "parser",
    )  # fmt: skip

    def __init__(
        self,
        exchange: Exchange,
        adapter: ProviderAdapter,
        request: MeteredRequest,
        *,
        stream: bool,
        encoding: str,
        max_body: int,
        budget: StreamBudget,
    ) -> None:
        """``stream``: a 2xx streamed answer (parsed as a stream)."""
        self._exchange = exchange
        self._adapter = adapter
        self._request = request
        self._encoding = encoding
        #: Made with the parser: a copy kept for the record process is decoded there.
        self._decode: Decoder | None = None
        self._stream = stream
        self._max_body = max_body
        self._budget = budget
        self._chunks: list[bytes] | None = []
        self._size = 0
        #: The stream parser, once the stream is parsed here.
        self.parser: StreamParser | None = None

    @property
    def stream(self) -> bool:
        """A 2xx streamed answer, metered with the provider's stream parser."""
        return self._stream

    @property
    def metering(self) -> bool:
        """Still metering (no parser failure, not too large)."""
        return self.parser is not None or self._chunks is not None

    @property
    def held(self) -> int:
        """Bytes held for the record process."""
        return self._size if self._chunks is not None else 0

    def feed(self, chunk: bytes) -> None:
        """Meter a chunk that was forwarded as it came."""
        try:
            parser, decode = self.parser, self._decode
            if parser is not None and decode is not None:
                parser.feed(decode(chunk))
                return
            chunks = self._chunks
            if chunks is None:
                return
            size = len(chunk)
            if not self._stream:
                if self._size + size > self._max_body:
                    self._chunks = None
                    self._exchange.error = TOO_LARGE_TO_METER
                    return
            elif self._size + size > MAX_DEFERRED_STREAM or self._budget.held + size > self._budget.limit:
                self._parse_here(chunk)
                return
            else:
                self._budget.held += size
            chunks.append(chunk)
            self._size += size
        except Exception as exc:  # a parser bug must not break the caller's stream
            self._failed(exc)

    def hand_over(self, *, whole: bool = True) -> None:
        """Put what the meter needs on the exchange (once; later calls do nothing).

        ``whole=False``: the response was cut off. A stream's part still carries usage and text; part
        of a body does not parse, so it is dropped.
        """
        exchange = self._exchange
        if not whole and not self._stream:
            self._chunks = None
        if self.parser is not None:
            parser, self.parser = self.parser, None
            try:
                exchange.summary = parser.finish()
            except Exception as exc:
                self._failed(exc)
        elif self._chunks is not None:
            exchange.response_chunks, exchange.response_encoding = self._drop_chunks(), self._encoding
            exchange.response_stream = self._stream

    def _parse_here(self, chunk: bytes) -> None:
        """Parse the stream here from ``chunk`` on; what was kept goes first."""
        parser = stream_parser(self._adapter, self._request)
        decode = Decoder(self._encoding)
        for kept in self._drop_chunks():
            parser.feed(decode(kept))
        parser.feed(decode(chunk))
        self.parser, self._decode = parser, decode

    def _drop_chunks(self) -> list[bytes]:
        chunks, self._chunks = self._chunks or [], None
        if self._stream:
            self._budget.held -= self._size
        self._size = 0
        return chunks

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, UndecodableBody):  # the upstream's bytes, not our bug: no traceback
            log.warning("request %s: %s; not metered", self._exchange.request_id, exc)
            self._exchange.error = str(exc)
        else:
            log.exception("metering parser failed; forwarding unchanged from here", exc_info=exc)
            self._exchange.error = f"metering failed: {type(exc).__name__}"
        self.parser = None
        self._drop_chunks()

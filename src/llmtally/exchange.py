"""What the proxy hands over per metered call, and the :class:`Meter` it hands it to.

Kept apart from :mod:`llmtally.metering` (counting, pricing) so a proxy worker process imports only
transport and parsing: it never holds tokenizers or price data.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from llmtally.providers.base import MeteredRequest, ResponseSummary
from llmtally.record import PlatformName, Provider

if TYPE_CHECKING:
    from llmtally.counters import TokenCount


@dataclass(slots=True)
class Exchange:
    """What the proxy saw of one metered call."""

    request_id: str
    provider: Provider
    request: MeteredRequest
    started_at: datetime
    summary: ResponseSummary | None = None
    #: A non-streamed response body (decoded), parsed later in the pipeline worker.
    response_body: bytes | None = None
    #: Or the body as it arrived, with its Content-Encoding: decoded in the worker too.
    response_chunks: list[bytes] | None = None
    response_encoding: str = "identity"
    #: ``response_chunks`` are a 2xx stream, parsed with the provider's stream parser.
    response_stream: bool = False
    status: int | None = None
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    client_disconnected: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    upstream_request_id: str | None = None
    #: Local count of the request's input tokens: a count, a count still running in the proxy's
    #: counting thread, or None (not counted yet).
    input_estimate: TokenCount | Future[TokenCount | None] | None = None
    #: A background drain owns this exchange and submits its record when done.
    deferred: bool = False
    #: Count the request's input tokens for ``estimated_input_tokens`` even when the provider reports usage.
    count_input: bool = False
    #: The route it was billed through (direct, Azure, Vertex, Bedrock): picks the price data.
    platform: PlatformName = "direct"
    #: The model to price by instead of the response's, when the route names it more exactly (a
    #: Bedrock inference profile); None: the response's, else the request's.
    price_model: str | None = None
    #: What the route knows that makes the price differ from the bill (an Azure Data Zone deployment).
    pricing_note: str | None = None
    #: The response headers the dialect reads usage from (``ProviderAdapter.usage_headers``), as sent.
    usage_headers: dict[str, str] | None = None
    #: Spend-limit rules the call went past (the refusing one, or warn-only ones), comma-separated.
    budget_exceeded: str | None = None
    #: A batch result's batch (or result file) and the client's id for its request.
    batch_id: str | None = None
    custom_id: str | None = None
    #: The WebSocket session (OpenAI Realtime, Gemini Live) the record is one response of.
    session_id: str | None = None


class Meter(Protocol):
    """Where the proxy hands what it saw; builds each exchange's record off the request path."""

    def submit(self, exchange: Exchange) -> None:
        """Take an exchange; never blocks, never raises."""
        ...

    async def metrics(self) -> bytes | None:
        """The Prometheus exposition of the records built so far; None when metrics are off."""
        ...

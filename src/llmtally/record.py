"""The normalised token usage and the usage record every metered call produces.

Normalisation follows the OpenTelemetry GenAI semantic conventions: ``input_tokens`` includes cache
reads and cache writes, ``output_tokens`` includes reasoning/thinking tokens. Each provider module
maps its own usage object onto :class:`TokenUsage`; nothing else knows provider field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

#: The API dialect a call spoke: the three providers' own, and Bedrock's Converse (any model).
Provider = Literal["openai", "anthropic", "gemini", "converse", "invoke"]
#: The route a call was billed through; ``provider`` stays the API dialect (``openai`` for Azure,
#: ``gemini`` for Vertex Gemini, ``anthropic`` for Claude on Vertex or Bedrock).
PlatformName = Literal["direct", "azure", "vertex", "bedrock"]
#: ``provider``: the provider reported the numbers (billing truth); ``estimated``: counted locally;
#: ``none``: nothing to count (e.g. an error response with no usage).
UsageSource = Literal["provider", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts in normalised (OTel GenAI) meaning."""

    input_tokens: int = 0
    output_tokens: int = 0
    #: Part of ``input_tokens`` read from the prompt cache.
    cache_read_tokens: int = 0
    #: Part of ``input_tokens`` written to the prompt cache (all durations).
    cache_write_tokens: int = 0
    #: Part of ``cache_write_tokens`` written with a 1-hour TTL (Anthropic).
    cache_write_1h_tokens: int = 0
    #: Part of ``output_tokens`` spent on reasoning/thinking; None when the provider does not say.
    reasoning_tokens: int | None = None
    #: Part of ``input_tokens`` that is audio (priced apart where the provider does).
    input_audio_tokens: int = 0
    #: Part of ``output_tokens`` that is audio.
    output_audio_tokens: int = 0
    #: Part of ``input_tokens`` that is image (an image model's or a vision prompt's), priced apart
    #: where the price data lists an image input rate.
    input_image_tokens: int = 0
    #: Part of ``output_tokens`` that is image (generated images: gpt-image-*, Gemini image models).
    output_image_tokens: int = 0
    #: Part of ``cache_read_tokens`` (and of ``input_audio_tokens``) that is audio read from the cache
    #: (OpenAI Realtime ``cached_tokens_details.audio_tokens``): priced at the cached-audio rate.
    cache_read_audio_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class LineItem:
    """A billed unit beyond tokens (a web search, a grounded prompt …), priced; ``unit_price`` and
    ``cost`` are None when no price is known (never taken as zero), and ``source`` says where the
    price came from."""

    item: str
    quantity: int
    unit: str
    unit_price: Decimal | None
    cost: Decimal | None
    source: str

    def to_dict(self) -> dict[str, object]:
        return {
            "item": self.item, "quantity": self.quantity, "unit": self.unit,
            "unit_price": self.unit_price, "cost": self.cost, "source": self.source,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Cost:
    """What a call cost, in ``currency``; ``input_cost`` includes cache read and write costs, and
    ``total_cost`` the priced line items too."""

    input_cost: Decimal
    output_cost: Decimal
    currency: str = "USD"
    line_items: tuple[LineItem, ...] = ()

    @property
    def total_cost(self) -> Decimal:
        items = sum((i.cost for i in self.line_items if i.cost is not None), Decimal(0))
        return self.input_cost + self.output_cost + items


@dataclass(slots=True)
class UsageRecord:
    """One metered call. Field names are the JSON record's (see docs/records.md)."""

    timestamp: str
    request_id: str
    provider: Provider
    endpoint: str
    request_model: str | None
    model: str | None
    stream: bool
    status: int | None
    usage: TokenUsage
    usage_source: UsageSource
    cost: Cost | None
    price_source: str
    latency_ms: float
    ttfb_ms: float | None
    client_disconnected: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    #: Input tokens counted locally from the request (an estimate unless ``estimate_exact``).
    estimated_input_tokens: int | None = None
    upstream_request_id: str | None = None
    service_tier: str | None = None
    price_version: str | None = None
    #: The model name the price was found under (after aliases and snapshot fallback).
    priced_model: str | None = None
    #: Data-residency region inference ran in (Anthropic ``inference_geo``), when not global.
    inference_geo: str | None = None
    #: Why the price may not be what the provider bills (a service tier without price data), if so.
    pricing_note: str | None = None
    #: The call was answered by llmtally's built-in fake upstream (``serve --fake-upstream``), not a
    #: provider: its usage and cost are made up.
    fake_upstream: bool = False
    platform: PlatformName = "direct"
    #: Billed units beyond tokens (web searches, grounded prompts …); the priced ones are in
    #: ``cost.total_cost``.
    line_items: tuple[LineItem, ...] = ()
    #: Spend-limit rules the call went past: the one that refused it (``error: "budget_exceeded"``,
    #: status 429), or warn-only rules it was forwarded over (comma-separated); None otherwise.
    budget_exceeded: str | None = None
    #: A batch result's batch (OpenAI: its output file), and the id the client gave its request.
    batch_id: str | None = None
    custom_id: str | None = None
    #: A WebSocket session's id (OpenAI Realtime, Gemini Live), shared by all its records.
    session_id: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The record as the JSON log line's object (costs stay Decimal; the sink encodes them)."""
        usage = self.usage
        cost = self.cost
        return {
            "event": "llm.usage",
            "timestamp": self.timestamp,
            "request_id": self.request_id,
            "provider": self.provider,
            "platform": self.platform,
            "endpoint": self.endpoint,
            "request_model": self.request_model,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_read_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "cache_write_1h_tokens": usage.cache_write_1h_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "input_audio_tokens": usage.input_audio_tokens,
            "output_audio_tokens": usage.output_audio_tokens,
            "input_image_tokens": usage.input_image_tokens,
            "output_image_tokens": usage.output_image_tokens,
            "cache_read_audio_tokens": usage.cache_read_audio_tokens,
            "total_tokens": usage.total_tokens,
            "usage_source": self.usage_source,
            "estimated_input_tokens": self.estimated_input_tokens,
            "input_cost": cost.input_cost if cost else None,
            "output_cost": cost.output_cost if cost else None,
            "total_cost": cost.total_cost if cost else None,
            "currency": cost.currency if cost else "USD",
            "line_items": [item.to_dict() for item in self.line_items],
            "price_source": self.price_source,
            "price_version": self.price_version,
            "priced_model": self.priced_model,
            "pricing_note": self.pricing_note,
            "service_tier": self.service_tier,
            "inference_geo": self.inference_geo,
            "latency_ms": self.latency_ms,
            "ttfb_ms": self.ttfb_ms,
            "client_disconnected": self.client_disconnected,
            "fake_upstream": self.fake_upstream,
            "tags": self.tags,
            "upstream_request_id": self.upstream_request_id,
            "batch_id": self.batch_id,
            "custom_id": self.custom_id,
            "session_id": self.session_id,
            "error": self.error,
            "budget_exceeded": self.budget_exceeded,
        }

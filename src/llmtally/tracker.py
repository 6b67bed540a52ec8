"""The library face of llmtally: count tokens, price usage, and meter responses in-process.

``TokenTracker`` uses the same provider parsers, counters and price book as the proxy, so a
tracked response gives the same numbers the proxy would record. It is thread-safe (shared state is
locked) and asyncio-safe (the ``a*`` methods run CPU work in a thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson

from llmtally.config import Config, load_config
from llmtally.counters import ChatInput, TokenCount, TokenCounter, build_counters
from llmtally.counters.anthropic import AnthropicCounter, Calibration
from llmtally.counters.exact import ExactCounter, ExactCountError
from llmtally.exchange import Exchange
from llmtally.metering import build_record, estimate_input
from llmtally.pipeline.background import BackgroundPipeline
from llmtally.pipeline.sinks import CallbackSink, Sink
from llmtally.pricing import PriceBook
from llmtally.providers import ADAPTERS, MeteredRequest, ProviderAdapter, ResponseSummary
from llmtally.providers.infer import infer_provider
from llmtally.record import Provider, TokenUsage, UsageRecord, UsageSource

T = TypeVar("T")
log = logging.getLogger("llmtally.tracker")


class UnknownModelError(LookupError):
    """Strict mode: the model's provider or tokenizer is not known."""


@dataclass(frozen=True, slots=True)
class TokenCountParams:
    """What to count. Give ``text`` (no chat overhead) or ``messages`` in the provider's own format."""

    model: str
    text: str | Sequence[str] | None = None
    messages: Sequence[Any] | None = None
    tools: Sequence[Any] | None = None
    tool_choice: Any = None
    #: Anthropic ``system`` / Gemini ``systemInstruction`` (OpenAI: put it in ``messages``).
    system: Any = None
    #: A response (text, or the provider's response object/dict) to count as ``response_tokens``.
    response: Any = None
    count_response_tokens: bool = False
    provider: Provider | None = None


@dataclass(frozen=True, slots=True)
class CallParams:
    """The call a response belongs to."""

    model: str
    provider: Provider | None = None
    messages: Sequence[Any] | None = None
    tools: Sequence[Any] | None = None
    tool_choice: Any = None
    system: Any = None
    #: The full request body, when at hand (better input estimates than messages alone).
    request: Mapping[str, Any] | None = None
    #: When the call started: a datetime, or a ``time.time()`` float.
    started_at: datetime | float | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Price:
    """What a usage costs, Decimal throughout."""

    input_cost: Decimal
    output_cost: Decimal
    total_cost: Decimal
    currency: str = "USD"
    price_source: str = ""
    price_version: str = ""
    priced_model: str | None = None


@dataclass(frozen=True, slots=True)
class UsageMetrics:
    """One tracked call, with the same normalised fields as the proxy's usage record."""

    token_count: TokenCount
    price: Price | None
    #: Seconds from ``CallParams.started_at`` to tracking, when known.
    duration: float | None
    timestamp: datetime
    model: str | None
    provider: Provider
    endpoint: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    reasoning_tokens: int | None
    total_tokens: int
    usage_source: UsageSource
    price_source: str
    estimated_input_tokens: int | None
    record: UsageRecord


class TokenTracker:
    """Counting, pricing and usage tracking for OpenAI, Anthropic and Gemini models.

    ``strict=True`` raises :class:`UnknownModelError` / ``TokenizerUnavailable`` instead of falling
    back to a flagged estimate.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        strict: bool = False,
        api_keys: Mapping[str, str] | None = None,
        sinks: Sequence[Sink] | None = None,
    ) -> None:
        """``sinks``: where tracked records go (default: none; ``from_config`` uses the config's sinks).

        Records are delivered in a background thread; ``on_usage`` adds callbacks.
        """
        self.config = config or Config()
        self._sinks = list(sinks or ())
        self._delivery: BackgroundPipeline | None = None
        self._delivery_lock = threading.Lock()
        self.strict = strict
        self.counters: dict[Provider, TokenCounter] = build_counters(self.config.counters, strict=strict)
        self.prices = PriceBook(self.config.pricing)
        self._exact = ExactCounter(self.config, api_keys) if self.config.counters.exact.enabled else None
        self._config_path: str | None = None

    @classmethod
    def from_config(cls, path: str | Path, **kwargs: Any) -> TokenTracker:
        """A tracker configured by a ``config.toml`` (and ``LLMTALLY_*`` environment overrides)."""
        config = load_config(path)
        if "sinks" not in kwargs:
            from llmtally.pipeline.build import build_sinks

            kwargs["sinks"] = build_sinks(config)
        tracker = cls(config, **kwargs)
        tracker._config_path = str(path)
        return tracker

    # ---- delivery -------------------------------------------------------------------------------

    def on_usage(self, callback: Callable[[dict[str, Any]], Any]) -> None:
        """Call ``callback(record)`` (sync or async) for every tracked record, off the caller's path.

        ``record`` is the usage record as a dict (docs/records.md). A slow or failing callback never
        blocks or breaks ``track_usage``: it runs in the delivery thread with its own queue, timeout,
        retries and spill file, like any sink.
        """
        self._deliver().add_sink(CallbackSink(callback))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every tracked record reached every sink and hook."""
        if self._delivery is not None:
            self._delivery.flush(timeout)

    async def aflush(self) -> None:
        """``flush`` for async code."""
        if self._delivery is not None:
            await self._delivery.aflush()

    def close(self) -> None:
        """Deliver everything and stop the delivery thread."""
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None

    def _deliver(self) -> BackgroundPipeline:
        with self._delivery_lock:
            if self._delivery is None:
                self._delivery = BackgroundPipeline(self._sinks, self.config.pipeline)
            return self._delivery

    def reload_prices(self) -> str:
        """Re-read the config (if from a file) and prices file; swap prices atomically. The new version.

        A bad file raises ``ConfigError``/``PriceFileError`` and the old prices stay in force.
        """
        config = load_config(self._config_path) if self._config_path else self.config
        book = PriceBook(config.pricing)
        self.config, self.prices = config, book
        return book.version

    # ---- counting -------------------------------------------------------------------------------

    def provider_of(self, model: str, provider: Provider | None = None) -> Provider:
        """``provider`` if given, else inferred from the model name (strict mode raises when it cannot be)."""
        if provider is not None:
            return provider
        found = infer_provider(model)
        if found is None:
            if self.strict:
                raise UnknownModelError(f"cannot tell the provider of model {model!r}; name the provider")
            return "openai"  # flagged below: o200k is the most likely tokenizer of an unknown model
        return found

    def count_tokens(self, params: TokenCountParams) -> TokenCount:
        """Count locally (or, with ``[counters.exact] enabled``, with the provider's count endpoint)."""
        if self._exact is not None and params.messages is not None:
            return _run(self.acount_tokens(params))
        return self._count_local(params)

    async def acount_tokens(self, params: TokenCountParams) -> TokenCount:
        """``count_tokens`` for async code (local counting runs in a thread)."""
        local = await asyncio.to_thread(self._count_local, params)
        if self._exact is None or params.messages is None:
            return local
        provider = self.provider_of(params.model, params.provider)
        try:
            n = await self._exact.count(self.counters[provider], params.model, _chat(params))
        except ExactCountError as exc:
            if self.strict:
                raise
            return TokenCount(
                local.input_tokens, local.response_tokens, local.exact, local.tokenizer,
                local.text_tokens, local.fixed_tokens, note=str(exc),
            )  # fmt: skip
        return TokenCount(n, local.response_tokens, exact=True, tokenizer=f"{provider}:count_tokens")

    def _count_local(self, params: TokenCountParams) -> TokenCount:
        provider = self.provider_of(params.model, params.provider)
        counter = self.counters[provider]
        known = counter.known_model(params.model) and (params.provider or infer_provider(params.model))
        if self.strict and not known:
            raise UnknownModelError(f"no tokenizer is known for {provider} model {params.model!r}")
        if params.text is not None:
            texts = [params.text] if isinstance(params.text, str) else list(params.text)
            count = counter.count_text(params.model, texts)
        else:
            count = counter.count_chat(params.model, _chat(params))
        response_tokens = 0
        if params.count_response_tokens and params.response is not None:
            response_tokens = self._response_tokens(provider, counter, params.model, params.response)
        exact = count.exact and bool(known)
        note = count.note if known else (count.note or f"unknown model {params.model!r}: estimated")
        return TokenCount(
            count.input_tokens,
            response_tokens,
            exact,
            count.tokenizer,
            count.text_tokens,
            count.fixed_tokens,
            note,
        )

    def _response_tokens(self, provider: Provider, counter: TokenCounter, model: str, response: Any) -> int:
        if isinstance(response, str):
            return counter.count_text(model, [response]).input_tokens
        summary = _parse_response(provider, model, response)
        return counter.count_text(model, summary.output_text).input_tokens

    def calibration(self, model: str) -> Calibration | None:
        """The Claude estimate's current factor and recent error band for ``model`` (None elsewhere)."""
        counter = self.counters[self.provider_of(model)]
        return counter.calibration(model) if isinstance(counter, AnthropicCounter) else None

    # ---- pricing --------------------------------------------------------------------------------

    def calculate_price(
        self,
        model: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        *,
        provider: Provider | None = None,
        when: datetime | None = None,
        service_tier: str | None = None,
    ) -> Price | None:
        """Price a usage in the record's normalised meaning (``input_tokens`` includes cache tokens).

        None when the model has no price (strict mode raises :class:`UnknownModelError`).
        """
        usage = TokenUsage(
            input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens
        )
        quote = self.prices.quote(
            self.provider_of(model, provider), model, usage, when, service_tier=service_tier
        )
        if quote.cost is None:
            if self.strict:
                raise UnknownModelError(f"no price for model {model!r}")
            return None
        cost = quote.cost
        return Price(
            cost.input_cost, cost.output_cost, cost.total_cost, cost.currency,
            quote.price_source, quote.price_version, quote.priced_as,
        )  # fmt: skip

    # ---- tracking -------------------------------------------------------------------------------

    def track_usage(self, call: CallParams, response: Any, *, sync: bool = False) -> UsageMetrics:
        """Meter a response: an SDK response object, a list of stream chunks/events, a dict or JSON bytes.

        Uses the provider-reported usage when present; otherwise counts (``usage_source = "estimated"``).
        The record goes to the sinks and hooks in the background; ``sync=True`` waits until it is delivered.
        """
        metrics = self._track(call, response)
        if self._sinks or self._delivery is not None:
            delivery = self._deliver()
            delivery.submit(metrics.record)
            if sync:
                delivery.flush()
        return metrics

    def _track(self, call: CallParams, response: Any) -> UsageMetrics:
        provider = self.provider_of(call.model, call.provider)
        adapter = ADAPTERS[provider]
        counter = self.counters[provider]
        data = _as_json(response)
        stream = isinstance(data, list)
        first = data[0] if stream and data else data
        endpoint = adapter.endpoint_for_response(first, stream, call.model)
        payload = dict(call.request) if call.request is not None else _request_payload(call)
        request = MeteredRequest(
            endpoint, b"", call.model, stream, payload, stream_format="sse" if stream else None
        )
        started = _started(call.started_at)
        exchange = Exchange(
            request_id=uuid.uuid4().hex,
            provider=provider,
            request=request,
            started_at=started,
            status=200,
            tags=dict(call.tags),
        )
        if stream:
            exchange.summary = _parse_stream(adapter, request, data)
        else:
            exchange.response_body = orjson.dumps(data)
        if call.request is not None:
            exchange.input_estimate = estimate_input(counter, request)
        elif call.messages is not None:
            # Messages alone: count them as a conversation rather than as an endpoint body.
            exchange.input_estimate = self._estimate_chat(counter, call)
        record = build_record(exchange, adapter, counter, self.prices)
        duration = (datetime.now(UTC) - started).total_seconds() if call.started_at is not None else None
        return _metrics(record, duration)

    async def atrack_usage(self, call: CallParams, response: Any, *, sync: bool = False) -> UsageMetrics:
        """``track_usage`` for async code (parsing and pricing run in a thread)."""
        metrics = await asyncio.to_thread(self._track, call, response)
        if self._sinks or self._delivery is not None:
            delivery = self._deliver()
            delivery.submit(metrics.record)
            if sync:
                await delivery.aflush()
        return metrics

    def _estimate_chat(self, counter: TokenCounter, call: CallParams) -> TokenCount | None:
        try:
            return counter.count_chat(call.model, _chat(call))
        except Exception as exc:  # an estimate must never fail tracking
            log.warning("input estimate failed for %s: %s", call.model, exc)
            return None


def _chat(params: TokenCountParams | CallParams) -> ChatInput:
    return ChatInput(
        messages=list(params.messages or ()),
        tools=params.tools,
        tool_choice=params.tool_choice,
        system=params.system,
    )


def _request_payload(call: CallParams) -> dict[str, Any] | None:
    if call.messages is None:
        return None
    return {"model": call.model, "messages": list(call.messages)}


def _started(value: datetime | float | None) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.now(UTC)


def _as_json(obj: Any) -> Any:
    """SDK objects, dicts, JSON text/bytes and lists of them → plain JSON values (wire field names)."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return orjson.loads(bytes(obj))
    if isinstance(obj, str):
        return orjson.loads(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, list | tuple):
        return [_as_json(item) for item in obj]
    dump = getattr(obj, "model_dump", None)
    if callable(dump):  # pydantic SDK objects; by_alias gives the wire (camelCase) names for google-genai
        return dump(mode="json", by_alias=True, exclude_none=True)
    raise TypeError(f"cannot read usage from a {type(obj).__name__}")


def _parse_stream(adapter: ProviderAdapter, request: MeteredRequest, items: list[Any]) -> ResponseSummary:
    """Feed stream chunks/events to the provider's own stream parser, as SSE."""
    parser = adapter.stream_parser(request)
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        head = f"event: {kind}\n".encode() if isinstance(kind, str) else b""
        parser.feed(head + b"data: " + orjson.dumps(item) + b"\n\n")
    return parser.finish()


def _parse_response(provider: Provider, model: str, response: Any) -> ResponseSummary:
    adapter = ADAPTERS[provider]
    data = _as_json(response)
    stream = isinstance(data, list)
    first = data[0] if stream and data else data
    endpoint = adapter.endpoint_for_response(first, stream, model)
    request = MeteredRequest(endpoint, b"", model, stream, None, stream_format="sse" if stream else None)
    if stream:
        return _parse_stream(adapter, request, data)
    return adapter.parse_response(request, orjson.dumps(data))


def _metrics(record: UsageRecord, duration: float | None) -> UsageMetrics:
    usage = record.usage
    exact = record.usage_source == "provider"
    token_count = TokenCount(
        input_tokens=usage.input_tokens,
        response_tokens=usage.output_tokens,
        exact=exact,
        tokenizer="provider" if exact else "estimate",
    )
    price = None
    if record.cost is not None:
        cost = record.cost
        price = Price(
            cost.input_cost, cost.output_cost, cost.total_cost, cost.currency,
            record.price_source, record.price_version or "", record.priced_model,
        )  # fmt: skip
    return UsageMetrics(
        token_count=token_count,
        price=price,
        duration=duration,
        timestamp=datetime.fromisoformat(record.timestamp.replace("Z", "+00:00")),
        model=record.model,
        provider=record.provider,
        endpoint=record.endpoint,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        total_tokens=usage.total_tokens,
        usage_source=record.usage_source,
        price_source=record.price_source,
        estimated_input_tokens=record.estimated_input_tokens,
        record=record,
    )


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmtally-sync")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    return _pool.submit(asyncio.run, coro).result()


__all__ = [
    "CallParams",
    "Price",
    "TokenCountParams",
    "TokenTracker",
    "UnknownModelError",
    "UsageMetrics",
]

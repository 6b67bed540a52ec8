"""From an observed exchange to a priced :class:`~llmtally.record.UsageRecord`.

The proxy fills an :class:`~llmtally.exchange.Exchange` while it forwards bytes; :func:`build_record`
runs later in the record pipeline (off the request path): it picks provider usage when there is some,
estimates otherwise, and prices the result.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from llmtally.budgets.gate import refused
from llmtally.counters import TokenCount, TokenCounter, build_counters
from llmtally.exchange import Exchange
from llmtally.platforms import stream_parser
from llmtally.pricing import PriceBook
from llmtally.pricing.calls import quote_call
from llmtally.providers import ADAPTERS, MeteredRequest, ProviderAdapter, ResponseSummary
from llmtally.providers.base import read_usage
from llmtally.providers.batch import BATCH
from llmtally.providers.encoding import UndecodableBody, decode_body
from llmtally.record import Cost, TokenUsage, UsageRecord, UsageSource

if TYPE_CHECKING:
    from llmtally.budgets import Budgets
    from llmtally.config import Config
    from llmtally.pipeline import RecordPipeline

log = logging.getLogger("llmtally.metering")


def estimate_input(counter: TokenCounter, request: MeteredRequest) -> TokenCount | None:
    """Count a request's input locally; None when the body could not be parsed or counting failed."""
    if request.payload is None:
        return None
    model = request.model or ""
    try:
        return counter.count_request(model, request.endpoint.name, request.payload)
    except Exception as exc:  # counting must never break metering
        log.warning("input estimate failed for %s: %s", model, exc)
        return None


def _estimate_output(counter: TokenCounter, model: str, summary: ResponseSummary) -> TokenCount | None:
    try:
        return counter.count_text(model, summary.output_text)
    except Exception as exc:
        log.warning("output estimate failed for %s: %s", model, exc)
        return None


def _parse_stream(exchange: Exchange, adapter: ProviderAdapter, body: bytes) -> ResponseSummary:
    """A whole stream through the provider's incremental parser (what the proxy would have done)."""
    parser = stream_parser(adapter, exchange.request)
    try:
        parser.feed(body)
        summary = parser.finish()
    except Exception as exc:  # as in the proxy: a parser bug is noted, the record still written
        log.exception("metering parser failed for request %s", exchange.request_id)
        exchange.error = exchange.error or f"metering failed: {type(exc).__name__}"
        return ResponseSummary()
    return summary


def build_record(
    exchange: Exchange,
    adapter: ProviderAdapter,
    counter: TokenCounter,
    prices: PriceBook,
    fake_upstream: bool = False,
) -> UsageRecord:
    """Parse what is left to parse, choose the usage (provider's, else an estimate), price it."""
    request = exchange.request
    summary = exchange.summary
    undecodable: str | None = None
    if summary is None:
        if exchange.response_chunks is not None:
            try:
                exchange.response_body = decode_body(exchange.response_encoding, exchange.response_chunks)
            except UndecodableBody as exc:  # the client got the bytes as sent; there is nothing to parse
                undecodable = str(exc)
            exchange.response_chunks = None
        if undecodable is not None:
            summary = ResponseSummary(error=undecodable)
        elif exchange.response_body is None:
            summary = ResponseSummary()
        elif exchange.response_stream:  # a short stream, kept whole by the proxy (proxy.metering_copy)
            summary = _parse_stream(exchange, adapter, exchange.response_body)
        else:
            summary = adapter.parse_response(request, exchange.response_body)
    headers = exchange.usage_headers
    if headers and exchange.status is not None and 200 <= exchange.status < 300:
        # What the platform bills by (Bedrock's count headers) wins over the body's own counts.
        from_headers = read_usage(summary, lambda: adapter.usage_from_headers(headers))
        if from_headers is not None:
            summary.usage = from_headers
    # Usage with a value that is not a token count is not trusted at all: estimated, and said so.
    reported = summary.usage if summary.usage_error is None else None
    usage_error = f"{summary.usage_error}: estimated instead" if summary.usage_error else None
    # An error's record has no usage to stand in for ("none"): its input is not counted for it.
    wanted = exchange.count_input or (reported is None and _worth_estimating(exchange))
    estimate = _resolve_estimate(exchange, counter, needed=wanted)
    model = summary.model or request.model
    errors = [e for e in (exchange.error, request.error, summary.error, usage_error) if e]

    usage: TokenUsage
    source: UsageSource
    if reported is not None:
        usage, source = reported, "provider"
        if estimate is not None and usage.input_tokens:
            counter.observe(model or "", estimate, usage.input_tokens)  # calibrates estimates (Claude)
    elif _worth_estimating(exchange):
        # usage_source = "estimated" flags it; not an error (Gemini embeddings never report usage).
        usage, source = _estimated_usage(estimate, counter, model or "", summary)
    else:
        usage, source = TokenUsage(), "none"

    service_tier = summary.service_tier or request.service_tier
    geo = summary.inference_geo or request.inference_geo
    quote = quote_call(exchange, summary, usage, prices)
    # A call refused by a spend limit never went upstream: it cost nothing, and says so.
    nothing = _NOTHING if refused(exchange.status, exchange.error) else None
    return UsageRecord(
        timestamp=_rfc3339(exchange.started_at),
        request_id=exchange.request_id,
        provider=exchange.provider,
        platform=exchange.platform,
        endpoint=request.endpoint.name,
        request_model=request.model,
        model=model,
        stream=request.stream,
        status=exchange.status,
        usage=usage,
        usage_source=source,
        cost=quote.cost if source != "none" else nothing,
        price_source=quote.price_source,
        price_version=quote.price_version,
        priced_model=quote.priced_as,
        pricing_note="; ".join(n for n in (exchange.pricing_note, quote.note) if n) or None,
        latency_ms=round(exchange.latency_ms, 3),
        ttfb_ms=round(exchange.ttfb_ms, 3) if exchange.ttfb_ms is not None else None,
        client_disconnected=exchange.client_disconnected,
        tags=exchange.tags,
        error="; ".join(errors) or None,
        estimated_input_tokens=estimate.input_tokens if estimate and source != "none" else None,
        upstream_request_id=exchange.upstream_request_id or summary.upstream_request_id,
        service_tier=service_tier,
        inference_geo=geo if geo and geo.lower() != "global" else None,
        fake_upstream=fake_upstream,
        line_items=quote.line_items,
        budget_exceeded=exchange.budget_exceeded,
        batch_id=exchange.batch_id,
        custom_id=exchange.custom_id,
        session_id=exchange.session_id,
    )


_NOTHING = Cost(Decimal(0), Decimal(0))


def _worth_estimating(exchange: Exchange) -> bool:
    """Estimate when the call went through (or was cut off) but no usage came back."""
    status = exchange.status
    if exchange.client_disconnected or exchange.session_id is not None:
        return True  # cut off, or a WebSocket session's response (101) that ended before its usage
    return status is not None and 200 <= status < 300


def safe_build_record(
    exchange: Exchange,
    adapter: ProviderAdapter,
    counter: TokenCounter,
    prices: PriceBook,
    fake_upstream: bool = False,
) -> UsageRecord:
    """:func:`build_record`, but a metering bug still yields a record that says so (records are money)."""
    try:
        return build_record(exchange, adapter, counter, prices, fake_upstream)
    except Exception as exc:
        log.exception("metering failed for request %s", exchange.request_id)
        return UsageRecord(
            timestamp=_rfc3339(exchange.started_at),
            request_id=exchange.request_id,
            provider=exchange.provider,
            platform=exchange.platform,
            endpoint=exchange.request.endpoint.name,
            request_model=exchange.request.model,
            model=exchange.request.model,
            stream=exchange.request.stream,
            status=exchange.status,
            usage=TokenUsage(),
            usage_source="none",
            cost=None,
            price_source="unknown_model",
            latency_ms=round(exchange.latency_ms, 3),
            ttfb_ms=None,
            client_disconnected=exchange.client_disconnected,
            tags=exchange.tags,
            error=f"metering failed: {type(exc).__name__}: {exc}",
            fake_upstream=fake_upstream,
            budget_exceeded=exchange.budget_exceeded,
            batch_id=exchange.batch_id,
            custom_id=exchange.custom_id,
            session_id=exchange.session_id,
        )


def _resolve_estimate(exchange: Exchange, counter: TokenCounter, needed: bool) -> TokenCount | None:
    """The input estimate: the one already made (or running), else a count now if the record needs it."""
    estimate = exchange.input_estimate
    if isinstance(estimate, Future):
        try:
            estimate = estimate.result()
        except Exception as exc:  # pragma: no cover - estimate_input catches everything
            log.warning("input estimate failed: %s", exc)
            estimate = None
    elif estimate is None and needed and counter.ready(exchange.request.model or ""):
        estimate = estimate_input(counter, exchange.request)
    exchange.input_estimate = estimate
    return estimate


def _estimated_usage(
    estimate: TokenCount | None, counter: TokenCounter, model: str, summary: ResponseSummary
) -> tuple[TokenUsage, UsageSource]:
    output = _estimate_output(counter, model, summary)
    if estimate is None and output is None:
        return TokenUsage(), "none"
    return (
        TokenUsage(
            input_tokens=estimate.input_tokens if estimate else 0,
            output_tokens=output.input_tokens if output else 0,
        ),
        "estimated",
    )


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LocalMeter:
    """Builds records in this process's :class:`~llmtally.pipeline.RecordPipeline` (its worker thread).

    ``prices`` may be swapped at any time (a reload): one reference swap, so each record is priced
    by exactly one price book. With ``[budgets]`` rules it holds the :class:`~llmtally.budgets.Budgets`
    every record settles with, and it keeps the last minutes' records for ``GET /calls/{id}``.
    """

    def __init__(self, config: Config, pipeline: RecordPipeline, prices: PriceBook | None = None) -> None:
        from llmtally.pipeline.recent import RecentCalls

        self.config = config
        self.pipeline = pipeline
        self.prices = prices or PriceBook(config.pricing)
        self.counters = build_counters(config.counters, load_on_demand=False)
        self.recent = RecentCalls(config.server.calls_window_s, config.server.calls_max)
        self.budgets: Budgets | None = None
        if config.budgets.rules:
            from llmtally.budgets import Budgets

            self.budgets = Budgets(config.budgets, lambda: self.prices)

    def use_prices(self, book: PriceBook) -> None:
        self.prices = book
        if self.budgets is not None:
            self.budgets.prices_changed()

    def use_config(self, config: Config) -> None:
        """A reloaded config's budget rules (prices come through :meth:`use_prices`)."""
        if self.budgets is not None:
            self.budgets.use_config(config.budgets)
        elif config.budgets.rules:
            log.warning("[budgets] rules were added: they take effect after a restart")

    def start(self, port: int | None = None) -> None:
        """On the loop that runs the pipeline, before the first call; ``port``: the proxy's, once
        bound (settlements still waiting for the store at a stop are saved per port, like the journal)."""
        if self.budgets is not None:
            port = self.config.server.port if port is None else port
            self.budgets.start(Path(self.pipeline.spill_dir) / f"budget-settlements-{port}.jsonl")
            from llmtally.budgets.metrics import BudgetCollector
            from llmtally.pipeline.build import prometheus_of

            sink = prometheus_of(self.pipeline)
            if sink is not None:
                sink.registry.register(BudgetCollector(self.budgets))

    async def close(self) -> None:
        if self.budgets is not None:
            await self.budgets.close()

    def build(self, exchange: Exchange) -> UsageRecord:
        """The exchange's record; settled with the budgets, kept for ``GET /calls/{id}`` (any thread)."""
        provider = exchange.provider
        record = safe_build_record(
            exchange,
            ADAPTERS[provider],
            self.counters[provider],
            self.prices,
            self.config.upstreams.fake,  # stamped here, in the record process: nothing per call in a worker
        )
        if self.budgets is not None:
            self.budgets.settle_record(record, exchange.started_at)
        if record.endpoint != BATCH:  # no client can ask for a batch result by its id: keep the room
            self.recent.add(record)
        return record

    def submit(self, exchange: Exchange) -> None:
        self.pipeline.submit(partial(self.build, exchange))

    async def metrics(self) -> bytes | None:
        from llmtally.pipeline.build import prometheus_of

        sink = prometheus_of(self.pipeline)
        return sink.render() if sink is not None else None

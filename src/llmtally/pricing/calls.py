"""The price of one observed call: the same inputs for its record and for its ``x-llmtally-cost``."""

from __future__ import annotations

from llmtally.exchange import Exchange
from llmtally.platforms import price_data_provider
from llmtally.pricing.engine import PriceBook, Quote
from llmtally.providers.base import ResponseSummary
from llmtally.record import TokenUsage


def quote_call(exchange: Exchange, summary: ResponseSummary, usage: TokenUsage, prices: PriceBook) -> Quote:
    request = exchange.request
    model = summary.model or request.model
    return prices.quote(
        exchange.provider,
        exchange.price_model or model,
        usage,
        exchange.started_at,
        request.model,
        summary.service_tier or request.service_tier,
        summary.inference_geo or request.inference_geo,
        price_data_provider(exchange.platform, exchange.provider),
        # A summary pickled before line items existed (a journal segment across an upgrade) has none.
        getattr(summary, "line_items", None),
    )

"""From an exchange to a record: when the request is counted locally, and when it is not."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llmtally.config import CountersConfig, MeteringConfig, PricingConfig
from llmtally.counters import TokenCache, build_counters
from llmtally.exchange import Exchange
from llmtally.metering import build_record
from llmtally.pricing import PriceBook
from llmtally.providers import ADAPTERS
from llmtally.providers.base import ResponseSummary
from llmtally.record import Provider, TokenUsage

PRICES = PriceBook(PricingConfig())
TEXT = b"Say hello, and then say it again in other words. " * 4  # long enough for the count cache
CALLS: dict[Provider, tuple[str, bytes]] = {
    "openai": (
        "v1/chat/completions",
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"%s"}]}' % TEXT,
    ),
    "anthropic": (
        "v1/messages",
        b'{"model":"claude-sonnet-5","max_tokens":9,"messages":[{"role":"user","content":"%s"}]}' % TEXT,
    ),
    # Gemini 1.5 is estimated with o200k_base (no Gemma 3 to load in a unit test).
    "gemini": (
        "v1beta/models/gemini-1.5-flash:generateContent",
        b'{"contents":[{"parts":[{"text":"%s"}]}]}' % TEXT,
    ),
}


def _exchange(provider: Provider, usage: TokenUsage | None, count_input: bool) -> Exchange:
    adapter = ADAPTERS[provider]
    path, body = CALLS[provider]
    endpoint = adapter.route(path)
    assert endpoint is not None
    return Exchange(
        request_id="id-1",
        provider=provider,
        request=adapter.prepare(endpoint, body, {}, inject_stream_usage=False),
        started_at=datetime(2026, 11, 24, tzinfo=UTC),
        summary=ResponseSummary(usage=usage, output_text=["Hello"], complete=True),
        status=200,
        count_input=count_input,
    )


def test_estimate_input_is_off_by_default() -> None:
    # A sidecar would otherwise hold ~45 MB of tokenizer tables for a number nobody is billed by.
    assert MeteringConfig().estimate_input is False


@pytest.mark.parametrize("provider", list(CALLS))
def test_a_record_with_provider_usage_counts_nothing_unless_asked(provider: Provider) -> None:
    cache = TokenCache()
    counter = build_counters(CountersConfig(), load_on_demand=False, cache=cache)[provider]
    usage = TokenUsage(input_tokens=120, output_tokens=30)

    record = build_record(_exchange(provider, usage, count_input=False), ADAPTERS[provider], counter, PRICES)
    assert (record.usage_source, record.usage.input_tokens) == ("provider", 120)
    assert record.estimated_input_tokens is None
    assert len(cache) == 0  # the request's text went through no tokenizer

    record = build_record(_exchange(provider, usage, count_input=True), ADAPTERS[provider], counter, PRICES)
    # The estimate sits beside the provider's count; it does not replace it.
    assert (record.usage_source, record.usage.input_tokens) == ("provider", 120)
    assert record.estimated_input_tokens is not None and record.estimated_input_tokens > 0
    assert len(cache) > 0


@pytest.mark.parametrize("provider", list(CALLS))
def test_a_record_without_provider_usage_is_estimated_with_estimate_input_off(provider: Provider) -> None:
    counter = build_counters(CountersConfig(), load_on_demand=False, cache=TokenCache())[provider]
    record = build_record(_exchange(provider, None, count_input=False), ADAPTERS[provider], counter, PRICES)
    assert record.usage_source == "estimated"
    assert record.estimated_input_tokens is not None
    assert record.usage.input_tokens == record.estimated_input_tokens > 0
    assert record.usage.output_tokens > 0  # "Hello"
    assert record.cost is not None

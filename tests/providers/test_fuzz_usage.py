"""Fuzzing usage normalisation (issue 26): every provider's usage object with any JSON number in any
field (huge, negative, fractional, strings, booleans, nested junk) never raises, and always comes out
as whole-number token counts that can be priced.

What such numbers mean is another matter: a 10^30 count is taken as it came and priced (see the
expected failure at the end, and docs/reliability.md). Validation is being added elsewhere.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llmtally.config import PricingConfig
from llmtally.pipeline.sinks import render_records
from llmtally.pricing.engine import PriceBook
from llmtally.providers import ADAPTERS
from llmtally.record import Provider, TokenUsage, UsageRecord
from tests.providers.test_fuzz_streams import JSON_VALUES, NUMBERS, prepared

#: Each provider's usage fields, by where they sit in its usage object.
FIELDS: dict[Provider, list[tuple[str, ...]]] = {
    "openai": [
        ("prompt_tokens",), ("completion_tokens",), ("input_tokens",), ("output_tokens",),
        ("prompt_tokens_details", "cached_tokens"), ("prompt_tokens_details", "audio_tokens"),
        ("completion_tokens_details", "reasoning_tokens"), ("completion_tokens_details", "audio_tokens"),
        ("input_tokens_details", "cached_tokens"), ("output_tokens_details", "reasoning_tokens"),
    ],
    "anthropic": [
        ("input_tokens",), ("output_tokens",), ("cache_creation_input_tokens",),
        ("cache_read_input_tokens",), ("cache_creation", "ephemeral_1h_input_tokens"),
    ],
    "gemini": [
        ("promptTokenCount",), ("candidatesTokenCount",), ("thoughtsTokenCount",),
        ("cachedContentTokenCount",), ("toolUsePromptTokenCount",),
    ],
}  # fmt: skip
NON_STREAM = {"openai": "openai-chat", "anthropic": "anthropic", "gemini": "gemini-sse"}
USAGE_KEY = {"openai": "usage", "anthropic": "usage", "gemini": "usageMetadata"}
ODD_VALUES = st.one_of(NUMBERS, JSON_VALUES, st.text(max_size=12).map(str), st.booleans())


@st.composite
def usage_objects(draw: st.DrawFn, provider: Provider) -> dict[str, Any]:
    """A usage object of ``provider``'s shape with an odd value in any of its fields."""
    usage: dict[str, Any] = {}
    for path in draw(
        st.lists(st.sampled_from(FIELDS[provider]), unique=True, max_size=len(FIELDS[provider]))
    ):
        target = usage
        for key in path[:-1]:
            nested = target.setdefault(key, {})
            if not isinstance(nested, dict):
                break
            target = nested
        else:
            target[path[-1]] = draw(ODD_VALUES)
    return usage


@st.composite
def responses(draw: st.DrawFn) -> tuple[Provider, dict[str, Any]]:
    provider: Provider = draw(st.sampled_from(["openai", "anthropic", "gemini"]))
    body = {USAGE_KEY[provider]: draw(usage_objects(provider)), "model": "gpt-4o"}
    if provider == "gemini" and draw(st.booleans()):
        body["usageMetadata"]["promptTokensDetails"] = [{"modality": "AUDIO", "tokenCount": draw(ODD_VALUES)}]
    return provider, body


def normalised(provider: Provider, body: dict[str, Any]) -> TokenUsage | None:
    """The usage taken from ``body``; None only when the response says its usage is not a token count."""
    request = prepared(NON_STREAM[provider])
    request.stream = False
    summary = ADAPTERS[provider].parse_response(request, json.dumps(body).encode())
    if summary.usage is None:
        assert summary.usage_error is not None, body  # refused, and said so
    return summary.usage


PRICES = PriceBook(PricingConfig())
MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}


@given(responses())
def test_any_usage_numbers_normalise_to_whole_counts_and_price(
    response: tuple[Provider, dict[str, Any]],
) -> None:
    provider, body = response
    usage = normalised(provider, body)
    if usage is None:
        return
    counts = [getattr(usage, name) for name in TokenUsage.__slots__]
    assert all(type(count) is int and 0 <= count < 2**63 for count in counts if count is not None), usage
    PRICES.quote(provider, MODELS[provider], usage, datetime.now(UTC), MODELS[provider], None, None)


def record_of(provider: Provider, usage: TokenUsage) -> dict[str, object]:
    quote = PRICES.quote(provider, MODELS[provider], usage, datetime.now(UTC), MODELS[provider], None, None)
    return UsageRecord(
        timestamp="2026-01-01T00:00:00Z", request_id="fuzz", provider=provider, endpoint="x",
        request_model=MODELS[provider], model=MODELS[provider], stream=False, status=200, usage=usage,
        usage_source="provider", cost=quote.cost, price_source=quote.price_source, latency_ms=1.0, ttfb_ms=None,
    ).to_dict()  # fmt: skip


@given(responses())
def test_any_normalised_usage_renders_as_a_record_line(response: tuple[Provider, dict[str, Any]]) -> None:
    provider, body = response
    usage = normalised(provider, body)
    if usage is None:
        return
    assert render_records([record_of(provider, usage)]).endswith(b"\n")

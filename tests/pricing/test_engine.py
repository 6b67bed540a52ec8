"""Price lookups and Decimal maths."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llmtally.config import ModelPrice, PricingConfig
from llmtally.pricing import PriceBook, cost_from_rates
from llmtally.pricing.engine import lookup_names
from llmtally.record import TokenUsage


def test_rates_apply_cache_prices_per_million() -> None:
    rates = ModelPrice(
        input=Decimal("3"), output=Decimal("15"), cache_read=Decimal("0.3"),
        cache_write=Decimal("3.75"), cache_write_1h=Decimal("6"),
    )  # fmt: skip
    usage = TokenUsage(1000, 100, cache_read_tokens=200, cache_write_tokens=100, cache_write_1h_tokens=40)
    cost = cost_from_rates(rates, usage)
    # 700 * 3 + 200 * 0.3 + 60 * 3.75 + 40 * 6 = 2625 µ$
    assert cost.input_cost == Decimal("0.002625")
    assert cost.output_cost == Decimal("0.0015")
    assert cost.total_cost == Decimal("0.004125")


@pytest.mark.parametrize(
    ("provider", "model", "usage", "input_cost", "output_cost", "priced_as"),
    [
        ("openai", "gpt-4o-2024-08-06", TokenUsage(1000, 100, cache_read_tokens=400), "0.002", "0.001", "gpt-4o"),
        ("openai", "gpt-5.4-mini", TokenUsage(1_000_000, 1_000_000), "0.75", "4.5", "gpt-5.4-mini"),
        # 500 uncached * $2 + 400 5-minute writes * $2.50 + 100 1-hour writes * $4 = 2400 µ$
        ("anthropic", "claude-sonnet-5", TokenUsage(1000, 10, cache_write_tokens=500, cache_write_1h_tokens=100),
         "0.0024", "0.0001", "claude-sonnet-5"),
        ("gemini", "models/gemini-2.5-flash", TokenUsage(1000, 100), "0.0003", "0.00025", "gemini-2.5-flash"),
    ],
)  # fmt: skip
def test_genai_prices_table(
    provider: str, model: str, usage: TokenUsage, input_cost: str, output_cost: str, priced_as: str
) -> None:
    quote = PriceBook(PricingConfig()).quote(provider, model, usage)  # type: ignore[arg-type]
    assert quote.cost is not None
    assert quote.cost.input_cost == Decimal(input_cost)
    assert quote.cost.output_cost == Decimal(output_cost)
    assert quote.price_source == "genai-prices"
    assert quote.priced_as == priced_as


def test_overrides_and_aliases_win() -> None:
    config = PricingConfig(
        models={"gpt-4o": ModelPrice(input=Decimal("1"), output=Decimal("1"))},
        aliases={"my-deployment": "gpt-4o", "other": "claude-sonnet-5"},
    )
    book = PriceBook(config)
    assert book.quote("openai", "gpt-4o-2024-08-06", TokenUsage(1, 1)).price_source == "config"
    assert book.quote("openai", "my-deployment", TokenUsage(1, 1)).price_source == "config"
    other = book.quote("anthropic", "other", TokenUsage(1, 1))
    assert (other.price_source, other.priced_as) == ("genai-prices", "claude-sonnet-5")


def test_unknown_model_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook(PricingConfig())
    for _ in range(3):
        quote = book.quote("openai", "no-such-model", TokenUsage(1, 1))
        assert (quote.cost, quote.price_source) == (None, "unknown_model")
    assert len([r for r in caplog.records if "no-such-model" in r.message]) == 1


def test_price_version_changes_with_the_price_set() -> None:
    a = PriceBook(PricingConfig()).version
    b = PriceBook(PricingConfig(models={"x": ModelPrice(input=Decimal(1), output=Decimal(1))})).version
    assert a != b and len(a) == 12
    assert a == PriceBook(PricingConfig()).version


def test_lookup_names_fall_back_to_base_models() -> None:
    assert lookup_names("claude-3-5-sonnet@20240620")[-1] == "claude-3-5-sonnet"
    assert lookup_names("models/gemini-1.5-pro-002")[-1] == "gemini-1.5-pro"
    assert lookup_names("ft:gpt-4o-mini-2024-07-18:org::x")[-1] == "gpt-4o-mini"

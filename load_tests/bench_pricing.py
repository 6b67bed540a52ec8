"""Pricing speed: microseconds to price one record (target < 20 µs on the project machine).

Run: .venv/bin/python load_tests/bench_pricing.py   (prints numbers; nothing is asserted)
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from llmtally.config import PricingConfig
from llmtally.pricing import PriceBook
from llmtally.record import TokenUsage

CASES = [
    ("openai", "gpt-4o-2024-08-06", None),
    ("openai", "gpt-5.4-mini", "flex"),
    ("anthropic", "claude-sonnet-5", None),
    ("anthropic", "claude-opus-4-8", "batch"),
    ("gemini", "gemini-2.5-pro", None),
    ("gemini", "gemini-3.5-flash", None),
]
GENAI_IDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}


def per_call_us(fn: object, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    book = PriceBook(PricingConfig())
    usage = TokenUsage(12_050, 400, 10_000, 2_000, 500, reasoning_tokens=100)
    when = datetime.now(UTC)
    print(f"{'provider/model':38s} {'tier':8s} {'llmtally µs':>12s} {'genai-prices µs':>16s}")
    for provider, model, tier in CASES:
        book.quote(provider, model, usage, when, service_tier=tier)  # first call resolves and caches
        ours = per_call_us(lambda: book.quote(provider, model, usage, when, service_tier=tier), 20_000)  # noqa: B023
        genai_usage = GenaiUsage(input_tokens=12_050, output_tokens=400, cache_read_tokens=10_000,
                                 cache_write_tokens=2_000, cache_write_1h_tokens=500)  # fmt: skip
        theirs = per_call_us(lambda: calc_price(genai_usage, model, provider_id=GENAI_IDS[provider]), 2_000)  # noqa: B023
        print(f"{provider + '/' + model:38s} {tier or '-':8s} {ours:12.2f} {theirs:16.2f}")


if __name__ == "__main__":
    main()

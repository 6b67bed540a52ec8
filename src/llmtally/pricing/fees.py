"""Prices of billed units beyond tokens: which genai-prices field prices each item, and a dated table
for what the price data does not list.

genai-prices gives per-model ``web_searches_kcount`` (web search, grounding) and
``storage_searches_kcount`` (OpenAI file search), in USD per 1,000. An item neither it nor this table
prices has no price: its line item says so and its cost is null, never zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

THOUSAND = Decimal(1000)


@dataclass(frozen=True, slots=True)
class ItemKind:
    """How an item is billed: its unit, and the genai-prices price field (USD per 1,000) if any."""

    unit: str
    genai_field: str | None


ITEMS: dict[str, ItemKind] = {
    # Anthropic server tool, OpenAI Responses hosted tool: per search.
    "web_search": ItemKind("search", "web_searches_kcount"),
    # Gemini 3: per search query the model ran; earlier Gemini: per grounded prompt.
    "web_search_query": ItemKind("search query", "web_searches_kcount"),
    "grounded_prompt": ItemKind("grounded prompt", "web_searches_kcount"),
    # OpenAI Responses file_search calls.
    "file_search": ItemKind("search", "storage_searches_kcount"),
    # Anthropic web fetch: no price data lists it (see FEE_TABLE).
    "web_fetch": ItemKind("fetch", None),
}


@dataclass(frozen=True, slots=True)
class Fee:
    per_unit: Decimal
    #: When the price was read from the provider's pricing page, and where.
    as_of: str
    source: str


#: What genai-prices does not list, from the providers' pricing pages (dated; a config override wins).
FEE_TABLE: dict[str, Fee] = {
    "web_fetch": Fee(
        Decimal(0),
        "2026-12-01",
        "Anthropic pricing: web fetch has no charge beyond the tokens of the fetched content",
    ),
}

"""Prices a normalised usage: config overrides first, then genai-prices, else unknown.

A :class:`PriceBook` is immutable; its ``version`` is a short hash of everything that sets a price,
so every record says which price set priced it. Model resolution is done once per model and cached.
All money is :class:`~decimal.Decimal`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import genai_prices
import orjson
from genai_prices import Usage as GenaiUsage
from genai_prices.data_snapshot import get_snapshot

from llmtally.config import ModelPrice, PricingConfig
from llmtally.record import Cost, Provider, TokenUsage

log = logging.getLogger("llmtally.pricing")

PER_MILLION = Decimal(1_000_000)
#: genai-prices' provider ids.
GENAI_PROVIDER_IDS: dict[Provider, str] = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}

SOURCE_CONFIG = "config"
SOURCE_GENAI_PRICES = "genai-prices"
SOURCE_UNKNOWN = "unknown_model"


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of one call, and what priced it."""

    cost: Cost | None
    price_source: str
    price_version: str
    #: The model name the price was found under (after aliases and prefix stripping).
    priced_as: str | None = None


def cost_from_rates(rates: ModelPrice, usage: TokenUsage) -> Cost:
    """Apply per-1M-token rates; missing cache rates fall back to input (read, write) and write (1h)."""
    cache_read_rate = rates.cache_read if rates.cache_read is not None else rates.input
    write_rate = rates.cache_write if rates.cache_write is not None else rates.input
    write_1h_rate = rates.cache_write_1h if rates.cache_write_1h is not None else write_rate
    write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    uncached = max(usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens, 0)
    input_cost = (
        uncached * rates.input
        + usage.cache_read_tokens * cache_read_rate
        + (usage.cache_write_tokens - write_1h) * write_rate
        + write_1h * write_1h_rate
    ) / PER_MILLION
    return Cost(input_cost=input_cost, output_cost=usage.output_tokens * rates.output / PER_MILLION)


def _genai_usage(usage: TokenUsage) -> GenaiUsage:
    return GenaiUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
    )


#: Dated snapshot and version suffixes: gpt-4o-2024-08-06, claude-sonnet-4-5-20250929,
#: claude-3-5-sonnet@20240620, gemini-1.5-pro-002, gemini-2.5-flash-preview-09-2025, -latest.
_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{3}|-latest|-preview-\d{2}-\d{4}|-exp-\d{4})$")


def lookup_names(model: str) -> list[str]:
    """Names to try for a model, most specific first: as given, without ``models/``, the ``ft:``
    base model, then with dated snapshot/version suffixes removed."""
    names: list[str] = []

    def add(name: str) -> None:
        if name and name not in names:
            names.append(name)

    add(model)
    name = model.removeprefix("models/")
    add(name)
    if name.startswith("ft:"):
        # ft:gpt-4o-mini-2024-07-18:org::id → gpt-4o-mini-2024-07-18
        name = name.split(":")[1]
        add(name)
    while (stripped := _SUFFIX.sub("", name)) != name:
        name = stripped
        add(name)
    return names


class PriceBook:
    """An immutable set of prices with a cached per-model resolution."""

    def __init__(self, config: PricingConfig) -> None:
        self._overrides = dict(config.models)
        self._aliases = dict(config.aliases)
        self._resolved: dict[tuple[Provider, str, str | None], tuple[str, Any, str | None]] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[Provider, str]] = set()
        self.version = self._hash()

    def _hash(self) -> str:
        material = {
            "overrides": {
                name: {k: str(getattr(rate, k)) for k in rate.__slots__}
                for name, rate in sorted(self._overrides.items())
            },
            "aliases": self._aliases,
            "genai_prices": genai_prices.__version__,
        }
        digest = hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return digest[:12]

    def quote(
        self,
        provider: Provider,
        model: str | None,
        usage: TokenUsage,
        when: datetime | None = None,
        request_model: str | None = None,
    ) -> Quote:
        """Price ``usage`` of ``model`` (the response's), falling back to ``request_model``.

        Never raises: a failure prices nothing and says why.
        """
        if not model:
            model, request_model = request_model, None
        if not model:
            return Quote(None, SOURCE_UNKNOWN, self.version)
        kind, target, priced_as = self._resolve(provider, model, request_model)
        if kind == SOURCE_CONFIG:
            return Quote(cost_from_rates(target, usage), SOURCE_CONFIG, self.version, priced_as)
        if kind == SOURCE_GENAI_PRICES:
            genai_provider, model_info = target
            try:
                calc = model_info.calc_price(
                    _genai_usage(usage), genai_provider, genai_request_timestamp=when
                )
            except (ValueError, LookupError) as exc:
                log.warning("genai-prices could not price %s/%s: %s", provider, model, exc)
                return Quote(None, SOURCE_UNKNOWN, self.version)
            return Quote(
                Cost(input_cost=calc.input_price, output_cost=calc.output_price),
                SOURCE_GENAI_PRICES,
                self.version,
                priced_as,
            )
        self._warn_unknown(provider, model)
        return Quote(None, SOURCE_UNKNOWN, self.version)

    def _resolve(
        self, provider: Provider, model: str, request_model: str | None
    ) -> tuple[str, Any, str | None]:
        key = (provider, model, request_model)
        found = self._resolved.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._resolved.get(key)
            if found is None:
                found = self._resolve_uncached(provider, model, request_model)
                self._resolved[key] = found
        return found

    def _candidates(self, model: str, request_model: str | None) -> list[str]:
        names: list[str] = []
        for given in (model, request_model):
            if not given:
                continue
            for name in lookup_names(given):
                alias = self._aliases.get(name)
                for candidate in (name, *(lookup_names(alias) if alias else ())):
                    if candidate not in names:
                        names.append(candidate)
        return names

    def _resolve_uncached(
        self, provider: Provider, model: str, request_model: str | None
    ) -> tuple[str, Any, str | None]:
        names = self._candidates(model, request_model)
        for name in names:
            if name in self._overrides:
                return SOURCE_CONFIG, self._overrides[name], name
        snapshot = get_snapshot()
        for name in names:
            try:
                found = snapshot.find_provider_model(name, None, GENAI_PROVIDER_IDS[provider], None)
            except LookupError:
                continue
            return SOURCE_GENAI_PRICES, found, found[1].id
        return SOURCE_UNKNOWN, None, None

    def _warn_unknown(self, provider: Provider, model: str) -> None:
        key = (provider, model)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("no price for %s model %r: its records carry null costs", provider, model)

"""Prices a normalised usage. Precedence: config overrides → prices file → genai-prices → unknown.

A :class:`PriceBook` is immutable; its ``version`` is a short hash of everything that sets a price,
so every record says which price set priced it, and a reload swaps one book for another atomically.
Each model is resolved once; its rates for a date and service tier are turned into a plain
:class:`~llmtally.pricing.rates.RateSheet` once and cached, so pricing a record is a few Decimal
operations. ``price_source`` names the source and, after a colon, the matching rule when it was not
the exact name: ``alias``, ``base_model`` (dated snapshot or version suffix dropped), ``fine_tune_base``,
``request_model`` (found under the requested name, not the response's).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import orjson
from genai_prices.data_snapshot import get_snapshot

from llmtally.config import ModelPrice, PricingConfig
from llmtally.pricing.fees import FEE_TABLE, ITEMS, THOUSAND
from llmtally.pricing.files import PriceFile, load_price_file
from llmtally.pricing.rates import RateSheet, cost, scaled, sheet_from_config, sheet_from_genai
from llmtally.record import Cost, LineItem, Provider, TokenUsage

log = logging.getLogger("llmtally.pricing")

#: genai-prices' provider ids.
GENAI_PROVIDER_IDS: dict[Provider, str] = {
    "openai": "openai", "anthropic": "anthropic", "gemini": "google", "converse": "aws", "invoke": "aws",
}  # fmt: skip

SOURCE_CONFIG = "config"
SOURCE_FILE = "prices_file"
SOURCE_GENAI_PRICES = "genai-prices"
SOURCE_UNKNOWN = "unknown_model"

#: Service tiers that are the standard price (no variant needed).
STANDARD_TIERS = frozenset(
    {
        "default",
        "standard",
        "auto",
        "standard_only",
        "unspecified",
        "",
        "on_demand",
        "traffic_type_unspecified",
    }
)
#: Batch results (OpenAI, Anthropic and Gemini batch APIs): where the price data has no batch rates
#: for a model, its standard rates times this, the discount all three document for batches.
BATCH_TIER = "batch"
BATCH_DISCOUNT = Decimal("0.5")
#: Tiers paid for in advance, not per token (Vertex provisioned throughput: per GSU and hour). The
#: tokens are recorded and priced at on-demand rates, as what the call would have cost, with a note.
PREPAID_TIERS = frozenset({"provisioned_throughput"})


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of one call, and what priced it."""

    cost: Cost | None
    price_source: str
    price_version: str
    #: The model name the price was found under (after aliases and fallbacks).
    priced_as: str | None = None
    #: Why the price may differ from the bill (e.g. a service tier without price data).
    note: str | None = None
    #: The call's billed units beyond tokens, priced where a price is known (in ``cost`` too).
    line_items: tuple[LineItem, ...] = ()


#: Dated snapshot and version suffixes: gpt-4o-2024-08-06, claude-sonnet-4-5-20250929,
#: claude-3-5-sonnet@20240620, gemini-1.5-pro-002, gemini-2.5-flash-preview-09-2025, -latest.
_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{3}|-latest|-preview-\d{2}-\d{4}|-exp-\d{4})$")


def lookup_names(model: str) -> list[tuple[str, str]]:
    """Names to try for a model with the rule that produced each, most specific first."""
    names: list[tuple[str, str]] = []

    def add(name: str, rule: str) -> None:
        if name and all(name != n for n, _ in names):
            names.append((name, rule))

    add(model, "exact")
    name = model.removeprefix("models/")
    add(name, "exact")
    if name.startswith("ft:"):
        base = name.split(":")[1]  # ft:gpt-4o-mini-2024-07-18:org::id → gpt-4o-mini-2024-07-18
        add(f"ft:{base}", "fine_tune")
        stripped = _SUFFIX.sub("", base)
        add(f"ft:{stripped}", "fine_tune")
        add(base, "fine_tune_base")
        add(stripped, "fine_tune_base")
        return names
    while (stripped := _SUFFIX.sub("", name)) != name:
        name = stripped
        add(name, "base_model")
    return names


def tier_context(service_tier: str | None) -> dict[str, str] | None:
    """genai-prices' price-variant context for a service tier (None: the standard price)."""
    tier = (service_tier or "").lower()
    if tier in STANDARD_TIERS:
        return None
    if tier == "batch":
        return {"processing": "batch"}
    if tier == "fast":
        return {"speed": "fast"}
    return {"service_tier": tier}


@dataclass(frozen=True, slots=True)
class _Resolution:
    source: str
    rule: str
    name: str | None
    target: Any  # ModelPrice (overrides) or (genai Provider, ModelInfo)


class PriceBook:
    """An immutable set of prices with cached resolution. Thread-safe."""

    def __init__(self, config: PricingConfig, price_file: PriceFile | None = None) -> None:
        self._overrides = dict(config.models)
        self._fees = dict(config.fees)
        self._aliases = dict(config.aliases)
        if price_file is None and config.file:
            price_file = load_price_file(config.file)  # raises PriceFileError
        self.price_file = price_file
        self._file_models = dict(price_file.models) if price_file else {}
        if price_file:
            self._aliases = {**price_file.aliases, **self._aliases}
        self._snapshot = get_snapshot()
        self._resolved: dict[tuple[Provider, str, str | None, str | None], _Resolution] = {}
        self._sheets: dict[tuple[int, Any, str | None], tuple[RateSheet | None, bool]] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[Provider, str]] = set()
        #: Quotes that found no price, per model (a metric).
        self.unpriced: Counter[str] = Counter()
        self.version = self._hash()

    def _hash(self) -> str:
        def rates(price: ModelPrice) -> str:
            return repr(price)

        material = {
            "overrides": {name: rates(p) for name, p in sorted(self._overrides.items())},
            "aliases": dict(sorted(self._aliases.items())),
            "fees": {item: str(price) for item, price in sorted(self._fees.items())},
            "file": hashlib.sha256(self.price_file.content).hexdigest() if self.price_file else None,
            "genai_prices": genai_prices.__version__,
            "snapshot": self._snapshot.timestamp.isoformat()
            if self._snapshot.from_auto_update
            else "bundled",
        }
        return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]

    def quote(
        self,
        provider: Provider,
        model: str | None,
        usage: TokenUsage,
        when: datetime | None = None,
        request_model: str | None = None,
        service_tier: str | None = None,
        inference_geo: str | None = None,
        price_provider: str | None = None,
        line_items: Mapping[str, int] | None = None,
    ) -> Quote:
        """Price ``usage`` of ``model`` (the response's), falling back to ``request_model``. Never raises.

        ``price_provider``: the genai-prices provider id of the route the call was billed through
        (``azure``, ``aws``, ``google`` …; default: the dialect's own API). Overrides and price files
        are by model name, whatever the route."""
        if not model:
            model, request_model = request_model, None
        if not model:
            return Quote(
                None, SOURCE_UNKNOWN, self.version, line_items=price_items(None, line_items, self._fees)
            )
        resolution = self._resolve(provider, model, request_model, price_provider)
        if resolution.source == SOURCE_UNKNOWN:
            self._unknown(provider, model)
            return Quote(
                None, SOURCE_UNKNOWN, self.version, line_items=price_items(None, line_items, self._fees)
            )
        when = when or datetime.now(UTC)
        try:
            sheet, tier_priced = self._sheet(resolution, when, service_tier)
        except (ValueError, LookupError) as exc:
            log.warning("cannot price %s/%s: %s", provider, model, exc)
            sheet, tier_priced = None, True
        if sheet is None:
            self._unknown(provider, model)
            return Quote(
                None, SOURCE_UNKNOWN, self.version, line_items=price_items(None, line_items, self._fees)
            )
        source = resolution.source if resolution.rule == "exact" else f"{resolution.source}:{resolution.rule}"
        notes = []
        if (service_tier or "").lower() in PREPAID_TIERS:
            notes.append(
                f"{service_tier}: prepaid capacity, not billed per token; cost is the on-demand equivalent"
            )
        elif not tier_priced and (service_tier or "").lower() == BATCH_TIER:
            sheet = scaled(sheet, BATCH_DISCOUNT)
            notes.append(
                f"no batch price data for {resolution.name}: 50 % of the standard rates "
                "(every provider's batch discount)"
            )
        elif not tier_priced:
            notes.append(
                f"service tier {service_tier!r} has no price data for {resolution.name}: standard rates used"
            )
        if inference_geo and inference_geo.lower() not in ("global", ""):
            # Regional inference carries a surcharge (Anthropic: 1.1x for "us") that no price data lists.
            notes.append(
                f"inference_geo {inference_geo!r} surcharge is not in the price data: standard rates used"
            )
        items = price_items(sheet, line_items, self._fees)
        notes += [
            f"no price for {i.item} ({i.quantity} {i.unit}): not in the cost" for i in items if i.cost is None
        ]
        note = "; ".join(notes) or None
        priced = replace(cost(sheet, usage), line_items=items)
        return Quote(priced, source, self.version, resolution.name, note, items)

    def _unknown(self, provider: Provider, model: str) -> None:
        self.unpriced[model] += 1
        key = (provider, model)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("no price for %s model %r: its cost is null", provider, model)

    # ---- resolution (once per model) ----

    def _resolve(
        self, provider: Provider, model: str, request_model: str | None, price_provider: str | None
    ) -> _Resolution:
        key = (provider, model, request_model, price_provider)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolve_uncached(provider, model, request_model, price_provider)
            with self._lock:
                self._resolved[key] = found
        return found

    def _candidates(self, provider: Provider, model: str, request_model: str | None) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for given, via_request in ((model, False), (request_model, True)):
            if not given:
                continue
            for name, rule in lookup_names(given):
                rule = "request_model" if via_request and rule == "exact" else rule
                alias = self._aliases.get(name)
                found = [(name, rule)]
                if alias:
                    found += [(a, "alias") for a, _ in lookup_names(alias)]
                for candidate in found:
                    if all(candidate[0] != n for n, _ in out):
                        out.append(candidate)
        # LiteLLM keys some providers' models with a prefix (gemini/…, anthropic/…).
        out += [(f"{provider}/{n}", r) for n, r in out if "/" not in n]
        return out

    def _resolve_uncached(
        self, provider: Provider, model: str, request_model: str | None, price_provider: str | None
    ) -> _Resolution:
        names = self._candidates(provider, model, request_model)
        for source, table in ((SOURCE_CONFIG, self._overrides), (SOURCE_FILE, self._file_models)):
            for name, rule in names:
                if name in table:
                    return _Resolution(source, rule, name, table[name])
        genai_provider = price_provider or GENAI_PROVIDER_IDS[provider]
        for name, rule in names:
            if "/" in name:
                continue
            try:
                found = self._snapshot.find_provider_model(name, None, genai_provider, None)
            except LookupError:
                continue
            return _Resolution(SOURCE_GENAI_PRICES, rule, found[1].id, found)
        return _Resolution(SOURCE_UNKNOWN, "exact", None, None)

    # ---- rate sheets (once per model, date and tier) ----

    def _sheet(
        self, resolution: _Resolution, when: datetime, tier: str | None
    ) -> tuple[RateSheet | None, bool]:
        tier = (tier or "").lower() or None
        if tier in STANDARD_TIERS or tier in PREPAID_TIERS:
            tier = None
        if resolution.source != SOURCE_GENAI_PRICES:
            key: tuple[int, Any, str | None] = (id(resolution.target), None, tier)
            found = self._sheets.get(key)
            if found is None:
                found = sheet_from_config(resolution.target, tier)
                with self._lock:
                    self._sheets[key] = found
            return found
        _, model_info = resolution.target
        dated = _has_time_of_day_prices(model_info)
        key = (id(model_info), when.date() if not dated else when, tier)
        found = self._sheets.get(key)
        if found is None:
            context = tier_context(tier)
            model_price = model_info.get_prices(when, context)
            priced = context is None or _has_variant(model_info, context)
            found = (sheet_from_genai(model_price), priced)
            if not dated:
                with self._lock:
                    self._sheets[key] = found
        return found


def price_items(
    sheet: RateSheet | None, counts: Mapping[str, int] | None, fees: Mapping[str, Decimal] | None = None
) -> tuple[LineItem, ...]:
    """Each billed item at the configured fee (``[pricing.fees]``), else the model's price for it
    (genai-prices), else the fee table's, else none."""
    if not counts:
        return ()
    out = []
    for item, quantity in sorted(counts.items()):
        kind = ITEMS.get(item)
        unit = kind.unit if kind else "use"
        per_1000 = sheet.fee(kind.genai_field) if sheet is not None and kind and kind.genai_field else None
        unit_price: Decimal | None
        if fees and item in fees:
            unit_price, source = fees[item], SOURCE_CONFIG
        elif per_1000 is not None:
            unit_price, source = per_1000 / THOUSAND, SOURCE_GENAI_PRICES
        elif item in FEE_TABLE:
            fee = FEE_TABLE[item]
            unit_price, source = fee.per_unit, f"fee_table:{fee.as_of}"
        else:
            unit_price, source = None, SOURCE_UNKNOWN
        cost_of = quantity * unit_price if unit_price is not None else None
        out.append(LineItem(item, quantity, unit, unit_price, cost_of, source))
    return tuple(out)


def _has_variant(model_info: Any, context: dict[str, str]) -> bool:
    return any(v.when == context for v in model_info.price_variants or ())


def _has_time_of_day_prices(model_info: Any) -> bool:
    prices = model_info.prices
    if not isinstance(prices, list):
        return False
    return any(type(p.constraint).__name__ == "TimeOfDateConstraint" for p in prices)

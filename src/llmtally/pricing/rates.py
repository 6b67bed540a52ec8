"""Rate sheets and the cost arithmetic: pure functions over Decimal.

A :class:`RateSheet` is a model's resolved prices (for one date and service tier): base rates plus
long-context tiers. Crossing a tier's threshold prices the *whole* request at that tier, as Gemini
Pro and long-context Claude/OpenAI bill. Rates are USD per 1M tokens.

Fallbacks for rates a price does not list: cache read, cache write, input audio and input image are
charged at the input rate, cached audio at the cache read rate (else the input audio rate), 1-hour
cache writes at the 5-minute write rate, output audio and output image at the output rate (the same
decomposition genai-prices applies: its leaf units, with cache, audio and image tokens disjoint parts
of the input, except cached audio, which is part of both the cache reads and the audio input).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from decimal import Decimal
from typing import Any

from llmtally.config import ModelPrice, PriceTier, RateOverride
from llmtally.record import Cost, TokenUsage

PER_MILLION = Decimal(1_000_000)
RATE_KEYS = (
    "input", "output", "cache_read", "cache_write", "cache_write_1h", "input_audio", "output_audio",
    "input_image", "output_image",
    "cache_read_audio",
)  # fmt: skip
#: genai-prices' price keys for our rate keys.
GENAI_KEYS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
    "input_audio": "input_audio_mtok",
    "output_audio": "output_audio_mtok",
    "input_image": "input_image_mtok",
    "output_image": "output_image_mtok",
    "cache_read_audio": "cache_audio_read_mtok",
}


@dataclass(frozen=True, slots=True)
class Rates:
    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    input_image: Decimal | None = None
    output_image: Decimal | None = None
    cache_read_audio: Decimal | None = None

    def overridden(self, override: RateOverride | PriceTier) -> Rates:
        changes = {k: getattr(override, k) for k in RATE_KEYS if getattr(override, k) is not None}
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class RateSheet:
    base: Rates
    #: (threshold, rates), ascending: input above the threshold prices the whole request at the rates.
    tiers: tuple[tuple[int, Rates], ...] = ()
    #: Per-use prices beyond tokens, by genai-prices field (``web_searches_kcount``: USD per 1,000).
    fees: tuple[tuple[str, Decimal], ...] = ()

    def fee(self, name: str) -> Decimal | None:
        return next((price for key, price in self.fees if key == name), None)

    def rates_for(self, input_tokens: int) -> Rates:
        for above, rates in reversed(self.tiers):
            if input_tokens > above:
                return rates
        return self.base


def cost(sheet: RateSheet, usage: TokenUsage) -> Cost:
    """What ``usage`` costs at ``sheet``'s rates (Decimal, USD)."""
    r = sheet.rates_for(usage.input_tokens)
    write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    audio_in = min(usage.input_audio_tokens, usage.input_tokens)
    image_in = min(usage.input_image_tokens, usage.input_tokens - audio_in)
    # Cached audio is part of both the cache reads and the audio input (genai-prices' hierarchy).
    cached_audio = min(usage.cache_read_audio_tokens, audio_in, usage.cache_read_tokens)
    fresh_audio = audio_in - cached_audio
    uncached = max(
        usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens - fresh_audio - image_in, 0
    )
    write_rate = r.cache_write if r.cache_write is not None else r.input
    read_rate = r.cache_read if r.cache_read is not None else r.input
    input_cost = (
        uncached * r.input
        + fresh_audio * (r.input_audio if r.input_audio is not None else r.input)
        + image_in * (r.input_image if r.input_image is not None else r.input)
        + (usage.cache_read_tokens - cached_audio) * read_rate
        + cached_audio * _cached_audio_rate(r)
        + (usage.cache_write_tokens - write_1h) * write_rate
        + write_1h * (r.cache_write_1h if r.cache_write_1h is not None else write_rate)
    )
    audio_out = min(usage.output_audio_tokens, usage.output_tokens)
    image_out = min(usage.output_image_tokens, usage.output_tokens - audio_out)
    output_cost = (
        (usage.output_tokens - audio_out - image_out) * r.output
        + audio_out * (r.output_audio if r.output_audio is not None else r.output)
        + image_out * (r.output_image if r.output_image is not None else r.output)
    )
    return Cost(input_cost=input_cost / PER_MILLION, output_cost=output_cost / PER_MILLION)


def _cached_audio_rate(r: Rates) -> Decimal:
    """Cached audio's rate: its own, else the cache read rate, else the audio input rate, else input
    (genai-prices' join; where it finds cache read and audio rates but no cached-audio one it refuses
    to choose, and llmtally takes the cache read rate: the cache discount applies)."""
    for rate in (r.cache_read_audio, r.cache_read, r.input_audio):
        if rate is not None:
            return rate
    return r.input


def scaled(sheet: RateSheet, factor: Decimal) -> RateSheet:
    """Every token rate of ``sheet`` times ``factor`` (per-use fees unchanged)."""

    def times(rates: Rates) -> Rates:
        return replace(rates, **{k: v * factor for k in RATE_KEYS if (v := getattr(rates, k)) is not None})

    return replace(sheet, base=times(sheet.base), tiers=tuple((a, times(r)) for a, r in sheet.tiers))


def sheet_from_config(price: ModelPrice, service_tier: str | None = None) -> tuple[RateSheet, bool]:
    """A configured price as a sheet; the bool says whether ``service_tier`` had its own rates."""
    base = Rates(**{k: getattr(price, k) for k in RATE_KEYS})
    tiered = tuple(sorted(((t.above, base.overridden(t)) for t in price.tiers), key=lambda x: x[0]))
    if not service_tier or service_tier not in price.service_tiers:
        return RateSheet(base, tiered), not service_tier
    override = price.service_tiers[service_tier]
    return RateSheet(base.overridden(override), tuple((a, r.overridden(override)) for a, r in tiered)), True


def sheet_from_genai(model_price: Any) -> RateSheet | None:
    """A genai-prices ``ModelPrice`` as a sheet, or None if it has no token prices."""
    values: dict[str, Any] = {k: getattr(model_price, GENAI_KEYS[k], None) for k in RATE_KEYS}
    if values["input"] is None and values["output"] is None:
        return None
    starts = sorted({t.start for v in values.values() if _is_tiered(v) for t in v.tiers})

    def at(threshold: int | None) -> Rates:
        chosen: dict[str, Decimal | None] = {}
        for key, value in values.items():
            if _is_tiered(value):
                price = value.base
                for tier in value.tiers:
                    if threshold is not None and tier.start <= threshold:
                        price = tier.price
                chosen[key] = price
            else:
                chosen[key] = value
        return Rates(
            input=chosen["input"] or Decimal(0),
            output=chosen["output"] or Decimal(0),
            **{k: chosen[k] for k in RATE_KEYS if k not in ("input", "output")},
        )

    fees = tuple(
        (name, value)
        for name in ("web_searches_kcount", "storage_searches_kcount")
        if isinstance(value := getattr(model_price, name, None), Decimal)
    )
    return RateSheet(at(None), tuple((start, at(start)) for start in starts), fees)


def _is_tiered(value: Any) -> bool:
    return hasattr(value, "tiers") and hasattr(value, "base")


def sheet_fingerprint(sheet: RateSheet) -> list[Any]:
    """Stable material for hashing a sheet into a price version."""
    return [[str(getattr(sheet.base, f.name)) for f in fields(Rates)], [[a, str(r)] for a, r in sheet.tiers]]

"""Prices files: llmtally's TOML format, or LiteLLM's ``model_prices_and_context_window.json``.

The format is recognised from the content (a JSON object → LiteLLM, otherwise TOML). Errors name the
file, the line and the problem. LiteLLM's per-token USD prices are converted exactly (parsed as
Decimal, never float) to USD per 1M tokens.

llmtally TOML::

    [models."my-model"]
    input = 3.0            # USD per 1M tokens
    output = 15.0
    cache_read = 0.3
    cache_write = 3.75     # 5-minute
    cache_write_1h = 6.0
    tiers = [{ above = 200000, input = 6.0, output = 22.5 }]
    [models."my-model".service_tiers.batch]
    input = 1.5
    output = 7.5

    [aliases]
    "my-deployment" = "my-model"
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from llmtally.config import ConfigError, ModelPrice, PriceTier, PricingConfig, RateOverride, _build, toml_line

MILLION = Decimal(1_000_000)


class PriceFileError(ValueError):
    """A prices file is invalid; the message names the file, the line and the problem."""


@dataclass(frozen=True, slots=True)
class PriceFile:
    path: str
    format: str  # "toml" or "litellm"
    models: dict[str, ModelPrice]
    aliases: dict[str, str]
    #: The file's bytes, for the price version.
    content: bytes


def load_price_file(path: str | Path) -> PriceFile:
    name = str(path)
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise PriceFileError(f"{name}: cannot read: {exc.strerror or exc}") from None
    text = content.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        models = _litellm(name, text)
        return PriceFile(name, "litellm", models, {}, content)
    models, aliases = _toml(name, text)
    return PriceFile(name, "toml", models, aliases, content)


def _toml(name: str, text: str) -> tuple[dict[str, ModelPrice], dict[str, str]]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceFileError(f"{name}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"models", "aliases"})
    if unknown:
        raise PriceFileError(
            f"{name}:{_line_of(text, unknown[0])}: unknown table {unknown[0]!r} (known: models, aliases)"
        )
    try:
        pricing: PricingConfig = _build(PricingConfig, raw, name, ())
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{name}: ")
        raise PriceFileError(f"{name}:{toml_line(text, message)}: {message}") from None
    return pricing.models, pricing.aliases


#: LiteLLM per-token fields → our rate keys. A field may end in a service-tier suffix
#: (``_flex``, ``_priority``, ``_batches``) and/or ``_above_<N>k_tokens`` (a long-context tier).
_LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
    "input_cost_per_audio_token": "input_audio",
    "output_cost_per_audio_token": "output_audio",
    "input_cost_per_image_token": "input_image",
    "output_cost_per_image_token": "output_image",
}
_LITELLM_SERVICE_TIERS = (("_flex", "flex"), ("_priority", "priority"), ("_batches", "batch"))
_ABOVE = re.compile(r"^(?P<field>.+)_above_(?P<n>\d+)k_tokens$")


def _litellm(name: str, text: str) -> dict[str, ModelPrice]:
    try:
        data = json.loads(text, parse_float=Decimal)  # exact: no binary float on the way to money
    except json.JSONDecodeError as exc:
        raise PriceFileError(f"{name}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise PriceFileError(f"{name}:1: expected a JSON object of models")
    models: dict[str, ModelPrice] = {}
    for model, spec in data.items():
        if model == "sample_spec" or not isinstance(spec, dict):
            continue
        try:
            price = _litellm_model(spec)
        except (ValueError, ArithmeticError) as exc:
            raise PriceFileError(f"{name}:{_line_of(text, model)}: model {model!r}: {exc}") from None
        if price is not None:
            models[model] = price
    return models


def _litellm_model(spec: dict[str, Any]) -> ModelPrice | None:
    base: dict[str, Decimal] = {}
    service: dict[str, dict[str, Decimal]] = {}
    tiers: dict[int, dict[str, Decimal]] = {}
    for raw_field, value in spec.items():
        field, above, tier = raw_field, None, None
        if match := _ABOVE.match(field):
            field, above = match["field"], int(match["n"]) * 1000
        for suffix, name in _LITELLM_SERVICE_TIERS:
            if field.endswith(suffix):
                field, tier = field.removesuffix(suffix), name
                break
        key = _LITELLM_FIELDS.get(field)
        if key is None:
            continue
        rate = _per_million(raw_field, value)
        if above is not None:
            tiers.setdefault(above, {})[key] = rate
        elif tier is not None:
            service.setdefault(tier, {})[key] = rate
        else:
            base[key] = rate
    if "input" not in base and "output" not in base:
        return None  # image/audio-only or per-second models: not token-priced
    return ModelPrice(
        input=base.pop("input", Decimal(0)),
        output=base.pop("output", Decimal(0)),
        **base,
        tiers=[PriceTier(above=a, **rates) for a, rates in sorted(tiers.items())],
        service_tiers={name: RateOverride(**rates) for name, rates in service.items()},
    )


def _per_million(field: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    rate = Decimal(value) * MILLION
    if rate < 0:
        raise ValueError(f"{field}: must not be negative, got {value}")
    return rate.normalize() if rate == rate.to_integral() else rate


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first mention of ``needle`` (a model or key name), else 1."""
    if not needle:
        return 1
    index = text.find(f'"{needle}"')
    if index < 0:
        index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 1

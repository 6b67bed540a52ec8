"""Prices files: llmtally TOML and LiteLLM JSON, with errors that name file, line and problem."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from llmtally.config import PricingConfig
from llmtally.pricing import PriceBook, PriceFileError, load_price_file
from llmtally.record import TokenUsage

TOML = """\
[models."house-model"]
input = 3.0
output = 15.0
cache_read = 0.3
cache_write = 3.75
cache_write_1h = 6.0
tiers = [{ above = 200000, input = 6.0, output = 22.5 }]

[models."house-model".service_tiers.batch]
input = 1.5
output = 7.5

[aliases]
"my-deployment" = "house-model"
"""

LITELLM = {
    "sample_spec": {"input_cost_per_token": 0},
    "gpt-4o": {
        "input_cost_per_token": 2.5e-06,
        "output_cost_per_token": 1e-05,
        "cache_read_input_token_cost": 1.25e-06,
        "input_cost_per_token_batches": 1.25e-06,
        "output_cost_per_token_batches": 5e-06,
        "input_cost_per_token_priority": 4.25e-06,
        "litellm_provider": "openai",
        "mode": "chat",
    },
    "gemini/gemini-2.5-pro": {
        "input_cost_per_token": 1.25e-06,
        "input_cost_per_token_above_200k_tokens": 2.5e-06,
        "output_cost_per_token": 1e-05,
        "output_cost_per_token_above_200k_tokens": 1.5e-05,
        "litellm_provider": "gemini",
    },
    "claude-sonnet-4-5": {
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
        "cache_creation_input_token_cost": 3.75e-06,
        "cache_creation_input_token_cost_above_1hr": 6e-06,
        "cache_read_input_token_cost": 3e-07,
        "litellm_provider": "anthropic",
    },
    "dall-e-3": {"output_cost_per_image": 0.04, "mode": "image_generation"},
}


def test_toml_prices_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(TOML)
    book = PriceBook(PricingConfig(file=str(path)))
    quote = book.quote("openai", "my-deployment", TokenUsage(1000, 100, 200, 100, 40))
    assert quote.price_source == "prices_file:alias"
    assert quote.cost is not None
    # 700 * 3 + 200 * 0.3 + 60 * 3.75 + 40 * 6 = 2625 µ$
    assert (quote.cost.input_cost, quote.cost.output_cost) == (Decimal("0.002625"), Decimal("0.0015"))
    long = book.quote("openai", "house-model", TokenUsage(250_000, 0))
    assert long.cost is not None and long.cost.input_cost == Decimal("1.5")
    batch = book.quote("openai", "house-model", TokenUsage(1_000_000, 0), service_tier="batch")
    assert batch.cost is not None and batch.cost.input_cost == Decimal("1.5")


def test_litellm_file_is_recognised_and_mapped_exactly(tmp_path: Path) -> None:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_bytes(orjson.dumps(LITELLM, option=orjson.OPT_INDENT_2))
    loaded = load_price_file(path)
    assert loaded.format == "litellm"
    assert set(loaded.models) == {"gpt-4o", "gemini/gemini-2.5-pro", "claude-sonnet-4-5"}
    gpt = loaded.models["gpt-4o"]
    assert (gpt.input, gpt.output, gpt.cache_read) == (Decimal("2.5"), Decimal("10"), Decimal("1.25"))
    assert gpt.service_tiers["batch"].input == Decimal("1.25")
    assert gpt.service_tiers["priority"].input == Decimal("4.25")
    claude = loaded.models["claude-sonnet-4-5"]
    assert (claude.cache_write, claude.cache_write_1h) == (Decimal("3.75"), Decimal("6"))
    gemini = loaded.models["gemini/gemini-2.5-pro"]
    assert gemini.tiers[0].above == 200_000 and gemini.tiers[0].input == Decimal("2.5")

    book = PriceBook(PricingConfig(file=str(path)))
    # LiteLLM keys Gemini models as gemini/<name>: found through the provider prefix.
    quote = book.quote("gemini", "gemini-2.5-pro", TokenUsage(300_000, 1000))
    assert quote.price_source == "prices_file"
    assert quote.cost is not None and quote.cost.input_cost == Decimal("0.75")
    assert (
        book.quote("openai", "gpt-4o-2024-08-06", TokenUsage(1, 1)).price_source == "prices_file:base_model"
    )


def test_precedence_config_then_file_then_genai_prices(tmp_path: Path) -> None:
    from llmtally.config import ModelPrice

    path = tmp_path / "prices.json"
    path.write_bytes(orjson.dumps(LITELLM))
    config = PricingConfig(file=str(path), models={"gpt-4o": ModelPrice(input=Decimal(9), output=Decimal(9))})
    book = PriceBook(config)
    assert book.quote("openai", "gpt-4o", TokenUsage(1, 1)).price_source == "config"
    assert book.quote("anthropic", "claude-sonnet-4-5", TokenUsage(1, 1)).price_source == "prices_file"
    assert book.quote("anthropic", "claude-haiku-4-5", TokenUsage(1, 1)).price_source == "genai-prices"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.toml", '[models."a"]\ninput = 1\noutput = "x"\n', "p.toml:3: [models.a] output: not a number"),
        ("p.toml", '[models."a"]\ninput = 1\noutput = 1\n\n[models."b"]\ninput = -2\noutput = 1\n', "p.toml:6: [models.b] input: price must be"),
        ("p.toml", '[models."a"]\ninput = 1\noutput = 1\n\n[models."b-2"]\ninput = 2\n', 'p.toml:5: [models] b-2: missing required key output'),
        ("p.toml", "[models\n", "p.toml: not valid TOML"),
        ("p.toml", "[prices]\n", "p.toml:1: unknown table 'prices'"),
        ("p.json", '{\n  "gpt-4o": {\n    "input_cost_per_token": "cheap"\n  }\n}', "p.json:2: model 'gpt-4o': input_cost_per_token: expected a number"),
        ("p.json", '{\n  "gpt-4o": {\n    "input_cost_per_token": 1e-6,\n  }\n}', "p.json:4: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_files_name_file_line_and_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PriceFileError) as err:
        load_price_file(path)
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0]))
    assert message.split(":", 1)[1] in str(err.value)

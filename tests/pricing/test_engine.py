"""Price lookups and Decimal maths: a hand-computed table, and equality with genai-prices' own maths."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices.data_snapshot import get_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtally.config import ModelPrice, PriceTier, PricingConfig, RateOverride
from llmtally.pricing import PriceBook, cost, lookup_names
from llmtally.pricing.engine import tier_context
from llmtally.pricing.rates import sheet_from_genai
from llmtally.record import Provider, TokenUsage

BOOK = PriceBook(PricingConfig())
M = Decimal(1_000_000)


def usd(micro: str | int | Decimal) -> Decimal:
    """Micro-dollars (tokens x USD-per-1M) to USD."""
    return Decimal(micro) / M


# (provider, model, usage, service tier, expected input cost, expected output cost); rates in comments
# are USD per 1M tokens from the genai-prices data shipped with the installed package.
TABLE = [
    # gpt-4o: in 2.5, cached 1.25, out 10. Reasoning is inside output_tokens and priced as output.
    ("openai", "gpt-4o-2024-08-06", TokenUsage(1200, 300, 1024, reasoning_tokens=128), None,
     usd(176 * Decimal("2.5") + 1024 * Decimal("1.25")), usd(300 * 10)),
    # gpt-5.4-mini: in 0.75, cached 0.075, out 4.5; flex and batch half of that.
    ("openai", "gpt-5.4-mini", TokenUsage(10_000, 2_000, 4_000, reasoning_tokens=1_500), None,
     usd(6000 * Decimal("0.75") + 4000 * Decimal("0.075")), usd(2000 * Decimal("4.5"))),
    ("openai", "gpt-5.4-mini", TokenUsage(10_000, 2_000, 4_000), "flex",
     usd(6000 * Decimal("0.375") + 4000 * Decimal("0.0375")), usd(2000 * Decimal("2.25"))),
    ("openai", "gpt-5.4-mini", TokenUsage(10_000, 2_000), "batch", usd(10_000 * Decimal("0.375")), usd(2000 * Decimal("2.25"))),
    ("openai", "gpt-5.4-mini", TokenUsage(10_000, 2_000), "priority", usd(10_000 * Decimal("1.5")), usd(2000 * 9)),
    # gpt-5.5: above 272k input the whole request is priced at in 10, cached 1, out 45.
    ("openai", "gpt-5.5", TokenUsage(272_000, 1_000), None, usd(272_000 * 5), usd(1000 * 30)),
    ("openai", "gpt-5.5", TokenUsage(300_000, 1_000, 100_000), None, usd(200_000 * 10 + 100_000 * 1), usd(1000 * 45)),
    # claude-sonnet-5: in 2, read 0.2, 5m write 2.5, 1h write 4, out 10.
    ("anthropic", "claude-sonnet-5", TokenUsage(12_050, 400, 10_000, 2_000, 500), None,
     usd(50 * 2 + 10_000 * Decimal("0.2") + 1500 * Decimal("2.5") + 500 * 4), usd(400 * 10)),
    # claude-opus-4-8: in 5, read 0.5, writes 6.25 / 10, out 25; batch halves every rate.
    ("anthropic", "claude-opus-4-8", TokenUsage(5_000, 1_000, 1_000, 2_000, 2_000), None,
     usd(2000 * 5 + 1000 * Decimal("0.5") + 2000 * 10), usd(1000 * 25)),
    ("anthropic", "claude-opus-4-8", TokenUsage(5_000, 1_000, 1_000, 2_000, 2_000), "batch",
     usd(2000 * Decimal("2.5") + 1000 * Decimal("0.25") + 2000 * 5), usd(1000 * Decimal("12.5"))),
    ("anthropic", "claude-haiku-4-5-20251001", TokenUsage(3_000, 100, 0, 3_000, 1_000), None,
     usd(2000 * Decimal("1.25") + 1000 * 2), usd(100 * 5)),
    # gemini-2.5-pro: in 1.25, cached 0.125, out 10; above 200k: 2.5, 0.25, 15 for the whole request.
    ("gemini", "gemini-2.5-pro", TokenUsage(100_000, 5_000, 50_000, reasoning_tokens=3_000), None,
     usd(50_000 * Decimal("1.25") + 50_000 * Decimal("0.125")), usd(5000 * 10)),
    ("gemini", "gemini-2.5-pro", TokenUsage(250_000, 5_000, 50_000), None,
     usd(200_000 * Decimal("2.5") + 50_000 * Decimal("0.25")), usd(5000 * 15)),
    ("gemini", "gemini-2.5-pro", TokenUsage(100_000, 5_000), "batch", usd(100_000 * Decimal("0.625")), usd(5000 * 5)),
    # gemini-3.1-pro-preview: 2 / 0.2 / 12, above 200k 4 / 0.4 / 18.
    ("gemini", "gemini-3.1-pro-preview", TokenUsage(300_000, 10_000, 100_000), None,
     usd(200_000 * 4 + 100_000 * Decimal("0.4")), usd(10_000 * 18)),
    ("gemini", "models/gemini-3.5-flash", TokenUsage(3_000, 750, 2_048, reasoning_tokens=500), None,
     usd(952 * Decimal("1.5") + 2048 * Decimal("0.15")), usd(750 * 9)),
]  # fmt: skip


@pytest.mark.parametrize(("provider", "model", "usage", "tier", "input_cost", "output_cost"), TABLE)
def test_price_table(
    provider: str, model: str, usage: TokenUsage, tier: str | None, input_cost: Decimal, output_cost: Decimal
) -> None:
    quote = BOOK.quote(provider, model, usage, service_tier=tier)  # type: ignore[arg-type]
    assert quote.cost is not None
    assert (quote.cost.input_cost, quote.cost.output_cost) == (input_cost, output_cost)
    assert quote.cost.total_cost == input_cost + output_cost
    assert quote.price_source == "genai-prices" and quote.note is None


def test_tier_without_price_data_is_flagged() -> None:
    quote = BOOK.quote("anthropic", "claude-sonnet-5", TokenUsage(1000, 100), service_tier="priority")
    assert quote.cost is not None and quote.cost.input_cost == usd(1000 * 2)  # standard rates
    assert "priority" in (quote.note or "")


def test_data_residency_is_flagged() -> None:
    quote = BOOK.quote("anthropic", "claude-opus-4-8", TokenUsage(1000, 100), inference_geo="us")
    assert quote.cost is not None and quote.cost.input_cost == usd(1000 * 5)
    assert "inference_geo 'us'" in (quote.note or "")
    assert BOOK.quote("anthropic", "claude-opus-4-8", TokenUsage(1, 1), inference_geo="global").note is None


def test_dated_prices_follow_the_call_date() -> None:
    # claude-sonnet-4-6 had long-context tiers until 2026-03-13 in the data.
    usage = TokenUsage(300_000, 1_000)
    before = BOOK.quote("anthropic", "claude-sonnet-4-6", usage, when=datetime(2026, 1, 1, tzinfo=UTC))
    after = BOOK.quote("anthropic", "claude-sonnet-4-6", usage, when=datetime(2026, 6, 1, tzinfo=UTC))
    assert before.cost is not None and after.cost is not None
    assert before.cost.input_cost == usd(300_000 * 6)
    assert after.cost.input_cost == usd(300_000 * 3)


# ---- equality with genai-prices' own calculation, for every model of the three providers ----------

_MODELS = [
    (provider_obj, model)
    for genai_id in ("openai", "anthropic", "google")
    for provider_obj in [get_snapshot().find_provider(None, genai_id, None)]
    for model in provider_obj.models
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(range(len(_MODELS))),
    st.integers(0, 400_000),
    st.integers(0, 50_000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.sampled_from([None, "batch", "flex", "priority", "fast"]),
    st.sampled_from([datetime(2025, 6, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)]),
)
def test_rate_sheets_equal_genai_prices_maths(
    index: int, inp: int, out: int, read: float, write: float, hour: float, tier: str | None, when: datetime
) -> None:
    """For every model of the three providers: our precomputed sheet prices exactly as genai-prices does."""
    provider_obj, info = _MODELS[index]
    cache_read = int(inp * read * 0.5)
    cache_write = int((inp - cache_read) * write * 0.5)
    write_1h = int(cache_write * hour)
    usage = TokenUsage(inp, out, cache_read, cache_write, write_1h)
    sheet = sheet_from_genai(info.get_prices(when, tier_context(tier)))
    genai_usage = GenaiUsage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=cache_read,
        cache_write_tokens=cache_write, cache_write_1h_tokens=write_1h,
    )  # fmt: skip
    try:
        reference = info.calc_price(
            genai_usage, provider_obj, genai_request_timestamp=when, price_context=tier_context(tier)
        )
    except ValueError:
        return  # genai-prices refuses this usage shape for the model
    if sheet is None:
        return  # no token prices (per-request or per-image models)
    ours = cost(sheet, usage)
    # Token costs match exactly (genai-prices may add request or search fees on top: none here).
    assert (ours.input_cost, ours.output_cost) == (reference.input_price, reference.output_price)


_AUDIO_MODELS = [
    (provider_obj, info)
    for provider_obj, info in _MODELS
    if any(
        getattr(info.get_prices(datetime(2026, 11, 1, tzinfo=UTC)), key, None) is not None
        for key in ("input_audio_mtok", "cache_audio_read_mtok", "output_audio_mtok")
    )
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(range(len(_AUDIO_MODELS))),
    st.integers(0, 100_000),
    st.integers(0, 20_000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_audio_and_cached_audio_price_as_genai_prices_does(
    index: int, inp: int, out: int, audio: float, read: float, read_audio: float, out_audio: float
) -> None:
    """Realtime usage: audio input includes its cached part, cache reads include cached audio, and
    each part is priced at its own rate (cached audio at ``cache_audio_read_mtok``)."""
    provider_obj, info = _AUDIO_MODELS[index]
    when = datetime(2026, 11, 1, tzinfo=UTC)
    audio_in = int(inp * audio)
    cached_audio = int(audio_in * read_audio)
    cache_read = int((inp - audio_in) * read) + cached_audio  # cached text + cached audio
    audio_out = int(out * out_audio)
    usage = TokenUsage(
        inp, out, cache_read, input_audio_tokens=audio_in, output_audio_tokens=audio_out,
        cache_read_audio_tokens=cached_audio,
    )  # fmt: skip
    genai_usage = GenaiUsage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=cache_read, input_audio_tokens=audio_in,
        cache_audio_read_tokens=cached_audio, output_audio_tokens=audio_out,
    )  # fmt: skip
    try:
        reference = info.calc_price(genai_usage, provider_obj, genai_request_timestamp=when)
    except ValueError:
        return  # genai-prices refuses this usage shape for the model
    sheet = sheet_from_genai(info.get_prices(when))
    if sheet is None:
        return
    ours = cost(sheet, usage)
    assert (ours.input_cost, ours.output_cost) == (reference.input_price, reference.output_price)


def test_cached_audio_of_gpt_realtime_is_priced_at_the_cached_audio_rate() -> None:
    _, info = next((p, i) for p, i in _AUDIO_MODELS if i.id == "gpt-realtime")
    sheet = sheet_from_genai(info.get_prices(datetime(2026, 11, 1, tzinfo=UTC)))
    assert sheet is not None and sheet.base.cache_read_audio == Decimal("0.4")
    # 1,000 input: 300 text (100 cached), 700 audio (400 cached); 200 output: 50 text, 150 audio.
    usage = TokenUsage(
        1000, 200, 500, input_audio_tokens=700, output_audio_tokens=150, cache_read_audio_tokens=400
    )
    priced = cost(sheet, usage)
    assert priced.input_cost == (200 * 4 + 300 * 32 + 100 * Decimal("0.4") + 400 * Decimal("0.4")) / 1_000_000
    assert priced.output_cost == (50 * 16 + 150 * 64) / Decimal(1_000_000)


# ---- overrides, files, rules ----------------------------------------------------------------------


def test_overrides_aliases_and_rules() -> None:
    config = PricingConfig(
        models={
            "gpt-4o": ModelPrice(input=Decimal("1"), output=Decimal("1")),
            "ft:gpt-4o-mini": ModelPrice(input=Decimal("3"), output=Decimal("12")),
        },
        aliases={"my-deployment": "gpt-4o", "other": "claude-sonnet-5"},
    )
    book = PriceBook(config)
    assert book.quote("openai", "gpt-4o", TokenUsage(1, 1)).price_source == "config"
    assert book.quote("openai", "gpt-4o-2024-08-06", TokenUsage(1, 1)).price_source == "config:base_model"
    assert book.quote("openai", "my-deployment", TokenUsage(1, 1)).price_source == "config:alias"
    assert (
        book.quote("openai", "x-unknown", TokenUsage(1, 1), request_model="gpt-4o").price_source
        == "config:request_model"
    )
    fine_tune = book.quote("openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123", TokenUsage(1_000_000, 0))
    assert (fine_tune.price_source, fine_tune.priced_as) == ("config:fine_tune", "ft:gpt-4o-mini")
    assert fine_tune.cost is not None and fine_tune.cost.input_cost == 3
    other = book.quote("anthropic", "other", TokenUsage(1, 1))
    assert (other.price_source, other.priced_as) == ("genai-prices:alias", "claude-sonnet-5")


def test_configured_tiers_and_service_tiers() -> None:
    price = ModelPrice(
        input=Decimal(1), output=Decimal(2), cache_read=Decimal("0.1"),
        tiers=[PriceTier(above=200_000, input=Decimal(2), output=Decimal(4))],
        service_tiers={"batch": RateOverride(input=Decimal("0.5"), output=Decimal(1))},
    )  # fmt: skip
    book = PriceBook(PricingConfig(models={"m": price}))
    small = book.quote("openai", "m", TokenUsage(100_000, 1000, 50_000))
    large = book.quote("openai", "m", TokenUsage(300_000, 1000, 50_000))
    batch = book.quote("openai", "m", TokenUsage(100_000, 1000), service_tier="batch")
    assert small.cost and small.cost.input_cost == usd(50_000 * 1 + 50_000 * Decimal("0.1"))
    assert large.cost and large.cost.input_cost == usd(
        250_000 * 2 + 50_000 * Decimal("0.1")
    )  # tier keeps cache_read
    assert large.cost.output_cost == usd(1000 * 4)
    assert batch.cost and (batch.cost.input_cost, batch.cost.output_cost) == (usd(50_000), usd(1000))
    flex = book.quote("openai", "m", TokenUsage(1, 1), service_tier="flex")
    assert "flex" in (flex.note or "")


def test_unknown_models_are_counted_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook(PricingConfig())
    for _ in range(3):
        quote = book.quote("openai", "no-such-model", TokenUsage(1, 1))
        assert (quote.cost, quote.price_source) == (None, "unknown_model")
    assert book.unpriced["no-such-model"] == 3
    assert len([r for r in caplog.records if "no-such-model" in r.message]) == 1


def test_price_version_changes_with_the_price_set() -> None:
    a = PriceBook(PricingConfig()).version
    b = PriceBook(PricingConfig(models={"x": ModelPrice(input=Decimal(1), output=Decimal(1))})).version
    assert a != b and len(a) == 12
    assert a == PriceBook(PricingConfig()).version


def test_lookup_names_fall_back_to_base_models() -> None:
    assert lookup_names("claude-3-5-sonnet@20240620")[-1] == ("claude-3-5-sonnet", "base_model")
    assert lookup_names("models/gemini-1.5-pro-002")[-1] == ("gemini-1.5-pro", "base_model")
    assert lookup_names("ft:gpt-4o-mini-2024-07-18:org::x")[-1] == ("gpt-4o-mini", "fine_tune_base")


# The same call priced through each platform's price data (genai-prices' provider for that route).
CLAUDE_CALL = TokenUsage(12_050, 400, 10_000, 2_000)


def test_bedrock_prices_come_from_aws_data_with_its_regional_premium() -> None:
    # Bedrock's in-region (us./eu. profiles, bare ids) Claude Sonnet 4.5: 10 % over the list price;
    # global. profiles: the list price. $3.3 / $0.33 / $4.125 / $16.5 per 1M regional.
    model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    regional = BOOK.quote("anthropic", model, CLAUDE_CALL, price_provider="aws")
    assert regional.priced_as == "regional.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert regional.cost is not None
    assert regional.cost.input_cost == usd(
        50 * Decimal("3.3") + 10_000 * Decimal("0.33") + 2_000 * Decimal("4.125")
    )
    assert regional.cost.output_cost == usd(400 * Decimal("16.5"))
    worldwide = BOOK.quote("anthropic", "global.anthropic.claude-sonnet-4-5-20250929-v1:0", CLAUDE_CALL,
                           price_provider="aws")  # fmt: skip
    assert worldwide.cost is not None and worldwide.cost.output_cost == usd(400 * 15)


@pytest.mark.parametrize(
    ("provider", "model", "price_provider", "priced_as"),
    [
        ("anthropic", "claude-sonnet-4-5@20250929", "google", "claude-sonnet-4-5"),  # Claude on Vertex
        ("gemini", "gemini-2.5-flash", "google", "gemini-2.5-flash"),
        ("openai", "gpt-4o-2024-08-06", "azure", "gpt-4o"),  # Azure falls back to OpenAI's list
    ],
)
def test_each_platform_prices_with_its_own_provider_data(
    provider: Provider, model: str, price_provider: str, priced_as: str
) -> None:
    quote = BOOK.quote(provider, model, CLAUDE_CALL, price_provider=price_provider)
    assert quote.priced_as == priced_as and quote.price_source.startswith("genai-prices")
    found = get_snapshot().find_provider_model(model, None, price_provider, None)
    expected = found[1].get_prices(datetime.now(UTC), None)
    assert quote.cost is not None
    genai = expected.calc_price(GenaiUsage(input_tokens=12_050, output_tokens=400, cache_read_tokens=10_000,
                                           cache_write_tokens=2_000))  # fmt: skip
    assert quote.cost.total_cost == genai["total_price"]


def test_a_model_the_platform_data_lacks_is_unpriced_not_priced_elsewhere() -> None:
    # gpt-4o is not sold on Bedrock: no price rather than OpenAI's by accident.
    quote = BOOK.quote("openai", "gpt-4o", CLAUDE_CALL, price_provider="aws")
    assert quote.cost is None and quote.price_source == "unknown_model"


@pytest.mark.parametrize(
    ("provider", "model", "items", "expected"),
    [
        # genai-prices' web_searches_kcount: Claude $10, Gemini 2.5 Flash $35 (per grounded prompt),
        # Gemini 3 Pro $14 (per query); storage_searches_kcount: OpenAI $2.50.
        ("anthropic", "claude-sonnet-4-5", {"web_search": 3}, {"web_search": Decimal("0.03")}),
        ("gemini", "gemini-2.5-flash", {"grounded_prompt": 1}, {"grounded_prompt": Decimal("0.035")}),
        ("gemini", "gemini-3-pro-preview", {"web_search_query": 2}, {"web_search_query": Decimal("0.028")}),
        ("openai", "gpt-4o", {"file_search": 4, "web_search": 1}, {"file_search": Decimal("0.01"), "web_search": Decimal("0.01")}),
        ("anthropic", "claude-sonnet-4-5", {"web_fetch": 2}, {"web_fetch": Decimal(0)}),  # the fee table: no charge
    ],
)  # fmt: skip
def test_line_items_are_priced_and_in_the_total(
    provider: Provider, model: str, items: dict[str, int], expected: dict[str, Decimal]
) -> None:
    quote = BOOK.quote(provider, model, TokenUsage(100, 10), line_items=items)
    assert quote.cost is not None
    assert {i.item: i.cost for i in quote.line_items} == expected
    tokens = quote.cost.input_cost + quote.cost.output_cost
    assert quote.cost.total_cost == tokens + sum(expected.values())
    assert all(i.source == "genai-prices" or i.source.startswith("fee_table:") for i in quote.line_items)


def test_an_item_without_a_price_is_null_and_said_never_zero() -> None:
    quote = BOOK.quote(
        "anthropic", "claude-sonnet-4-5", TokenUsage(100, 10), line_items={"code_execution": 2}
    )
    (item,) = quote.line_items
    assert item.cost is None and item.unit_price is None and item.source == "unknown_model"
    assert quote.cost is not None and quote.cost.total_cost == quote.cost.input_cost + quote.cost.output_cost
    assert quote.note == "no price for code_execution (2 use): not in the cost"
    unknown_model = BOOK.quote("anthropic", "no-such-model", TokenUsage(1, 1), line_items={"web_search": 1})
    assert unknown_model.cost is None and [i.quantity for i in unknown_model.line_items] == [1]


def test_a_configured_fee_wins_and_changes_the_price_version() -> None:
    book = PriceBook(PricingConfig(fees={"web_search": Decimal("0.012"), "code_execution": Decimal("0.05")}))
    quote = book.quote("anthropic", "claude-sonnet-4-5", TokenUsage(100, 10),
                       line_items={"web_search": 2, "code_execution": 1})  # fmt: skip
    assert {i.item: (i.cost, i.source) for i in quote.line_items} == {
        "web_search": (Decimal("0.024"), "config"), "code_execution": (Decimal("0.05"), "config")}  # fmt: skip
    assert book.version != BOOK.version


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(range(len(_MODELS))),
    st.integers(0, 400_000),
    st.integers(0, 50_000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.sampled_from([None, "batch", "priority"]),
)
def test_image_tokens_price_as_genai_prices_does(
    index: int, inp: int, out: int, read: float, image_in: float, image_out: float, tier: str | None
) -> None:
    """Image tokens (parts of input and output, disjoint from cache reads) at the image rates, exactly
    as genai-prices prices them, for every model of the three providers (gpt-image-*, Gemini image
    models have image rates; the others price them as text)."""
    when = datetime(2026, 11, 1, tzinfo=UTC)
    provider_obj, info = _MODELS[index]
    cache_read = int(inp * read * 0.5)
    images_in = int((inp - cache_read) * image_in)
    images_out = int(out * image_out)
    usage = TokenUsage(inp, out, cache_read, input_image_tokens=images_in, output_image_tokens=images_out)
    sheet = sheet_from_genai(info.get_prices(when, tier_context(tier)))
    genai_usage = GenaiUsage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=cache_read, input_image_tokens=images_in,
        output_image_tokens=images_out, cache_image_read_tokens=0,
    )  # fmt: skip
    try:
        reference = info.calc_price(
            genai_usage, provider_obj, genai_request_timestamp=when, price_context=tier_context(tier)
        )
    except ValueError:
        return
    if sheet is None:
        return
    ours = cost(sheet, usage)
    assert (ours.input_cost, ours.output_cost) == (reference.input_price, reference.output_price)


def test_image_rates_are_configurable_and_fall_back_to_token_rates() -> None:
    with_images = ModelPrice(
        input=Decimal(5), output=Decimal(10), input_image=Decimal(8), output_image=Decimal(32),
        service_tiers={"batch": RateOverride(input_image=Decimal(4), output_image=Decimal(16))},
    )  # fmt: skip
    book = PriceBook(
        PricingConfig(models={"img": with_images, "plain": ModelPrice(input=Decimal(1), output=Decimal(2))})
    )
    usage = TokenUsage(1000, 2000, input_image_tokens=600, output_image_tokens=1500)
    quote = book.quote("openai", "img", usage)
    assert quote.cost and quote.price_source == "config"
    assert (quote.cost.input_cost, quote.cost.output_cost) == (
        usd(400 * 5 + 600 * 8),
        usd(500 * 10 + 1500 * 32),
    )
    batch = book.quote("openai", "img", usage, service_tier="batch")
    assert batch.cost and batch.cost.output_cost == usd(500 * 10 + 1500 * 16)
    plain = book.quote("openai", "plain", usage)  # no image rates: image tokens at the token rates
    assert plain.cost and (plain.cost.input_cost, plain.cost.output_cost) == (usd(1000), usd(4000))

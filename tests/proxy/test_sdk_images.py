"""Image tokens through the proxy with the official SDKs: OpenAI's Images API (generations and edits,
streamed and not), image input in Chat Completions and Responses, and Gemini image models' image
output (and image input). Each record's image tokens are exact, and each cost is what genai-prices
itself computes for the same usage."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import openai
import pytest
from genai_prices import Usage, calc_price
from google import genai
from google.genai import types as gtypes

from llmtally.config import AzureOpenAIConfig, Config
from llmtally.testing import FakeUpstream
from llmtally.testing.fake_azure import DEPLOYMENTS
from llmtally.testing.fake_upstream import FAKE_PNG_B64
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import money, only_record

PNG = __import__("base64").b64decode(FAKE_PNG_B64)
#: The fake's Images API usage (llmtally.testing.fake_images): 20 text tokens in, 388 per input image,
#: 1056 image tokens out (and 24 text tokens out for models after gpt-image-1).
TEXT_IN, IMAGE_IN, IMAGE_OUT, TEXT_OUT = 20, 388, 1056, 24


def genai_cost(provider: str, model: str, **usage: int) -> tuple[Decimal, Decimal]:
    """genai-prices' own (input, output) price for ``usage``."""
    price = calc_price(Usage(**usage), model, provider_id=provider)
    return price.input_price, price.output_price


def assert_cost(record: dict[str, Any], provider: str, model: str, **usage: int) -> None:
    want_in, want_out = genai_cost(provider, model, **usage)
    assert (money(record["input_cost"]), money(record["output_cost"])) == (want_in, want_out)
    assert money(record["total_cost"]) == want_in + want_out
    assert record["price_source"] == "genai-prices"


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)


@pytest.mark.parametrize(
    ("model", "text_out"),
    [("gpt-image-1", 0), ("gpt-image-1.5", TEXT_OUT)],  # gpt-image-1: all output is image tokens
)
async def test_image_generation(
    proxy: RunningProxy, upstream: FakeUpstream, model: str, text_out: int
) -> None:
    client = openai_client(proxy)
    answer = await client.images.generate(model=model, prompt="a lighthouse at dusk", size="1024x1024")
    assert answer.usage is not None and answer.usage.input_tokens == TEXT_IN
    record = await only_record(proxy)
    assert record["endpoint"] == "images.generations" and record["model"] == model
    assert record["stream"] is False and record["usage_source"] == "provider"
    assert (record["input_tokens"], record["input_image_tokens"]) == (TEXT_IN, 0)
    assert (record["output_tokens"], record["output_image_tokens"]) == (IMAGE_OUT + text_out, IMAGE_OUT)
    assert_cost(
        record, "openai", model, input_tokens=TEXT_IN, output_tokens=IMAGE_OUT + text_out,
        output_image_tokens=IMAGE_OUT,
    )  # fmt: skip
    if model == "gpt-image-1":  # $5 text in, $40 out per 1M: the image output rate
        assert money(record["total_cost"]) == Decimal("0.0001") + Decimal("0.04224")


async def test_image_generation_streamed(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    client = openai_client(proxy)
    stream = await client.images.generate(
        model="gpt-image-1.5", prompt="a lighthouse", stream=True, partial_images=2
    )
    kinds = [event.type async for event in stream]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    record = await only_record(proxy)
    assert record["endpoint"] == "images.generations" and record["stream"] is True
    # The completed event's usage has no output details: its output tokens are the image's.
    assert (record["output_tokens"], record["output_image_tokens"]) == (IMAGE_OUT, IMAGE_OUT)
    assert record["error"] is None
    assert_cost(
        record, "openai", "gpt-image-1.5", input_tokens=TEXT_IN, output_tokens=IMAGE_OUT,
        output_image_tokens=IMAGE_OUT,
    )  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_image_edit(proxy: RunningProxy, upstream: FakeUpstream, stream: bool) -> None:
    client = openai_client(proxy)
    images = [("a.png", io.BytesIO(PNG), "image/png"), ("b.png", io.BytesIO(PNG), "image/png")]
    if stream:
        events = await client.images.edit(model="gpt-image-1", image=images, prompt="add a moon", stream=True)
        assert [e.type async for e in events] == ["image_edit.completed"]
    else:
        await client.images.edit(model="gpt-image-1", image=images, prompt="add a moon")
    assert upstream.seen.headers["Content-Type"].startswith("multipart/form-data")
    record = await only_record(proxy)
    assert (record["endpoint"], record["model"], record["stream"]) == ("images.edits", "gpt-image-1", stream)
    image_in = 2 * IMAGE_IN
    assert (record["input_tokens"], record["input_image_tokens"]) == (TEXT_IN + image_in, image_in)
    assert (record["output_tokens"], record["output_image_tokens"]) == (IMAGE_OUT, IMAGE_OUT)
    assert_cost(
        record, "openai", "gpt-image-1", input_tokens=TEXT_IN + image_in, input_image_tokens=image_in,
        output_tokens=IMAGE_OUT, output_image_tokens=IMAGE_OUT,
    )  # fmt: skip
    # gpt-image-1: $5 text and $10 image input, $40 output per 1M.
    assert money(record["input_cost"]) == (TEXT_IN * 5 + image_in * 10) / Decimal(1_000_000)


async def test_dall_e_without_usage_is_not_priced_at_zero(proxy: RunningProxy) -> None:
    await openai_client(proxy).images.generate(model="dall-e-3", prompt="a lighthouse")
    record = await only_record(proxy)
    assert record["endpoint"] == "images.generations"
    assert record["total_cost"] is None  # priced per image, which no price data here lists


IMAGE_PART: Any = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + FAKE_PNG_B64}}


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_image_input(proxy: RunningProxy, stream: bool) -> None:
    client = openai_client(proxy)
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, IMAGE_PART]}]
    if stream:
        async for _ in await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True):
            pass
    else:
        await client.chat.completions.create(model="gpt-4o", messages=messages)
    record = await only_record(proxy)
    assert (record["input_tokens"], record["cache_read_tokens"], record["input_image_tokens"]) == (
        1200,
        1024,
        85,
    )
    assert record["output_image_tokens"] == 0
    # gpt-4o lists no image rate: image tokens are input tokens at the input rate.
    assert_cost(
        record, "openai", "gpt-4o", input_tokens=1200, cache_read_tokens=1024, input_image_tokens=85,
        output_tokens=300,
    )  # fmt: skip


async def test_responses_image_input(proxy: RunningProxy) -> None:
    client = openai_client(proxy)
    content: Any = [{"type": "input_text", "text": "What is it?"}, {"type": "input_image", "image_url": "x"}]
    await client.responses.create(model="gpt-image-1.5", input=[{"role": "user", "content": content}])
    record = await only_record(proxy)
    assert (record["input_tokens"], record["input_image_tokens"]) == (1200, 85)
    # gpt-image-1.5: $5 text, $1.25 cached, $8 image input per 1M. OpenAI does not say how many cached
    # tokens are image tokens: none are (genai-prices wants that said, as cache_image_read_tokens).
    assert_cost(
        record, "openai", "gpt-image-1.5", input_tokens=1200, cache_read_tokens=1024, input_image_tokens=85,
        cache_image_read_tokens=0, output_tokens=300,
    )  # fmt: skip
    assert money(record["input_cost"]) == (91 * 5 + Decimal("1024") * Decimal("1.25") + 85 * 8) / 1_000_000


def gemini_client(proxy: RunningProxy) -> genai.Client:
    return genai.Client(api_key=API_KEY, http_options=gtypes.HttpOptions(base_url=f"{proxy.url}/gemini"))


@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_image_output(proxy: RunningProxy, stream: bool) -> None:
    client = gemini_client(proxy).aio
    config = gtypes.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"])
    contents: Any = [
        gtypes.Part.from_text(text="Make it night"),
        gtypes.Part.from_bytes(data=PNG, mime_type="image/png"),
    ]
    model = "gemini-2.5-flash-image"
    if stream:
        parts = [
            part
            async for chunk in await client.models.generate_content_stream(
                model=model, contents=contents, config=config
            )
            for part in (
                chunk.candidates[0].content.parts
                if chunk.candidates and chunk.candidates[0].content
                else None
            )
            or ()
        ]
    else:
        answer = await client.models.generate_content(model=model, contents=contents, config=config)
        assert answer.candidates and answer.candidates[0].content
        parts = answer.candidates[0].content.parts or []
    assert any(p.inline_data is not None for p in parts)
    record = await only_record(proxy)
    # The fake: 3000 prompt tokens (2048 cached, 258 the image's), 250 text + 1290 image + 500 thinking out.
    assert (record["input_tokens"], record["input_image_tokens"]) == (3000, 258)
    assert (record["output_tokens"], record["output_image_tokens"]) == (250 + 1290 + 500, 1290)
    assert_cost(
        record, "google", model, input_tokens=3000, cache_read_tokens=2048, input_image_tokens=258,
        output_tokens=2040, output_image_tokens=1290,
    )  # fmt: skip
    # gemini-2.5-flash-image: $30 per 1M image output tokens, $2.50 text and thinking.
    assert money(record["output_cost"]) == (1290 * 30 + 750 * Decimal("2.5")) / 1_000_000


async def test_azure_image_deployment(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    """A gpt-image-1 deployment on Azure OpenAI: metered as OpenAI's Images API, priced as its model."""
    proxy = await make_proxy(Config(azure_openai=AzureOpenAIConfig(deployments=dict(DEPLOYMENTS))))
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=f"{proxy.url}/azure-openai",
        api_key=API_KEY,
        api_version="2025-04-01-preview",
        max_retries=0,
    )
    await client.images.generate(model="prod-image", prompt="a lighthouse")
    assert upstream.seen.path_qs.startswith("/openai/deployments/prod-image/images/generations?")
    record = await only_record(proxy)
    assert (record["platform"], record["endpoint"], record["model"]) == (
        "azure",
        "images.generations",
        "gpt-image-1",
    )
    assert (record["output_tokens"], record["output_image_tokens"]) == (IMAGE_OUT, IMAGE_OUT)
    assert money(record["total_cost"]) == Decimal("0.0001") + Decimal("0.04224")

"""Azure OpenAI through the proxy with the official openai SDK (``AzureOpenAI`` and the v1 URLs)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import openai
import pytest

from llmtally.config import AzureOpenAIConfig, Config
from llmtally.testing import FakeUpstream
from llmtally.testing.fake_azure import DEPLOYMENTS
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import assert_usage, money, only_record
from tests.proxy.test_sdk_openai import GPT4O

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
CURRENT = "2024-10-21"  # GA, streams report usage when asked
EARLY = "2024-06-01"  # GA before stream_options: the upstream refuses the option
#: What a call to the prod-chat deployment records: gpt-4o's usage and cost, under the mapped model.
#: Azure's price data falls back to OpenAI's list prices (Global deployments bill those).
PROD_CHAT = {**GPT4O, "request_model": "gpt-4o-2024-08-06", "platform": "azure"}


@pytest.fixture
async def azure_proxy(make_proxy: MakeProxy) -> RunningProxy:
    return await make_proxy(Config(azure_openai=AzureOpenAIConfig(deployments=dict(DEPLOYMENTS))))


def classic(base: str, api_version: str = CURRENT) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=base, api_key=API_KEY, api_version=api_version, max_retries=0
    )


async def streamed(client: openai.AsyncAzureOpenAI) -> list[Any]:
    """Every chunk of a streamed call to the prod-chat deployment."""
    stream = await client.chat.completions.create(model="prod-chat", messages=MESSAGES, stream=True)
    return [chunk async for chunk in stream]


async def test_classic_deployment_url(azure_proxy: RunningProxy, upstream: FakeUpstream) -> None:
    via = classic(f"{azure_proxy.url}/azure-openai")
    raw = await via.chat.completions.with_raw_response.create(model="prod-chat", messages=MESSAGES)
    direct = await classic(upstream.url).chat.completions.with_raw_response.create(
        model="prod-chat", messages=MESSAGES
    )
    assert raw.http_response.content == direct.http_response.content
    assert upstream.seen.path_qs == f"/openai/deployments/prod-chat/chat/completions?api-version={CURRENT}"
    assert upstream.seen.headers["api-key"] == API_KEY
    record = await only_record(azure_proxy)
    assert_usage(
        record,
        provider="openai",
        endpoint="chat.completions",
        stream=False,
        **PROD_CHAT,
    )


async def test_classic_stream_gets_usage_injected_and_hidden(
    azure_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via = classic(f"{azure_proxy.url}/azure-openai")
    seen_via = await streamed(via)
    seen_direct = await streamed(classic(upstream.url))
    # Azure's extras reach the client as Azure sent them; the usage llmtally asked for does not.
    assert [c.model_dump() for c in seen_via] == [c.model_dump() for c in seen_direct]
    assert (
        seen_via[0].choices == []
        and seen_via[0].model_extra
        and "prompt_filter_results" in seen_via[0].model_extra
    )
    assert all(c.usage is None for c in seen_via)
    record = await only_record(azure_proxy)
    assert_usage(
        record,
        provider="openai",
        endpoint="chat.completions",
        stream=True,
        **PROD_CHAT,
    )


async def test_an_api_version_without_stream_usage_is_estimated_not_broken(
    azure_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via = classic(f"{azure_proxy.url}/azure-openai", EARLY)
    chunks = await streamed(via)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta)
    assert text == "Hello from Azure!"
    assert b"stream_options" not in upstream.seen.body  # injected, this api-version would answer 400
    record = await only_record(azure_proxy)
    assert record["status"] == 200 and record["usage_source"] == "estimated"
    assert record["output_tokens"] > 0 and record["model"] == "gpt-4o-2024-08-06"


async def test_v1_url_with_a_bearer_and_the_deployment_as_model(
    azure_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via = openai.AsyncOpenAI(
        api_key=API_KEY, base_url=f"{azure_proxy.url}/azure-openai/openai/v1/", max_retries=0
    )
    reply = await via.chat.completions.create(model="mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from Azure!"
    assert upstream.seen.path_qs == "/openai/v1/chat/completions"
    assert upstream.seen.headers["Authorization"] == f"Bearer {API_KEY}"
    record = await only_record(azure_proxy)
    assert record["model"] == "gpt-4o-mini-2024-07-18" and record["request_model"] == "gpt-4o-mini-2024-07-18"
    assert record["usage_source"] == "provider" and record["total_cost"] is not None


async def test_azure_route_is_off_unless_configured(upstream: FakeUpstream) -> None:
    config = config_for_upstream(upstream.url)
    config = dataclasses.replace(config, upstreams=dataclasses.replace(config.upstreams, azure_openai=""))
    proxy = await start_proxy(config)
    try:
        with pytest.raises(openai.NotFoundError):
            await classic(f"{proxy.url}/azure-openai").chat.completions.create(
                model="prod-chat", messages=MESSAGES
            )
        assert upstream.requests == 0 and await proxy.flush() == []
    finally:
        await proxy.stop()


async def test_passthrough_calls_reach_the_resource(
    azure_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via = classic(f"{azure_proxy.url}/azure-openai")
    with pytest.raises(openai.NotFoundError):
        await via.chat.completions.create(model="no-such-deployment", messages=MESSAGES)
    record = await only_record(azure_proxy)
    assert record["status"] == 404


async def test_a_data_zone_deployment_is_priced_at_global_rates_and_says_so(make_proxy: MakeProxy) -> None:
    deployments = AzureOpenAIConfig(
        deployments=dict(DEPLOYMENTS), deployment_types={"prod-chat": "data_zone"}
    )
    proxy = await make_proxy(Config(azure_openai=deployments))
    note = "Azure data_zone deployment: the price data has Global rates only, used here"
    await classic(f"{proxy.url}/azure-openai").chat.completions.create(model="prod-chat", messages=MESSAGES)
    record = await only_record(proxy)
    assert record["pricing_note"] == note and money(record["total_cost"]) == Decimal(PROD_CHAT["total_cost"])
    v1 = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/azure-openai/openai/v1/", max_retries=0)
    await v1.chat.completions.create(model="prod-chat", messages=MESSAGES)
    assert (await only_record(proxy))["pricing_note"] == note
    await v1.chat.completions.create(model="mini", messages=MESSAGES)  # a Global deployment: no note
    assert (await only_record(proxy))["pricing_note"] is None

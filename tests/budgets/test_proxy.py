"""Spend limits through the proxy, with the official SDKs as clients: refusals each SDK raises as its
own rate-limit error, settlement at the actual cost (streams included), the admin API, store outages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import boto3
import openai
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from llmtally.config import BedrockConfig, BudgetRule, BudgetsConfig, Config, ServerConfig
from llmtally.testing import FakeUpstream
from llmtally.testing.fake_bedrock import ACCESS_KEY, REGION, SECRET_KEY
from llmtally.testing.harness import RunningProxy
from llmtally.testing.redis_server import RedisServer
from tests.conftest import API_KEY, MakeProxy

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
TENANT = {"x-llmtally-tag-tenant": "acme"}


def budgets_config(
    limit: str, *, action: str = "block", store: str = "memory", fast_path: bool = True, **extra: Any
) -> Config:
    rule = BudgetRule("per-tenant", {"tag": "tenant"}, Decimal(limit), "month", action)  # type: ignore[arg-type]
    return Config(
        server=ServerConfig(fast_path=fast_path),
        budgets=BudgetsConfig(store=store, rules=[rule], **extra),
    )


async def settled(proxy: RunningProxy, calls: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """The /budgets report once ``calls`` records have been settled with the store."""
    budgets = proxy.meter.budgets
    assert budgets is not None
    await proxy.flush()
    for _ in range(int(timeout_s / 0.02)):
        if budgets.stats.settled >= calls:
            break
        await asyncio.sleep(0.02)
    assert budgets.stats.settled == calls, budgets.stats
    return await budgets.report()


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0, default_headers=TENANT
    )


@pytest.fixture(params=[True, False], ids=["fast", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_openai_calls_settle_then_a_call_past_the_limit_gets_rate_limit_error(
    make_proxy: MakeProxy, fast_path: bool
) -> None:
    # A call reserves ~20 input tokens at $2.50/M + max_tokens 1000 at $10/M ≈ $0.01005 and costs
    # $0.00472 (the fake's usage). $0.012: the first fits, the second does not once the first is spent.
    proxy = await make_proxy(budgets_config("0.012", fast_path=fast_path))
    client = openai_client(proxy)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=1000
    )
    first_id = raw.headers["x-llmtally-request-id"]
    report = await settled(proxy, 1)
    (budget,) = report["budgets"]
    assert (budget["rule"], budget["key"], budget["spent_usd"], budget["reserved_usd"]) == (
        "per-tenant", "tenant=acme", "0.00472", "0",
    )  # fmt: skip
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
    error = refused.value
    assert "spend limit 'per-tenant' (tenant=acme) reached: $0.012 per month" in error.message
    assert int(error.response.headers["retry-after"]) > 0
    second_id = error.response.headers["x-llmtally-request-id"]
    records = await proxy.flush()
    by_id = {r["request_id"]: r for r in records}
    assert by_id[first_id]["total_cost"] == Decimal("0.00472") and by_id[first_id]["budget_exceeded"] is None
    refused_record = by_id[second_id]
    assert (refused_record["status"], refused_record["error"], refused_record["total_cost"]) == (
        429, "budget_exceeded", Decimal(0),
    )  # fmt: skip
    assert refused_record["budget_exceeded"] == "per-tenant"
    assert (await proxy.meter.budgets.report())["refused_calls"] == {"per-tenant": 1}  # type: ignore[union-attr]


async def test_every_sdk_raises_its_own_rate_limit_error_with_the_rule_named(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = budgets_config("0.000001", fast_path=fast_path)  # no call fits
    upstreams = dataclasses.replace(
        config.upstreams, bedrock="https://bedrock-runtime.us-east-1.amazonaws.com"
    )
    config = dataclasses.replace(config, upstreams=upstreams, bedrock=BedrockConfig(region=REGION))
    proxy = await make_proxy(config)
    expected = "spend limit 'per-tenant' (tenant=acme) reached"

    with pytest.raises(openai.RateLimitError) as oai:
        await openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert expected in oai.value.message

    claude = anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0, default_headers=TENANT
    )
    with pytest.raises(anthropic.RateLimitError) as ant:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES)
    assert expected in ant.value.message and ant.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]

    gemini = genai.Client(
        api_key=API_KEY,
        http_options=types.HttpOptions(base_url=f"{proxy.url}/gemini", headers=TENANT),
    )
    with pytest.raises(genai_errors.ClientError) as gem:
        await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (
        gem.value.code == 429
        and gem.value.status == "RESOURCE_EXHAUSTED"
        and expected in str(gem.value.message)
    )

    runtime = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    ).client(
        "bedrock-runtime",
        endpoint_url=f"{proxy.url}/bedrock",
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )

    def tag(request: Any, **_: Any) -> None:
        request.headers["x-llmtally-tag-tenant"] = "acme"

    runtime.meta.events.register("before-sign.bedrock-runtime.*", tag)

    def converse() -> None:
        runtime.converse(
            modelId="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )

    with pytest.raises(ClientError) as aws:
        await asyncio.to_thread(converse)
    assert aws.value.response["Error"]["Code"] == "ThrottlingException"
    assert expected in aws.value.response["Error"]["Message"]

    records = await proxy.flush()
    assert [(r["provider"], r["status"], r["error"], r["total_cost"]) for r in records] == [
        ("openai", 429, "budget_exceeded", 0), ("anthropic", 429, "budget_exceeded", 0),
        ("gemini", 429, "budget_exceeded", 0), ("converse", 429, "budget_exceeded", 0),
    ]  # fmt: skip


async def test_streams_and_warn_rules_settle_at_their_actual_cost(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(budgets_config("0.012", action="warn"))
    client = openai_client(proxy)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=1000, stream=True
    )
    async for _ in stream:
        pass
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)  # over: warned
    report = await settled(proxy, 2)
    records = proxy.records
    assert [r["stream"] for r in records] == [True, False]
    assert all(r["total_cost"] == Decimal("0.00472") for r in records)  # a stream is never $0
    assert [r["budget_exceeded"] for r in records] == [None, "per-tenant"]
    assert report["budgets"][0]["spent_usd"] == "0.00944" and report["warned_calls"] == {"per-tenant": 1}


async def test_a_client_that_leaves_mid_stream_is_settled_at_its_estimate(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.config.chunk_interval_s = 0.05
    upstream.config.chunks = 20
    proxy = await make_proxy(budgets_config("10"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/openai/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 100},
            headers={"Authorization": f"Bearer {API_KEY}", **TENANT},
        ) as response,
    ):
        await response.content.readany()  # then leave
    for _ in range(100):
        if proxy.records:
            break
        await asyncio.sleep(0.05)
    report = await settled(proxy, 1)
    (record,) = proxy.records
    assert record["client_disconnected"] and record["total_cost"] > 0
    assert Decimal(report["budgets"][0]["spent_usd"]) >= record["total_cost"]
    assert report["budgets"][0]["reserved_usd"] == "0"


async def test_calls_without_the_tag_do_not_count_and_other_tenants_have_their_own(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(budgets_config("1"))
    untagged = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)
    other = openai.AsyncOpenAI(
        api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0,
        default_headers={"x-llmtally-tag-tenant": "globex"},
    )  # fmt: skip
    await untagged.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    report = await settled(proxy, 2)
    assert [(b["key"], b["spent_usd"]) for b in report["budgets"]] == [
        ("tenant=acme", "0.00472"), ("tenant=globex", "0.00472"),
    ]  # fmt: skip


async def test_the_admin_api_serves_budgets_and_each_call_by_its_request_id(make_proxy: MakeProxy) -> None:
    from aiohttp import web

    from llmtally.proxy.app import admin_app_of

    proxy = await make_proxy(budgets_config("1"))
    raw = await openai_client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES
    )
    request_id = raw.headers["x-llmtally-request-id"]
    await settled(proxy, 1)
    runner = web.AppRunner(admin_app_of(proxy.app))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/calls/{request_id}") as got:
                call = json.loads(await got.read())
            async with session.get(f"http://127.0.0.1:{port}/calls/0000") as missing:
                assert missing.status == 404
            async with session.get(f"http://127.0.0.1:{port}/budgets") as got:
                budgets = await got.json()
            metrics = ""
            for _ in range(50):  # the first scrape starts a read of the store; a later one shows it
                async with session.get(f"{proxy.url}/metrics") as got:
                    metrics = await got.text()
                if "llmtally_budget_spent_usd{" in metrics:
                    break
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert call["request_id"] == request_id and str(call["total_cost"]) == "0.00472"
    assert budgets["budgets"][0] | {"period_end": None} == {
        "rule": "per-tenant", "key": "tenant=acme", "period_end": None, "limit_usd": "1",
        "spent_usd": "0.00472", "reserved_usd": "0", "remaining_usd": "0.99528",
        "spent_nano_usd": 4720000, "reserved_nano_usd": 0,
    }  # fmt: skip
    assert budgets["budgets"][0]["period_end"].endswith("T00:00:00Z")
    assert 'llmtally_budget_spent_usd{key="tenant=acme",rule="per-tenant"} 0.00472' in metrics
    assert 'llmtally_budget_limit_usd{key="tenant=acme",rule="per-tenant"} 1.0' in metrics
    assert "llmtally_budget_unchecked_total 0.0" in metrics


async def test_redis_down_allow_forwards_and_settles_everything_when_it_is_back(
    make_proxy: MakeProxy, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(budgets_config("1", store=redis_server.url, store_timeout_s=0.2))
    client = openai_client(proxy)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await settled(proxy, 1)
    redis_server.kill()
    for _ in range(3):  # forwarded unchecked
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await proxy.flush()
    budgets = proxy.meter.budgets
    assert budgets is not None and budgets.stats.unchecked == 3 and not budgets.store_ok
    redis_server.start()
    report = await settled(proxy, 4, timeout_s=10)
    assert report["budgets"][0]["spent_usd"] == "0.01888"  # 4 × 0.00472: none lost, none twice
    assert report["budgets"][0]["reserved_usd"] == "0" and report["unchecked_calls"] == 3


async def test_redis_down_block_answers_503_in_the_providers_shape(
    make_proxy: MakeProxy, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(
        budgets_config("1", store=redis_server.url, store_timeout_s=0.2, on_store_error="block")
    )
    redis_server.kill()
    claude = anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0, default_headers=TENANT
    )
    with pytest.raises(anthropic.InternalServerError) as refused:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES)
    assert refused.value.status_code == 503 and "cannot check spend limits" in refused.value.message
    (record,) = await proxy.flush()
    assert (record["status"], record["error"]) == (503, "budget_store_unavailable")

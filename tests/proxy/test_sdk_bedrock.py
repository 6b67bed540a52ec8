"""Amazon Bedrock through the proxy with the official clients: boto3's ``bedrock-runtime`` and
``anthropic.AnthropicBedrock``, against a fake Bedrock that checks SigV4 for the Host and path it gets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import anthropic
import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from llmtally.config import BedrockConfig, Config, ServerConfig, UpstreamsConfig
from llmtally.testing import FakeUpstream
from llmtally.testing.fake_bedrock import ACCESS_KEY, API_KEY, REGION, SECRET_KEY
from llmtally.testing.harness import RunningProxy
from tests.conftest import MakeProxy
from tests.proxy.helpers import assert_usage, only_record

US_SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
GLOBAL_SONNET = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hi"}],
}
# Fake usage: 50 uncached input, cache write 1500 (5m) + 500 (1h), cache read 10000, output 400.
# Bedrock's in-region (us.) Claude Sonnet 4.5, from genai-prices' aws data: $3.30 input, $0.33 cache
# read, $4.125 5-minute write, $6.60 1-hour write, $16.50 output per 1M (10 % over the list price).
US_USAGE = {
    "provider": "anthropic",
    "platform": "bedrock",
    "endpoint": "messages",
    "input_tokens": 12050,
    "output_tokens": 400,
    "cache_read_tokens": 10000,
    "cache_write_tokens": 2000,
    "cache_write_1h_tokens": 500,
    "usage_source": "provider",
    "model": "claude-sonnet-4-5-20250929",
    "request_model": US_SONNET,
    "priced_model": "regional.anthropic.claude-sonnet-4-5-20250929-v1:0",
    "price_source": "genai-prices",
    "input_cost": "0.0129525",  # 50*3.3 + 10000*0.33 + 1500*4.125 + 500*6.6 = 12952.5 µ$
    "output_cost": "0.0066",  # 400*16.5
    "total_cost": "0.0195525",
}


@pytest.fixture(params=[True, False], ids=["fast", "aiohttp"])
async def bedrock_proxy(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> RunningProxy:
    """The proxy re-signing with the default credential chain, which finds the fake's identity in
    the environment (as a pod finds its IRSA role); on both front ends."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return await make_proxy(_config("resign", fast_path=request.param))


def _config(signing: str, fast_path: bool = True) -> Config:
    upstreams = dataclasses.replace(
        Config().upstreams, bedrock="https://bedrock-runtime.us-east-1.amazonaws.com"
    )
    return Config(
        server=ServerConfig(fast_path=fast_path),
        upstreams=upstreams,
        bedrock=BedrockConfig(signing=signing, region=REGION),  # type: ignore[arg-type]
    )


def runtime(base: str) -> Any:
    """boto3's bedrock-runtime client, signing for ``base`` (the proxy's /bedrock, or the fake)."""
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    ).client("bedrock-runtime", endpoint_url=base, config=BotoConfig(retries={"max_attempts": 1}))


def _invoke(client: Any, model: str) -> dict[str, Any]:
    answer = client.invoke_model(modelId=model, body=json.dumps(BODY), contentType="application/json")
    return {"body": json.loads(answer["body"].read()), "headers": answer["ResponseMetadata"]["HTTPHeaders"]}


def _invoke_stream(client: Any, model: str) -> list[dict[str, Any]]:
    answer = client.invoke_model_with_response_stream(modelId=model, body=json.dumps(BODY))
    return [json.loads(event["chunk"]["bytes"]) for event in answer["body"]]


async def test_boto3_invoke_model_is_re_signed_and_metered(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via = await asyncio.to_thread(_invoke, runtime(f"{bedrock_proxy.url}/bedrock"), US_SONNET)
    direct = await asyncio.to_thread(_invoke, runtime(upstream.url), US_SONNET)
    assert via["body"] == direct["body"] and via["body"]["content"][0]["type"] == "text"
    assert via["headers"]["x-amzn-bedrock-input-token-count"] == "50"
    # boto3 sends the model id's ":" as %3A: the path that goes upstream is the one that was signed.
    assert upstream.seen.path_qs == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    record = await only_record(bedrock_proxy)
    assert_usage(record, stream=False, status=200, **US_USAGE)


async def test_boto3_response_stream_reaches_the_client_as_frames_and_is_metered(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via = await asyncio.to_thread(_invoke_stream, runtime(f"{bedrock_proxy.url}/bedrock"), US_SONNET)
    direct = await asyncio.to_thread(_invoke_stream, runtime(upstream.url), US_SONNET)
    assert via == direct  # botocore decoded every frame the proxy passed on, CRCs included
    assert via[0]["type"] == "message_start" and via[-1]["type"] == "message_stop"
    assert "amazon-bedrock-invocationMetrics" in via[-1]
    assert upstream.seen.path_qs.endswith("/invoke-with-response-stream")
    record = await only_record(bedrock_proxy)
    assert_usage(record, stream=True, status=200, **US_USAGE)


async def test_a_global_profile_is_priced_at_the_list_price(bedrock_proxy: RunningProxy) -> None:
    await asyncio.to_thread(_invoke, runtime(f"{bedrock_proxy.url}/bedrock"), GLOBAL_SONNET)
    record = await only_record(bedrock_proxy)
    # $3 / $0.30 / $3.75 / $6 / $15 per 1M: 150 + 3000 + 5625 + 3000 = 11775 µ$ in, 6000 µ$ out.
    assert_usage(record, request_model=GLOBAL_SONNET, input_cost="0.011775", output_cost="0.006")


async def test_an_inference_profile_arn_is_forwarded_as_sent_and_priced_by_its_profile(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    arn = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{US_SONNET}"
    await asyncio.to_thread(_invoke, runtime(f"{bedrock_proxy.url}/bedrock"), arn)
    assert upstream.seen.path_qs == (
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
        "us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    )
    record = await only_record(bedrock_proxy)
    assert_usage(record, request_model=US_SONNET, total_cost=US_USAGE["total_cost"])


async def test_anthropic_bedrock_client_messages_and_stream(bedrock_proxy: RunningProxy) -> None:
    client = anthropic.AsyncAnthropicBedrock(
        aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, aws_region=REGION,
        base_url=f"{bedrock_proxy.url}/bedrock", max_retries=0,
    )  # fmt: skip
    message = await client.messages.create(model=US_SONNET, max_tokens=50, messages=BODY["messages"])
    assert message.content[0].type == "text"
    assert_usage(await only_record(bedrock_proxy), stream=False, **US_USAGE)
    async with client.messages.stream(model=US_SONNET, max_tokens=50, messages=BODY["messages"]) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text
    assert_usage(await only_record(bedrock_proxy), stream=True, **US_USAGE)


async def test_the_fake_refuses_a_signature_made_for_the_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # What re-signing is for: passed through, boto3's signature (for the proxy's host and /bedrock
    # path) is refused upstream, as AWS refuses it.
    proxy = await make_proxy(_config("passthrough"))
    with pytest.raises(ClientError) as refused:
        await asyncio.to_thread(_invoke, runtime(f"{proxy.url}/bedrock"), US_SONNET)
    assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"
    record = await only_record(proxy)
    assert record["status"] == 403 and record["usage_source"] == "none" and record["total_cost"] is None


async def test_passthrough_forwards_a_bedrock_api_key_untouched(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(_config("passthrough"))
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/bedrock/model/{US_SONNET}/invoke",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            data=json.dumps(BODY),
        ) as response,
    ):
        assert response.status == 200
        await response.read()
    assert upstream.seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert_usage(await only_record(proxy), stream=False, **US_USAGE)


async def test_an_operation_llmtally_does_not_meter_is_re_signed_and_forwarded(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # CountTokens is not metered: forwarded, re-signed like every Bedrock call. The fake checks the
    # signature, then answers that it has no CountTokens: not InvalidSignatureException.
    client = runtime(f"{bedrock_proxy.url}/bedrock")
    with pytest.raises(ClientError) as answered:
        await asyncio.to_thread(
            client.count_tokens,
            modelId="anthropic.claude-sonnet-4-5-20250929-v1:0",
            input={"converse": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}},
        )
    assert answered.value.response["Error"]["Code"] == "UnknownOperationException"
    assert upstream.seen.path_qs == "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/count-tokens"
    assert await bedrock_proxy.flush() == []


CONVERSE_MESSAGES: Any = [{"role": "user", "content": [{"text": "hi"}]}]
# Converse reports cache writes as one number (no 5-minute / 1-hour split): all at the 5-minute rate.
CONVERSE_USAGE = {
    **{
        k: v
        for k, v in US_USAGE.items()
        if k not in ("model", "priced_model", "cache_write_1h_tokens", "endpoint")
    },
    "provider": "converse",
    "model": US_SONNET,  # a Converse answer does not name its model: the URL's
    "cache_write_1h_tokens": 0,
    "input_cost": "0.011715",  # 50*3.3 + 10000*0.33 + 2000*4.125 = 11715 µ$
    "total_cost": "0.018315",
}


async def test_boto3_converse_is_metered_by_the_converse_dialect(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    def converse(base: str) -> dict[str, Any]:
        answer = runtime(base).converse(modelId=US_SONNET, messages=CONVERSE_MESSAGES)
        answer.pop("ResponseMetadata")
        return dict(answer)

    via = await asyncio.to_thread(converse, f"{bedrock_proxy.url}/bedrock")
    direct = await asyncio.to_thread(converse, upstream.url)
    assert via == direct and via["usage"]["inputTokens"] == 50
    record = await only_record(bedrock_proxy)
    assert_usage(record, endpoint="converse", stream=False, status=200, **CONVERSE_USAGE)


async def test_boto3_converse_stream_reaches_the_client_as_frames_and_is_metered(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    def converse_stream(base: str) -> list[dict[str, Any]]:
        answer = runtime(base).converse_stream(modelId=US_SONNET, messages=CONVERSE_MESSAGES)
        return list(answer["stream"])

    via = await asyncio.to_thread(converse_stream, f"{bedrock_proxy.url}/bedrock")
    direct = await asyncio.to_thread(converse_stream, upstream.url)
    assert via == direct and "metadata" in via[-1]
    record = await only_record(bedrock_proxy)
    assert_usage(record, endpoint="converse-stream", stream=True, status=200, **CONVERSE_USAGE)


async def test_converse_for_a_model_that_is_not_claude_is_metered_and_priced(
    bedrock_proxy: RunningProxy,
) -> None:
    nova = "us.amazon.nova-pro-v1:0"
    await asyncio.to_thread(
        runtime(f"{bedrock_proxy.url}/bedrock").converse, modelId=nova, messages=CONVERSE_MESSAGES
    )
    record = await only_record(bedrock_proxy)
    assert record["provider"] == "converse" and record["request_model"] == nova
    assert record["input_tokens"] == 12050 and record["total_cost"] is not None
    assert record["priced_model"] is not None and "nova-pro" in record["priced_model"]


async def test_the_route_is_off_unless_configured(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(Config(upstreams=UpstreamsConfig()))
    with pytest.raises(ClientError) as refused:
        await asyncio.to_thread(_invoke, runtime(f"{proxy.url}/bedrock"), US_SONNET)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


async def _raw_stream(base: str, model: str) -> tuple[int, bytes]:
    """A re-signing-free look at the bytes: the proxy signs for the upstream whatever the client sent."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/model/{model}/invoke-with-response-stream",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            data=json.dumps(BODY),
        ) as response,
    ):
        return response.status, await response.read()


async def test_a_corrupt_frame_reaches_the_client_unchanged_and_the_record_says_metering_failed(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    model = "us.anthropic.claude-fake-corrupt-v1:0"
    via = await _raw_stream(f"{bedrock_proxy.url}/bedrock", model)
    direct = await _raw_stream(upstream.url, model)
    assert via == direct and via[0] == 200
    record = await only_record(bedrock_proxy)
    assert record["error"] == "metering failed: the event stream is corrupt (ChecksumMismatch)"
    assert record["status"] == 200 and record["platform"] == "bedrock"


async def test_an_exception_mid_stream_is_recorded(bedrock_proxy: RunningProxy) -> None:
    with pytest.raises(ClientError) as stopped:
        await asyncio.to_thread(
            _invoke_stream, runtime(f"{bedrock_proxy.url}/bedrock"), "us.anthropic.claude-fake-throttled-v1:0"
        )
    assert stopped.value.response["Error"]["Code"] == "throttlingException"  # botocore read the frame
    record = await only_record(bedrock_proxy)
    assert record["error"] == "upstream error: throttlingException"

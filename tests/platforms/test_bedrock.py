"""Bedrock's platform: its routes, and its event-stream framing (frames written as Bedrock writes them,
read through botocore)."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from llmtally.config import BedrockConfig, Config, UpstreamsConfig
from llmtally.platforms import PlatformConfigError, build_platforms
from llmtally.platforms.bedrock import (
    BedrockPlatform,
    EventMessage,
    EventStreamReader,
    FrameError,
    InvokeStreamParser,
    invoke_event_as_sse,
    region_of,
    typed_stream_parser,
)
from llmtally.providers import ADAPTERS, Endpoint, MeteredRequest
from llmtally.providers.converse import CONVERSE_STREAM
from llmtally.record import TokenUsage
from llmtally.testing import eventstream
from tests.providers.test_streams import cut

#: Claude's events as Bedrock's InvokeModelWithResponseStream carries them: the direct API's, with
#: Bedrock's own metrics on the last one.
CLAUDE_EVENTS: list[dict[str, object]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_bdrk_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}},
    {
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": {"inputTokenCount": 12, "outputTokenCount": 40, "invocationLatency": 812, "firstByteLatency": 301},
    },
]  # fmt: skip
STREAM = b"".join(eventstream.invoke_chunk(e) for e in CLAUDE_EVENTS)


def _parser() -> InvokeStreamParser:
    request = MeteredRequest(Endpoint("anthropic", "messages"), b"{}", None, True, {})
    return InvokeStreamParser(ADAPTERS["anthropic"].stream_parser(request))


def test_frames_written_for_fakes_are_what_botocore_reads() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(STREAM)
    messages = list(buffer)
    assert [m.headers[":event-type"] for m in messages] == ["chunk"] * len(CLAUDE_EVENTS)
    assert messages[0].headers[":message-type"] == "event"


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_any_cut_gives_the_same_usage(points: list[int]) -> None:
    parser = _parser()
    for piece in cut(STREAM, points):
        parser.feed(piece)
    summary = parser.finish()
    assert summary.error is None
    assert summary.complete
    assert summary.model == "claude-sonnet-4-5-20250929"
    assert summary.usage == TokenUsage(
        input_tokens=2112, output_tokens=40, cache_read_tokens=2000, cache_write_tokens=100
    )
    assert summary.output_text == ["Hello"]


def test_a_corrupt_frame_stops_metering_and_says_so() -> None:
    broken = bytearray(STREAM)
    broken[len(eventstream.invoke_chunk(CLAUDE_EVENTS[0])) + 20] ^= 0xFF  # inside the second message
    parser = _parser()
    parser.feed(bytes(broken))
    summary = parser.finish()
    assert summary.error is not None and "event stream is corrupt" in summary.error
    assert summary.model == "claude-sonnet-4-5-20250929"  # what came before the bad frame still counts


def test_a_reader_that_failed_stays_failed() -> None:
    reader = EventStreamReader()
    assert reader.feed(b"\x00\x00\x00\x10\x00\x00\x00\x00garbage!") == []
    assert reader.error is not None and "ChecksumMismatch" in reader.error
    assert reader.feed(STREAM) == []


def test_a_chunk_without_its_event_is_refused() -> None:
    with pytest.raises(FrameError):
        invoke_event_as_sse(EventMessage("event", "chunk", None, b'{"bytes": "not base64!"}'))


def test_an_exception_mid_stream_is_the_dialects_error() -> None:
    parser = _parser()
    parser.feed(eventstream.invoke_chunk(CLAUDE_EVENTS[0]))
    parser.feed(eventstream.exception("throttlingException", "Too many requests"))
    summary = parser.finish()
    assert summary.error is not None and "throttlingException" in summary.error
    assert not summary.complete


# The route ------------------------------------------------------------------------------------------

BEDROCK_CONFIG = Config(
    upstreams=UpstreamsConfig(bedrock="https://bedrock-runtime.eu-west-1.amazonaws.com"),
    bedrock=BedrockConfig(signing="passthrough"),
)


def _bedrock() -> BedrockPlatform:
    platform = build_platforms(BEDROCK_CONFIG)["bedrock"]
    assert isinstance(platform, BedrockPlatform)
    return platform


@pytest.mark.parametrize(
    ("tail", "model", "framing"),
    [
        ("model/anthropic.claude-sonnet-4-5-20250929-v1:0/invoke", "anthropic.claude-sonnet-4-5-20250929-v1:0", None),
        ("model/eu.anthropic.claude-3-5-sonnet-20240620-v1:0/invoke-with-response-stream",
         "eu.anthropic.claude-3-5-sonnet-20240620-v1:0", "aws-eventstream"),
        ("model/arn:aws:bedrock:eu-west-1:123456789012:inference-profile/global.anthropic.claude-opus-4-5-v1:0/invoke",
         "global.anthropic.claude-opus-4-5-v1:0", None),
        ("model/arn:aws:bedrock:eu-west-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0/invoke",
         "anthropic.claude-3-haiku-20240307-v1:0", None),
    ],
)  # fmt: skip
def test_claude_invocations_are_metered_by_the_anthropic_dialect(
    tail: str, model: str, framing: str | None
) -> None:
    route = _bedrock().route("POST", tail, {})
    assert route.endpoint is not None and route.dialect == "anthropic" and route.platform == "bedrock"
    assert (route.model, route.framing, route.price_by_route_model) == (model, framing, True)


@pytest.mark.parametrize(
    "tail",
    [
        "model/amazon.nova-pro-v1:0/invoke",  # not Claude: Bedrock's own counts, the invoke dialect
        "model/arn:aws:bedrock:eu-west-1:123456789012:application-inference-profile/a1b2c3/invoke",
    ],
)
def test_other_invocations_are_metered_by_the_invoke_dialect(tail: str) -> None:
    route = _bedrock().route("POST", tail, {})
    assert route.endpoint is not None and route.dialect == "invoke" and route.price_by_route_model


@pytest.mark.parametrize(
    "tail",
    [
        "model/anthropic.claude-sonnet-4-5-20250929-v1:0/count-tokens",
        "guardrail/g1/version/1/apply",
    ],
)
def test_everything_else_is_forwarded_unmetered(tail: str) -> None:
    route = _bedrock().route("POST", tail, {})
    assert route.endpoint is None and str(route.upstream) == "https://bedrock-runtime.eu-west-1.amazonaws.com"


@pytest.mark.parametrize(
    ("op", "endpoint", "framing"),
    [("converse", "converse", None), ("converse-stream", "converse-stream", "aws-eventstream-typed")],
)
def test_converse_is_metered_by_its_own_dialect_for_any_model(
    op: str, endpoint: str, framing: str | None
) -> None:
    for model in ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "amazon.nova-pro-v1:0"):
        route = _bedrock().route("POST", f"model/{model}/{op}", {})
        assert route.dialect == "converse" and route.endpoint is not None and route.endpoint.name == endpoint
        assert (route.model, route.framing, route.price_by_route_model) == (model, framing, True)


def test_a_converse_stream_reaches_the_dialect_as_named_events() -> None:
    frames = [
        eventstream.event("messageStart", b'{"role":"assistant"}'),
        eventstream.event("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}'),
        eventstream.event("messageStop", b'{"stopReason":"end_turn"}'),
        eventstream.event(
            "metadata",
            b'{"usage":{"inputTokens":5,"outputTokens":2,"cacheReadInputTokens":100,"cacheWriteInputTokens":7},'
            b'"metrics":{"latencyMs":1}}',
        ),
    ]
    data = b"".join(frames)
    request = ADAPTERS["converse"].prepare(CONVERSE_STREAM, b'{"messages":[]}', {}, False)
    for points in ([], [1, 17, 40, 90, 200], list(range(0, len(data), 7))):
        parser = typed_stream_parser(ADAPTERS["converse"], request)
        for piece in cut(data, points):
            parser.feed(piece)
        summary = parser.finish()
        assert summary.usage == TokenUsage(input_tokens=112, output_tokens=2, cache_read_tokens=100,
                                           cache_write_tokens=7, reasoning_tokens=None)  # fmt: skip
        assert summary.output_text == ["Hi"] and summary.complete and summary.error is None


def test_the_region_comes_from_the_host_or_the_config() -> None:
    assert region_of(URL("https://bedrock-runtime.eu-west-1.amazonaws.com")) == "eu-west-1"
    assert region_of(URL("https://bedrock-runtime-fips.us-gov-west-1.amazonaws.com")) == "us-gov-west-1"
    assert region_of(URL("http://127.0.0.1:9000")) is None
    local = Config(upstreams=UpstreamsConfig(bedrock="http://127.0.0.1:9000"), bedrock=BedrockConfig())
    with pytest.raises(PlatformConfigError, match=r"\[bedrock\] region: cannot tell the region"):
        build_platforms(local)


def test_re_signing_without_credentials_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    resign = Config(upstreams=BEDROCK_CONFIG.upstreams, bedrock=BedrockConfig(signing="resign"))
    with pytest.raises(PlatformConfigError, match='signing = "resign" needs AWS credentials'):
        build_platforms(resign)


def test_serve_says_why_it_cannot_re_sign_and_exits_1(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        LLMTALLY_UPSTREAMS_BEDROCK="https://bedrock-runtime.us-east-1.amazonaws.com",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "llmtally", "serve", "--port", "0"],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert b'cannot serve: [bedrock] signing = "resign" needs AWS credentials' in done.stderr
    assert b"Traceback" not in done.stderr

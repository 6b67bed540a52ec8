"""Bedrock's event-stream framing: frames written as Bedrock writes them, read through botocore."""

from __future__ import annotations

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given
from hypothesis import strategies as st

from llmtally.platforms.bedrock import (
    EventMessage,
    EventStreamReader,
    FrameError,
    InvokeStreamParser,
    invoke_event_as_sse,
)
from llmtally.providers import ADAPTERS, Endpoint, MeteredRequest
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

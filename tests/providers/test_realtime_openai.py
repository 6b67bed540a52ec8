"""OpenAI Realtime server events read for metering (llmtally.providers.realtime_openai)."""

from __future__ import annotations

import orjson

from llmtally.providers.realtime import session_reader
from llmtally.providers.realtime_openai import OpenAIRealtimeReader, reader_for
from llmtally.record import TokenUsage

USAGE = {
    "total_tokens": 1700, "input_tokens": 1500, "output_tokens": 200,
    "input_token_details": {
        "text_tokens": 500, "audio_tokens": 1000, "image_tokens": 0, "cached_tokens": 900,
        "cached_tokens_details": {"text_tokens": 300, "audio_tokens": 600, "image_tokens": 0},
    },
    "output_token_details": {"text_tokens": 40, "audio_tokens": 160},
}  # fmt: skip


def _event(**fields: object) -> bytes:
    return orjson.dumps(fields)


def test_only_the_realtime_path_is_a_session_and_the_url_names_the_model() -> None:
    reader = session_reader("openai", "v1/realtime", {"model": "gpt-realtime"})
    assert isinstance(reader, OpenAIRealtimeReader) and reader.model == "gpt-realtime"
    assert reader_for("v1/chat/completions", {}) is None
    assert session_reader("anthropic", "v1/realtime", {}) is None


def test_response_done_is_one_response_with_usage_by_modality() -> None:
    reader = OpenAIRealtimeReader("gpt-realtime")
    reader.server_message(_event(type="session.created", session={"model": "gpt-realtime-2025-08-28"}), 0.0)
    assert reader.server_message(_event(type="response.created", response={"id": "resp_1"}), 1.0) == []
    reader.server_message(_event(type="response.output_audio.delta", response_id="resp_1", delta="AAAA"), 1.5)
    reader.server_message(_event(type="response.output_text.delta", response_id="resp_1", delta="Hi"), 2.0)
    (done,) = reader.server_message(
        _event(type="response.done", response={"id": "resp_1", "status": "completed", "usage": USAGE}), 3.0
    )
    assert (done.started, done.first_output) == (1.0, 1.5)
    summary = done.summary
    assert summary.usage == TokenUsage(
        1500, 200, 900, input_audio_tokens=1000, output_audio_tokens=160, cache_read_audio_tokens=600
    )
    assert summary.model == "gpt-realtime-2025-08-28" and summary.upstream_request_id == "resp_1"
    assert summary.complete and summary.error is None and summary.output_text == []
    assert reader.finish() == []


def test_a_response_open_at_the_end_is_returned_with_its_text_and_the_beta_names_are_read() -> None:
    reader = OpenAIRealtimeReader(None)
    reader.server_message(_event(type="response.created", response={"id": "resp_2"}), 0.0)
    reader.server_message(_event(type="response.text.delta", response_id="resp_2", delta="Hello"), 0.1)
    reader.server_message(
        _event(type="response.audio_transcript.delta", response_id="resp_2", delta=" you"), 0.2
    )
    (cut,) = reader.finish()
    assert cut.summary.output_text == ["Hello", " you"] and cut.summary.usage is None
    assert cut.summary.error is not None and "before response.done" in cut.summary.error


def test_malformed_messages_are_counted_and_bad_usage_is_not_trusted() -> None:
    reader = OpenAIRealtimeReader("gpt-realtime")
    for raw in (b"{not json", b"[1, 2]", b'{"no": "type"}'):
        assert reader.server_message(raw, 0.0) == []
    assert reader.malformed == 3
    bad = {**USAGE, "input_tokens": -1}
    (done,) = reader.server_message(
        _event(type="response.done", response={"id": "r", "status": "failed", "usage": bad,
                                                "status_details": {"error": {"type": "server_error"}}}), 0.0
    )  # fmt: skip
    assert done.summary.usage is None and done.summary.usage_error is not None
    assert done.summary.error == "response failed: server_error"

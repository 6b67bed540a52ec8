"""Gemini Live messages read for metering (llmtally.providers.live_gemini)."""

from __future__ import annotations

import orjson

from llmtally.providers.live_gemini import GeminiLiveReader, reader_for
from llmtally.providers.realtime import session_reader
from llmtally.record import TokenUsage

META = {
    "promptTokenCount": 1000, "cachedContentTokenCount": 300, "responseTokenCount": 200,
    "toolUsePromptTokenCount": 20, "thoughtsTokenCount": 50,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 400}, {"modality": "AUDIO", "tokenCount": 600}],
    "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 250}, {"modality": "TEXT", "tokenCount": 50}],
    "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 180}],
    "toolUsePromptTokensDetails": [{"modality": "AUDIO", "tokenCount": 5}],
}  # fmt: skip


def test_the_three_versions_of_the_path_are_sessions() -> None:
    for version in ("v1", "v1beta", "v1alpha"):
        tail = f"ws/google.ai.generativelanguage.{version}.GenerativeService.BidiGenerateContent"
        assert isinstance(session_reader("gemini", tail, {}), GeminiLiveReader)
    assert reader_for("ws/google.ai.generativelanguage.v2.GenerativeService.BidiGenerateContent", {}) is None
    assert reader_for("v1beta/models/gemini-2.5-flash:generateContent", {}) is None


def test_a_turn_is_one_response_whether_its_usage_comes_with_turn_complete_or_after() -> None:
    reader = GeminiLiveReader()
    reader.client_message(orjson.dumps({"setup": {"model": "models/gemini-live-2.5-flash"}}), 0.0)
    assert reader.model == "gemini-live-2.5-flash"
    reader.server_message(b'{"setupComplete":{}}', 0.5)
    reader.server_message(orjson.dumps({"serverContent": {"modelTurn": {"parts": [{"text": "Hi"}]}}}), 1.0)
    assert reader.server_message(orjson.dumps({"serverContent": {"turnComplete": True}}), 2.0) == []
    (turn,) = reader.server_message(orjson.dumps({"usageMetadata": META}), 2.1)
    assert turn.summary.usage == TokenUsage(
        1020, 250, 300, reasoning_tokens=50, input_audio_tokens=605, output_audio_tokens=180,
        cache_read_audio_tokens=250,
    )  # fmt: skip
    assert (turn.started, turn.first_output) == (1.0, 1.0) and turn.summary.model == "gemini-live-2.5-flash"
    # The next turn: usage in the same message as turnComplete.
    reader.server_message(orjson.dumps({"serverContent": {"modelTurn": {"parts": [{"text": "Yes"}]}}}), 3.0)
    (second,) = reader.server_message(
        orjson.dumps({"serverContent": {"turnComplete": True}, "usageMetadata": META}), 4.0
    )
    assert second.summary.usage is not None and reader.finish() == []


def test_a_turn_open_at_the_end_is_estimated_and_malformed_messages_are_counted() -> None:
    reader = GeminiLiveReader()
    assert reader.server_message(b"\x00\x01not json", 0.0) == [] and reader.malformed == 1
    reader.server_message(orjson.dumps({"serverContent": {"outputTranscription": {"text": "Hello"}}}), 1.0)
    (cut,) = reader.finish()
    assert cut.summary.usage is None and cut.summary.output_text == ["Hello"]
    assert cut.summary.error is not None

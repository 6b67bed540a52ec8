"""Gemini counting: exact Gemma 3 counts on the corpus, Google's local-tokenizer rules, media."""

from __future__ import annotations

import base64
import struct
import zlib
from importlib.resources import files
from pathlib import Path

import pytest

from llmtally.counters import ChatInput
from llmtally.counters.gemini import GeminiCounter, image_tokens
from tests.counters.corpus import REFS, TEXTS


@pytest.fixture(scope="module")
def gemini() -> GeminiCounter:
    counter = GeminiCounter()
    counter.load()
    return counter


def test_corpus_reference_counts(gemini: GeminiCounter) -> None:
    wrong = {}
    for name, ref in REFS.items():
        count = gemini.count_text("gemini-2.5-flash", [TEXTS[name]])
        assert count.exact and count.tokenizer == "gemma3"
        if count.input_tokens != ref["gemma3"]:
            wrong[name] = (count.input_tokens, ref["gemma3"])
    assert not wrong


def test_configured_tokenizer_path_is_used(tmp_path: Path) -> None:
    path = (
        tmp_path / "my-gemma3.tokenizer.json.gz"
    )  # a copy elsewhere: the configured file, not the bundled one
    path.write_bytes((files("llmtally.counters") / "data" / "gemma3.tokenizer.json.gz").read_bytes())
    counter = GeminiCounter(str(path))
    assert counter.count_text("gemini-2.0-flash", ["Hello world, how are you?"]).input_tokens == 7


def test_missing_tokenizer_file_is_a_clear_error_in_strict_mode() -> None:
    from llmtally.counters import TokenizerUnavailable

    with pytest.raises(TokenizerUnavailable, match=r"nope\.json"):
        GeminiCounter("/nonexistent/nope.json", strict=True).count_text("gemini-2.5-pro", ["x"])


def test_missing_tokenizer_file_falls_back_to_a_flagged_estimate() -> None:
    counter = GeminiCounter("/nonexistent/nope.json")
    count = counter.count_text("gemini-2.5-pro", ["Hello world, how are you?"])
    assert (count.exact, count.tokenizer) == (False, "o200k_base*1.157")
    assert "nope.json" in (count.note or "")


def test_request_counts_texts_like_googles_local_tokenizer(gemini: GeminiCounter) -> None:
    def n(*texts: str) -> int:
        return gemini.count_text("gemini-2.5-flash", list(texts)).input_tokens

    payload = {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {
                "role": "model",
                "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
            },
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": "21C"}}}],
            },
        ],
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Current weather",
                        "parameters": {
                            "type": "OBJECT",
                            "properties": {"city": {"type": "STRING", "description": "City name"}},
                            "required": ["city"],
                        },
                    }
                ]
            }
        ],
    }
    count = gemini.count_request("gemini-2.5-flash", "generateContent", payload)
    expected = n(
        "Weather in Paris?", "get_weather", "city", "Paris", "get_weather", "temp", "21C",
        "get_weather", "Current weather", "city", "City name", "city", "Be brief.",
    )  # fmt: skip
    assert count.input_tokens == expected
    assert count.exact


def _png(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return base64.b64encode(data + b"\x00" * 16).decode()


@pytest.mark.parametrize(
    ("size", "tokens"), [((384, 384), 258), ((1000, 500), 258 * 2), ((1536, 1537), 258 * 6)]
)
def test_image_tokens(gemini: GeminiCounter, size: tuple[int, int], tokens: int) -> None:
    assert image_tokens(*size) == tokens
    part = {"inlineData": {"mimeType": "image/png", "data": _png(*size)}}
    count = gemini.count_chat("gemini-2.5-flash", ChatInput(messages=[{"role": "user", "parts": [part]}]))
    assert count.input_tokens == tokens
    assert not count.exact  # media counts are estimates


def test_video_and_audio_with_duration(gemini: GeminiCounter) -> None:
    video = {
        "fileData": {"mimeType": "video/mp4", "fileUri": "x"},
        "videoMetadata": {"startOffset": "0s", "endOffset": "10s"},
    }
    count = gemini.count_chat("gemini-2.5-flash", ChatInput(messages=[{"parts": [video]}]))
    assert count.input_tokens == 2630


def test_later_models_are_counted_with_gemma3_but_not_exact(gemini: GeminiCounter) -> None:
    count = gemini.count_text("gemini-3.5-flash", ["Hello world, how are you?"])
    assert (count.input_tokens, count.exact) == (7, False)
    assert "Gemma 3" in (count.note or "")


def test_proxy_mode_never_loads_the_tokenizer() -> None:
    counter = GeminiCounter(load_on_demand=False)
    assert not counter.ready("gemini-2.5-flash")
    count = counter.count_text("gemini-2.5-flash", ["Hello world, how are you?"])
    assert (count.exact, count.tokenizer) == (False, "o200k_base*1.157")

"""OpenAI counting: exact against the reference corpus and the OpenAI cookbook's published counts."""

from __future__ import annotations

from typing import Any

import pytest

from llmtally.counters.bundled import TokenizerUnavailable, read_verified, tiktoken_encoding
from llmtally.counters.openai import OpenAICounter, encoding_name
from tests.counters.corpus import REFS, TEXTS


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base", "p50k_base"])
def test_corpus_reference_counts(encoding: str) -> None:
    enc = tiktoken_encoding(encoding)
    wrong = {}
    for name, ref in REFS.items():
        count = len(enc.encode_ordinary(TEXTS[name]))
        if count != ref[encoding]:
            wrong[name] = (count, ref[encoding])
    assert not wrong
    assert len(REFS) == 126


@pytest.mark.parametrize(("encoding", "vocab"), [("cl100k_base", 100277), ("o200k_base", 200019)])
def test_an_encoding_works_whole_without_tiktokens_python_copy_of_its_ranks(
    encoding: str, vocab: int
) -> None:
    # bundled.tiktoken_encoding drops that copy (it only serves pickling) to save 26 MB per encoding.
    enc = tiktoken_encoding(encoding)
    tokens = enc.encode("héllo wörld <|endoftext|>", allowed_special="all")
    assert enc.decode(tokens) == "héllo wörld <|endoftext|>"
    assert tokens[-1] == enc.eot_token
    assert enc.n_vocab == vocab
    assert b"".join(enc.decode_single_token_bytes(t) for t in tokens[:-1]) == "héllo wörld ".encode()


# The cookbook's example (How_to_count_tokens_with_tiktoken): 129 tokens on gpt-4, 124 on gpt-4o.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
     "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
     "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
     "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
     "deliverable."},
]  # fmt: skip


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 129), ("gpt-4-0613", 129), ("gpt-4o", 124),
                                                  ("gpt-4o-mini", 124), ("gpt-3.5-turbo-0301", 127)])  # fmt: skip
def test_cookbook_message_counts(model: str, expected: int) -> None:
    assert OpenAICounter().count_messages(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o-2024-08-06", "o200k_base"), ("gpt-5.4-mini", "o200k_base"), ("o3-mini", "o200k_base"),
     ("gpt-4.1", "o200k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-35-turbo", "cl100k_base"),
     ("text-embedding-3-small", "cl100k_base"), ("text-davinci-003", "p50k_base"),
     ("ft:gpt-4o-mini-2024-07-18:org::x", "o200k_base")],
)  # fmt: skip
def test_encoding_per_model(model: str, encoding: str) -> None:
    assert encoding_name(model) == (encoding, True)


def test_tampered_tokenizer_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtally.counters import bundled

    monkeypatch.setattr(bundled, "bundled_hashes", lambda: {"p50k_base.tiktoken": "0" * 64})
    with pytest.raises(TokenizerUnavailable, match="does not match"):
        read_verified("p50k_base.tiktoken")


TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return",
                             "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
]  # fmt: skip
TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)]
)
def test_cookbook_tools_counts(model: str, expected: int) -> None:
    from llmtally.counters import ChatInput

    count = OpenAICounter().count_chat(model, ChatInput(messages=TOOL_MESSAGES, tools=TOOLS))
    assert count.input_tokens == expected
    assert not count.exact  # the hidden tools prompt is reverse-engineered, not documented


def test_tools_render_as_a_typescript_namespace() -> None:
    from llmtally.counters.openai import render_tools

    assert render_tools(TOOLS) == (
        "namespace functions {\n\n"
        "// Get the current weather in a given location\n"
        "type get_current_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\n"
        "location: string,\n"
        "// The unit of temperature to return\n"
        'unit?: "celsius" | "fahrenheit",\n'
        "}) => any;\n\n"
        "} // namespace functions"
    )


@pytest.mark.parametrize(
    ("model", "size", "detail", "tokens"),
    [
        ("gpt-4o", (1024, 1024), "high", 765),       # OpenAI's worked examples
        ("gpt-4o", (2048, 4096), "high", 1105),
        ("gpt-4o", (4096, 8192), "low", 85),
        ("gpt-4o-mini", (1024, 1024), "high", 2833 + 4 * 5667),
        ("gpt-5", (512, 512), "high", 70 + 140),
        ("gpt-4.1-mini", (1024, 1024), "auto", 1659),  # 1024 patches x 1.62
        ("gpt-4.1-mini", (1800, 2400), "auto", 2353),  # 1452 patches after downscaling, x 1.62
    ],
)  # fmt: skip
def test_image_tokens(model: str, size: tuple[int, int], detail: str, tokens: int) -> None:
    from llmtally.counters.openai import image_tokens

    assert image_tokens(model, *size, detail) == tokens


def _png(width: int, height: int) -> bytes:
    import struct
    import zlib

    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _jpeg(width: int, height: int) -> bytes:
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def test_image_sizes_from_data_uris() -> None:
    import base64
    import struct

    from llmtally.counters.images import size_from_data_uri

    gif = b"GIF89a" + struct.pack("<HH", 300, 200) + b"\x00" * 8
    webp = (
        b"RIFF"
        + b"\x00" * 4
        + b"WEBPVP8X"
        + b"\x00" * 8
        + (639).to_bytes(3, "little")
        + (479).to_bytes(3, "little")
    )
    for raw, size in [
        (_png(640, 480), (640, 480)),
        (_jpeg(800, 600), (800, 600)),
        (gif, (300, 200)),
        (webp, (640, 480)),
    ]:
        uri = "data:image/x;base64," + base64.b64encode(raw).decode()
        assert size_from_data_uri(uri) == size
    assert size_from_data_uri("https://example.com/cat.png") is None


def test_image_message_is_counted_from_its_data_uri() -> None:
    import base64

    from llmtally.counters import ChatInput

    uri = "data:image/png;base64," + base64.b64encode(_png(1024, 1024)).decode()
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": uri, "detail": "high"}},
    ]
    with_image = OpenAICounter().count_chat(
        "gpt-4o", ChatInput(messages=[{"role": "user", "content": content}])
    )
    text_only = OpenAICounter().count_chat(
        "gpt-4o", ChatInput(messages=[{"role": "user", "content": "What is this?"}])
    )
    assert with_image.input_tokens == text_only.input_tokens + 765
    assert with_image.exact
    by_url = [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    guessed = OpenAICounter().count_chat("gpt-4o", ChatInput(messages=[{"role": "user", "content": by_url}]))
    assert not guessed.exact  # size unknown: 1024x1024 assumed

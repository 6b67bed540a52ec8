"""The OpenAI stream editor gives the client exactly the stream it asked for, however the bytes are cut."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmtally.providers import ADAPTERS, MeteredRequest, StreamEditor
from tests.providers.test_streams import cut


def _request(body: bytes) -> MeteredRequest:
    adapter = ADAPTERS["openai"]
    endpoint = adapter.route("v1/chat/completions")
    assert endpoint is not None
    return adapter.prepare(endpoint, body, {}, True)


def _editor() -> StreamEditor:
    request = _request(b'{"model":"gpt-4o","stream":true,"messages":[]}')
    assert request.injected_usage
    editor = ADAPTERS["openai"].stream_editor(request)
    assert editor is not None
    return editor


def _chunk(content: str, usage: bool) -> bytes:
    # Compact, with "usage" last, as OpenAI sends it; the content mentions usage to show that text
    # (whose quotes JSON escapes) is never edited.
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }
    data = orjson.dumps(obj)
    return b"data: " + (data[:-1] + b',"usage":null}' if usage else data) + b"\n\n"


USAGE_ONLY = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'
)
PIECES = ["Hel", 'lo "usage":null', " \\u0022usage\\u0022", "!"]
#: What the upstream sends when llmtally asked for usage, and what the client would have got without.
INJECTED = b"".join(_chunk(p, usage=True) for p in PIECES) + USAGE_ONLY + b"data: [DONE]\n\n"
EXPECTED = b"".join(_chunk(p, usage=False) for p in PIECES) + b"data: [DONE]\n\n"


def run(editor: StreamEditor, pieces: list[bytes]) -> bytes:
    return b"".join(editor.feed(piece) for piece in pieces) + editor.finish()


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_cut_gives_the_stream_without_the_injection(points: list[int]) -> None:
    assert run(_editor(), cut(INJECTED, points)) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_crlf_framing_is_edited_the_same(points: list[int]) -> None:
    crlf = INJECTED.replace(b"\n", b"\r\n")
    assert run(_editor(), cut(crlf, points)) == EXPECTED.replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        (USAGE_ONLY[:-2], b""),  # the injected usage chunk, unterminated: still hidden
        (_chunk("end", usage=True)[:-2], _chunk("end", usage=False)[:-2]),
    ],
)
def test_an_unterminated_last_event_is_edited_too(last: bytes, expected: bytes) -> None:
    head = _chunk("a", usage=True)
    assert run(_editor(), [head, last]) == _chunk("a", usage=False) + expected


def test_only_injected_streams_are_edited() -> None:
    asked = _request(b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}')
    assert ADAPTERS["openai"].stream_editor(asked) is None
    for provider in ("anthropic", "gemini"):
        adapter = ADAPTERS[provider]
        endpoint = adapter.route(
            "v1/messages" if provider == "anthropic" else "v1beta/models/x:streamGenerateContent"
        )
        assert endpoint is not None
        assert adapter.stream_editor(adapter.prepare(endpoint, b'{"stream":true}', {}, True)) is None

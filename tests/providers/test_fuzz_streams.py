"""Fuzzing every stream parser (issue 26): arbitrary bytes in arbitrary chunks never raise out of a
parser's public entry points, and the usage parsed from a valid stream does not depend on how the
stream was cut.

The parsers are the framing splitters (:mod:`llmtally.providers.streams`) and each provider's
``stream_parser`` / ``stream_editor`` / ``parse_response``: what the proxy calls on every response.
Profiles: ``fast`` in ``make test``, ``soak`` in ``make soak`` (see tests/conftest.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llmtally.providers import ADAPTERS, MeteredRequest, ResponseSummary
from llmtally.providers.streams import JSONArraySplitter, SSESplitter
from llmtally.record import Provider, TokenUsage
from tests.providers.test_streams import cut

# Requests as the proxy prepares them: every parser a response can meet -------------------------

_REQUESTS: dict[str, tuple[Provider, str, bytes, dict[str, str]]] = {
    "openai-chat": ("openai", "v1/chat/completions", b'{"model":"gpt-4o","stream":true,"messages":[]}', {}),
    "openai-responses": ("openai", "v1/responses", b'{"model":"gpt-4o","stream":true,"input":"hi"}', {}),
    "openai-completions": (
        "openai",
        "v1/completions",
        b'{"model":"gpt-3.5-turbo-instruct","stream":true,"prompt":"x"}',
        {},
    ),
    "anthropic": (
        "anthropic",
        "v1/messages",
        b'{"model":"claude-sonnet-4-5","stream":true,"messages":[]}',
        {},
    ),
    "gemini-sse": ("gemini", "v1beta/models/gemini-2.5-flash:streamGenerateContent", b"{}", {"alt": "sse"}),
    "gemini-array": ("gemini", "v1beta/models/gemini-2.5-flash:streamGenerateContent", b"{}", {}),
}


def prepared(kind: str, inject: bool = False) -> MeteredRequest:
    provider, path, body, query = _REQUESTS[kind]
    adapter = ADAPTERS[provider]
    endpoint = adapter.route(path)
    assert endpoint is not None
    return adapter.prepare(endpoint, body, query, inject)


SPLITS = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40)


def parse(kind: str, pieces: list[bytes]) -> ResponseSummary:
    request = prepared(kind)
    parser = ADAPTERS[request.endpoint.provider].stream_parser(request)
    for piece in pieces:
        parser.feed(piece)
    return parser.finish()


# Arbitrary input --------------------------------------------------------------------------------

#: JSON values with every kind of number a provider could send (huge, negative, fractional) and the
#: keys the parsers look for, so decoded events reach the code behind ``orjson.loads``.
_KEYS = st.sampled_from(
    [
        "type", "usage", "message", "delta", "choices", "candidates", "usageMetadata", "content",
        "parts", "text", "model", "modelVersion", "response", "error", "service_tier", "finishReason",
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "prompt_tokens_details",
        "completion_tokens_details", "cached_tokens", "reasoning_tokens", "audio_tokens",
        "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation",
        "ephemeral_1h_input_tokens", "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
        "cachedContentTokenCount", "toolUsePromptTokenCount", "promptTokensDetails", "modality",
        "tokenCount", "functionCall", "tool_calls", "function", "arguments", "inference_geo",
    ]
)  # fmt: skip
_TYPES = st.sampled_from(
    [
        "message_start", "message_delta", "message_stop", "content_block_delta", "error",
        "response.completed", "response.failed", "response.output_text.delta", "AUDIO", "TEXT",
    ]
)  # fmt: skip
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e30, -1.0, 0.5, 2**64, 2**63, -(2**63), 1e308]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), _TYPES)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(_KEYS, st.text(max_size=8)), inner, max_size=6)
    ),
    max_leaves=30,
)


def dumps(value: Any) -> bytes:
    """JSON text for any value here (the stdlib writes integers past 64 bits, which orjson refuses)."""
    return json.dumps(value, ensure_ascii=False).encode()


def sse_of(events: list[bytes], eol: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + event + eol + eol for event in events)


def array_of(elements: list[bytes]) -> bytes:
    return b"[" + b",\r\n".join(elements) + b"]"


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Raw bytes, framed JSON events of any shape, or a mix of both."""
    events = draw(st.lists(st.one_of(JSON_VALUES.map(dumps), st.binary(max_size=40)), max_size=8))
    form = draw(st.sampled_from(["binary", "sse", "array", "sse-crlf"]))
    if form == "binary":
        return draw(st.binary(max_size=600))
    if form == "array":
        return array_of(events)
    return sse_of(events, b"\r\n" if form == "sse-crlf" else b"\n")


KINDS = st.sampled_from(sorted(_REQUESTS))


@given(KINDS, hostile_streams(), SPLITS)
def test_no_stream_parser_raises_on_any_input(kind: str, data: bytes, points: list[int]) -> None:
    summary = parse(kind, cut(data, points))
    assert isinstance(summary, ResponseSummary)
    assert summary.usage is None or isinstance(summary.usage, TokenUsage)


@given(KINDS, st.one_of(JSON_VALUES.map(dumps), st.binary(max_size=400)))
def test_no_response_parser_raises_on_any_body(kind: str, body: bytes) -> None:
    request = prepared(kind)
    summary = ADAPTERS[request.endpoint.provider].parse_response(request, body)
    assert isinstance(summary, ResponseSummary)


@given(hostile_streams(), SPLITS)
def test_splitters_never_raise_and_sse_keeps_every_byte(data: bytes, points: list[int]) -> None:
    sse, array = SSESplitter(keep_raw=True), JSONArraySplitter()
    raw = b""
    for piece in cut(data, points):
        raw += b"".join(event.raw for event in sse.feed(piece))
        array.feed(piece)
    events, tail = sse.finish()
    raw += b"".join(event.raw for event in events) + tail
    assert raw == data  # kept mode hands back exactly the bytes it was fed


@given(hostile_streams(), SPLITS)
def test_openai_stream_editor_never_raises_and_leaves_usage_free_streams_alone(
    data: bytes, points: list[int]
) -> None:
    request = prepared("openai-chat", inject=True)
    editor = ADAPTERS["openai"].stream_editor(request)
    assert editor is not None
    out = b"".join(editor.feed(piece) for piece in cut(data, points)) + editor.finish()
    if b'"usage"' not in data:
        assert out == data


# Valid streams ----------------------------------------------------------------------------------

COUNTS = st.integers(min_value=0, max_value=2_000_000)
TEXTS = st.lists(st.text(max_size=30), min_size=0, max_size=6)
EOLS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@dataclass
class ValidStream:
    kind: str
    data: bytes
    #: What the usage must be, whatever the cuts.
    usage: TokenUsage
    texts: list[str]


def _js(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@st.composite
def openai_chat_streams(draw: st.DrawFn) -> ValidStream:
    texts, eol = draw(TEXTS), draw(EOLS)
    prompt, completion, cached, reasoning = draw(COUNTS), draw(COUNTS), draw(COUNTS), draw(COUNTS)
    chunks = [
        _js({"id": "c", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {"content": t}}]})
        for t in texts
    ]
    usage = {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }  # fmt: skip
    chunks.append(_js({"id": "c", "model": "gpt-4o-2024-08-06", "choices": [], "usage": usage}))
    data = sse_of([c.encode() for c in [*chunks, "[DONE]"]], eol)
    want = TokenUsage(
        input_tokens=prompt, output_tokens=completion, cache_read_tokens=cached, reasoning_tokens=reasoning
    )
    return ValidStream("openai-chat", data, want, [t for t in texts if t])


@st.composite
def openai_responses_streams(draw: st.DrawFn) -> ValidStream:
    texts, eol = draw(TEXTS), draw(EOLS)
    inp, out = draw(COUNTS), draw(COUNTS)
    events = [_js({"type": "response.created", "response": {"model": "gpt-4o"}})]
    events += [_js({"type": "response.output_text.delta", "delta": t}) for t in texts]
    usage = {"input_tokens": inp, "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}}
    events.append(_js({"type": "response.completed", "response": {"model": "gpt-4o", "usage": usage}}))
    data = b"".join(b"event: x" + eol + b"data: " + e.encode() + eol + eol for e in events)
    return ValidStream(
        "openai-responses", data, TokenUsage(inp, out, reasoning_tokens=0), [t for t in texts if t]
    )


@st.composite
def anthropic_streams(draw: st.DrawFn) -> ValidStream:
    texts, eol = draw(TEXTS), draw(EOLS)
    inp, out, write, read = draw(COUNTS), draw(COUNTS), draw(COUNTS), draw(COUNTS)
    start_usage = {
        "input_tokens": inp, "output_tokens": 1,
        "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
    }  # fmt: skip
    events = [
        ("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": start_usage}})
    ]
    events += [
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}})
        for t in texts
    ]
    events.append(("message_delta", {"type": "message_delta", "usage": {"output_tokens": out}}))
    events.append(("message_stop", {"type": "message_stop"}))
    data = b"".join(
        b"event: " + name.encode() + eol + b"data: " + _js(body).encode() + eol + eol for name, body in events
    )
    want = TokenUsage(
        input_tokens=inp + write + read, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write
    )
    return ValidStream("anthropic", data, want, [t for t in texts if t])


@st.composite
def gemini_streams(draw: st.DrawFn) -> ValidStream:
    texts, eol = draw(TEXTS), draw(EOLS)
    sse = draw(st.booleans())
    prompt, thoughts = draw(COUNTS), draw(COUNTS)
    elements, candidates = [], 0
    for i, text in enumerate(texts or [""]):
        candidates += len(text)
        last = i == len(texts or [""]) - 1
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}}
        if last:
            candidate["finishReason"] = "STOP"
        meta = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "thoughtsTokenCount": thoughts,
        }
        elements.append(
            _js({"candidates": [candidate], "usageMetadata": meta, "modelVersion": "gemini-2.5-flash"})
        )
    if sse:
        data = sse_of([e.encode() for e in elements], eol)
    else:  # Gemini's own JSON-array stream, pretty-printed the way it sends it
        data = array_of([json.dumps(json.loads(e), indent=2, ensure_ascii=False).encode() for e in elements])
    want = TokenUsage(input_tokens=prompt, output_tokens=candidates + thoughts, reasoning_tokens=thoughts)
    return ValidStream("gemini-sse" if sse else "gemini-array", data, want, [t for t in texts if t])


VALID_STREAMS = st.one_of(
    openai_chat_streams(), openai_responses_streams(), anthropic_streams(), gemini_streams()
)


@given(VALID_STREAMS, SPLITS)
def test_usage_of_a_valid_stream_does_not_depend_on_the_cuts(stream: ValidStream, points: list[int]) -> None:
    whole = parse(stream.kind, [stream.data])
    split = parse(stream.kind, cut(stream.data, points))
    assert whole.usage == stream.usage
    assert split.usage == stream.usage
    assert split.output_text == whole.output_text == stream.texts
    assert (split.model, split.complete, split.error) == (whole.model, whole.complete, whole.error)
    assert split.complete and split.error is None


@given(VALID_STREAMS, SPLITS, st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=6))
def test_a_corrupted_valid_stream_never_raises(
    stream: ValidStream, points: list[int], flips: list[tuple[int, int]]
) -> None:
    data = bytearray(stream.data)
    for at, byte in flips:
        data[at % len(data)] = byte
    summary = parse(stream.kind, cut(bytes(data), points))
    assert isinstance(summary, ResponseSummary)


@given(openai_chat_streams(), SPLITS)
def test_the_openai_usage_hider_output_does_not_depend_on_the_cuts(
    stream: ValidStream, points: list[int]
) -> None:
    def edited(pieces: list[bytes]) -> bytes:
        editor = ADAPTERS["openai"].stream_editor(prepared("openai-chat", inject=True))
        assert editor is not None
        return b"".join(editor.feed(piece) for piece in pieces) + editor.finish()

    whole = edited([stream.data])
    assert edited(cut(stream.data, points)) == whole
    assert b'"usage"' not in whole  # the usage-only chunk the injection added is gone

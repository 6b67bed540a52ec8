"""Stream splitters must give the same events however the bytes are cut."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from llmtally.providers.streams import JSONArraySplitter, SSESplitter


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (taken modulo its length): pieces that join back to ``data``."""
    points = sorted({p % (len(data) + 1) for p in points})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


SSE = (
    b": comment\r\n"
    b'event: message_start\r\ndata: {"a":1}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b"event: x\rdata: cr-only\r\r"
    b'data: {"t":"\xc3\xa9\xf0\x9f\x98\x80"}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ("message_start", '{"a":1}'),
    (None, "line one\nline two"),
    ("x", "cr-only"),
    (None, '{"t":"é😀"}'),
    (None, "[DONE]"),
]


def run_sse(pieces: list[bytes], keep_raw: bool = False) -> tuple[list[tuple[str | None, str | None]], bytes]:
    splitter = SSESplitter(keep_raw=keep_raw)
    events = []
    raw = b""
    for piece in pieces:
        for event in splitter.feed(piece):
            events.append(event)
    tail_events, tail = splitter.finish()
    events.extend(tail_events)
    raw = b"".join(e.raw for e in events) + tail
    return [(e.event, e.data) for e in events if e.data is not None], raw


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_sse_any_cut(points: list[int]) -> None:
    events, _ = run_sse(cut(SSE, points))
    assert events == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_sse_raw_bytes_reassemble_exactly(points: list[int]) -> None:
    _, raw = run_sse(cut(SSE, points), keep_raw=True)
    assert raw == SSE


def test_sse_unterminated_last_event_is_parsed_and_returned() -> None:
    events, raw = run_sse([b'data: {"usage":1}'], keep_raw=True)
    assert events == [(None, '{"usage":1}')]
    assert raw == b'data: {"usage":1}'


ARRAY_ITEMS = [
    {"candidates": [{"content": {"parts": [{"text": 'quote " brace } [ \\ end'}]}}]},
    {"usageMetadata": {"promptTokenCount": 3}, "s": "\\\\"},
    {"nested": {"a": [1, {"b": "}"}]}},
]
ARRAY = b"[" + b",\r\n".join(orjson.dumps(i, option=orjson.OPT_INDENT_2) for i in ARRAY_ITEMS) + b"]"


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_json_array_any_cut(points: list[int]) -> None:
    splitter = JSONArraySplitter()
    out = []
    for piece in cut(ARRAY, points):
        out.extend(splitter.feed(piece))
    assert [orjson.loads(o) for o in out] == ARRAY_ITEMS

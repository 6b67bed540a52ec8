"""Vertex AI's wire format, for the fake upstream: Gemini's ``generateContent`` with Vertex's usage fields
(``trafficType``) and Claude's ``rawPredict`` / ``streamRawPredict``.

As Vertex does: a bearer token (never an API key header), the model in the URL, Claude bodies with an
``anthropic_version`` and no ``model``. A Gemini call with ``X-Vertex-AI-LLM-Request-Type: dedicated``
(Vertex's header for "Provisioned Throughput only") answers as Provisioned Throughput traffic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from llmtally.testing.fake_upstream import FakeUpstream


def _error(status: int, message: str, state: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "status": state}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _vertex_chunk(
    fake: FakeUpstream,
    model: str,
    text: str,
    finish: bool,
    candidates: int,
    provisioned: bool,
    payload: Any = None,
) -> dict[str, Any]:
    chunk = fake._gemini_chunk(model, text, finish, candidates, payload)
    meta = chunk.get("usageMetadata")
    if isinstance(meta, dict):
        meta["trafficType"] = "PROVISIONED_THROUGHPUT" if provisioned else "ON_DEMAND"
    chunk["createTime"] = "2026-12-07T00:00:00.000000Z"
    return chunk


async def vertex_generate(fake: FakeUpstream, request: web.Request, stream: bool) -> web.StreamResponse:
    payload, error = await fake._begin(request, ("Authorization",))
    if error:
        return error
    if request.headers.get("x-goog-api-key"):
        return _error(401, "API keys are not supported by this API.", "UNAUTHENTICATED")
    model = request.match_info["model"]
    provisioned = request.headers.get("X-Vertex-AI-LLM-Request-Type", "").lower() == "dedicated"
    pieces = ["Hello", " from", " Vertex!"]
    total = fake.config.usage.gemini_candidates
    if not stream:
        body = _vertex_chunk(fake, model, "".join(pieces), True, total, provisioned, payload)
        return web.Response(body=orjson.dumps(body), content_type="application/json", charset="UTF-8")
    counts = [total * (i + 1) // len(pieces) for i in range(len(pieces))]
    last = len(pieces) - 1
    chunks = [
        _vertex_chunk(fake, model, p, i == last, counts[i], provisioned, payload)
        for i, p in enumerate(pieces)
    ]
    if request.query.get("alt") == "sse":
        return await fake._sse(
            request, (b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks), "text/event-stream"
        )

    def array() -> Iterator[bytes]:
        for i, c in enumerate(chunks):
            yield (b"[" if i == 0 else b",\r\n") + orjson.dumps(c, option=orjson.OPT_INDENT_2)
        yield b"]"

    return await fake._sse(request, array(), "application/json; charset=UTF-8")


async def vertex_count(fake: FakeUpstream, request: web.Request) -> web.Response:
    _, error = await fake._begin(request, ("Authorization",))
    if error:
        return error
    return web.json_response({"totalTokens": 33, "totalBillableCharacters": 120})


async def vertex_claude(fake: FakeUpstream, request: web.Request) -> web.StreamResponse:
    payload, error = await fake._begin(request, ("Authorization",))
    if error:
        return error
    # The version naming changed across SDK releases ("vertex-2023-10-16", later dated ones): any is taken.
    if not isinstance(payload.get("anthropic_version"), str) or "model" in payload:
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad Vertex request"}}
        return web.Response(body=orjson.dumps(body), status=400, content_type="application/json")
    streaming = request.path.endswith(":streamRawPredict")
    if streaming != (payload.get("stream") is True):
        return _error(400, "stream must match the method", "INVALID_ARGUMENT")
    # Vertex names the model "claude-sonnet-4-5@20250929"; its answers say "claude-sonnet-4-5-20250929".
    model = request.match_info["model"].replace("@", "-")
    return await fake.anthropic_answer(request, payload, model)

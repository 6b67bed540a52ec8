"""Amazon Bedrock's runtime wire format, for the fake upstream: InvokeModel and its stream for Claude,
and Converse and ConverseStream for any model id.

As Bedrock does:

- **auth**: a SigV4 signature, checked for the Host, path and body that arrived (403
  ``InvalidSignatureException`` otherwise: a request signed for the proxy fails here as it would at
  AWS), or a Bedrock API key as ``Authorization: Bearer …``;
- **body**: a Messages request with ``anthropic_version`` and no ``model`` (the model is the URL's; a
  body naming one is refused with 400 ``ValidationException``, as Bedrock refuses extraneous keys);
- **answer**: the Messages response (its ``model`` the bare Claude id) with the
  ``X-Amzn-Bedrock-*-Token-Count`` headers; streamed, event-stream ``chunk`` messages holding each
  event base64-encoded, the last one with ``amazon-bedrock-invocationMetrics``.

Other vendors' models on InvokeModel, each with its own body (Meta Llama ``prompt`` →
``generation`` with ``prompt_token_count``; Amazon Nova ``messages`` → ``output.message`` with
``usage``; Amazon Titan ``inputText`` → ``results``), the same count headers and, streamed, each chunk
the vendor's event with the invocation metrics on the last. An application inference profile
(``…:application-inference-profile/`` + :data:`APP_PROFILE_ID`) routes to Claude Sonnet 4.5.

Faults on command, by model id: ``…claude-fake-throttled…`` streams two events, then a
``throttlingException`` message; ``…claude-fake-corrupt…`` sends its fourth message with a byte flipped
(its CRC no longer holds).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from llmtally.testing import eventstream

if TYPE_CHECKING:
    from llmtally.testing.fake_upstream import FakeUpstream

#: The fake's AWS identity (give these to boto3, or to the proxy's re-signing, as credentials).
ACCESS_KEY = "AKIAFAKELLMTALLY0001"
SECRET_KEY = "fake/llmtally/secret/key/0123456789abcdef"
REGION = "us-east-1"
#: A Bedrock API key the fake accepts as a bearer (``signing = "passthrough"``).
API_KEY = "ABSKZmFrZS1iZWRyb2NrLWFwaS1rZXk="
#: The application inference profile the fake knows (its ARN ends with it): Claude Sonnet 4.5 behind it.
APP_PROFILE_ID = "llmtallyfake01"
APP_PROFILE_MODEL = "anthropic.claude-sonnet-4-5-20250929-v1:0"
#: What the fake's other vendors' models report (input excludes nothing: no prompt cache).
NATIVE_INPUT = 321
NATIVE_OUTPUT = 45
#: ``us.anthropic.claude-sonnet-4-5-20250929-v1:0`` → ``claude-sonnet-4-5-20250929``.
_CLAUDE_ID = re.compile(r"(?:.*/)?(?:[a-z-]+\.)?anthropic\.(?P<name>claude[^:/]*?)(?:-v\d+)?(?::\d+)?")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message}),
        content_type="application/json",
        headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.coral.service/"},
    )


def authorised(request: web.Request, body: bytes) -> web.Response | None:
    """None when the request is signed for this host and path, or carries the API key; else the 403."""
    from llmtally.platforms.sigv4 import signature_holds

    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        if auth == f"Bearer {API_KEY}":
            return None
        return _error(
            403, "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    url = f"{request.scheme}://{request.host}{request.raw_path}"
    if signature_holds(request.method, url, request.headers.items(), body, SECRET_KEY, ACCESS_KEY, REGION):
        return None
    return _error(
        403,
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided. Check your AWS "
        "Secret Access Key and signing method. Consult the service documentation for details.",
    )


async def _begin(fake: FakeUpstream, request: web.Request) -> tuple[bytes, web.Response | None]:
    """Count and keep the request, as the fake does for every call; its body and the 403, if any."""
    from llmtally.testing.fake_upstream import Seen

    fake.requests += 1
    body = await request.read()
    fake.seen = Seen(request.method, request.raw_path, dict(request.headers), body)
    return body, authorised(request, body)


async def bedrock_invoke(fake: FakeUpstream, request: web.Request, stream: bool) -> web.StreamResponse:
    body, refused = await _begin(fake, request)
    if refused is not None:
        return refused
    model_id = request.match_info["model"]
    if model_id.endswith(f"application-inference-profile/{APP_PROFILE_ID}"):
        model_id = APP_PROFILE_MODEL
    claude = _CLAUDE_ID.fullmatch(model_id)
    if claude is None:
        return await _native_invoke(fake, request, body, model_id, stream)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(
            400, "ValidationException", "Malformed input request, please reformat your input and try again."
        )
    if not isinstance(payload, dict) or "anthropic_version" not in payload:
        return _error(
            400,
            "ValidationException",
            "Malformed input request: #: required key [anthropic_version] not found",
        )
    for key in ("model", "stream"):
        if key in payload:
            return _error(
                400,
                "ValidationException",
                f"Malformed input request: #: extraneous key [{key}] is not permitted",
            )
    model = claude["name"]
    headers = {"x-amzn-RequestId": "5b8a1e0c-fake-4c1d-9a7e-llmtally0001"}
    if not stream:
        answer = await fake.anthropic_answer(request, payload, model)
        assert isinstance(answer, web.Response) and answer.body is not None
        usage = orjson.loads(bytes(answer.body))["usage"]  # type: ignore[arg-type]
        answer.headers.update(headers)
        answer.headers.update(_count_headers(usage))
        return answer
    return await fake._sse(
        request,
        _frames(fake, payload, model),
        "application/vnd.amazon.eventstream",
        {**headers, "X-Amzn-Bedrock-Content-Type": "application/json"},
    )


async def bedrock_other(fake: FakeUpstream, request: web.Request) -> web.Response:
    """An operation the fake does not implement (count tokens): the signature is still checked first."""
    _, refused = await _begin(fake, request)
    if refused is not None:
        return refused
    return _error(404, "UnknownOperationException", "The fake Bedrock does not implement this operation.")


def converse_usage(fake: FakeUpstream) -> dict[str, int]:
    """Converse's usage for the fake's Claude numbers: ``inputTokens`` without the cache reads and writes."""
    u = fake.config.usage
    write = u.anthropic_cache_write_5m + u.anthropic_cache_write_1h
    usage = {
        "inputTokens": u.anthropic_input,
        "outputTokens": u.anthropic_output,
        "cacheReadInputTokens": u.anthropic_cache_read,
        "cacheWriteInputTokens": write,
    }
    usage["totalTokens"] = sum(usage.values())
    return usage


async def bedrock_converse(fake: FakeUpstream, request: web.Request, stream: bool) -> web.StreamResponse:
    """Converse and ConverseStream, for any model id: text in ``output.message.content``, usage in
    ``usage`` (streamed: the last event, ``metadata``)."""
    from llmtally.testing.fake_upstream import _pieces

    body, refused = await _begin(fake, request)
    if refused is not None:
        return refused
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(
            400, "ValidationException", "Malformed input request, please reformat your input and try again."
        )
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return _error(400, "ValidationException", "1 validation error detected: Value null at 'messages'")
    pieces = _pieces(fake.config)
    headers = {"x-amzn-RequestId": "5b8a1e0c-fake-4c1d-9a7e-llmtally0002"}
    metrics = {"latencyMs": 412}
    if not stream:
        answer = {
            "output": {"message": {"role": "assistant", "content": [{"text": "".join(pieces)}]}},
            "stopReason": "end_turn",
            "usage": converse_usage(fake),
            "metrics": metrics,
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)

    def frames() -> Any:
        yield eventstream.event("messageStart", orjson.dumps({"role": "assistant"}))
        for piece in pieces:
            delta = {"contentBlockIndex": 0, "delta": {"text": piece}}
            yield eventstream.event("contentBlockDelta", orjson.dumps(delta))
        yield eventstream.event("contentBlockStop", orjson.dumps({"contentBlockIndex": 0}))
        yield eventstream.event("messageStop", orjson.dumps({"stopReason": "end_turn"}))
        yield eventstream.event("metadata", orjson.dumps({"usage": converse_usage(fake), "metrics": metrics}))

    return await fake._sse(request, frames(), "application/vnd.amazon.eventstream", headers)


def _count_headers(usage: dict[str, Any] | None) -> dict[str, str]:
    if not usage:
        return {}
    return {
        "X-Amzn-Bedrock-Input-Token-Count": str(usage.get("input_tokens", 0)),
        "X-Amzn-Bedrock-Output-Token-Count": str(usage.get("output_tokens", 0)),
        "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(usage.get("cache_read_input_tokens", 0)),
        "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(usage.get("cache_creation_input_tokens", 0)),
        "X-Amzn-Bedrock-Invocation-Latency": "412",
    }


def _frames(fake: FakeUpstream, payload: dict[str, Any], model: str) -> Any:
    usage = fake._anthropic_usage(fake.config.usage.anthropic_output)
    events = (e for e in fake.anthropic_events(payload, model) if e[0] != "ping")  # Bedrock sends none
    for sent, (kind, data) in enumerate(events):
        if "fake-throttled" in model and sent == 2:
            yield eventstream.exception("throttlingException", "Too many requests, please wait.")
            return
        event: dict[str, Any] = {"type": kind, **data}
        if kind == "message_stop" and "nousage" not in model:
            event["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": usage["input_tokens"],
                "outputTokenCount": usage["output_tokens"],
                "invocationLatency": 412,
                "firstByteLatency": 120,
                "cacheReadInputTokenCount": usage["cache_read_input_tokens"],
                "cacheWriteInputTokenCount": usage["cache_creation_input_tokens"],
            }
        frame = eventstream.invoke_chunk(event)
        if "fake-corrupt" in model and sent == 3:
            frame = frame[:20] + bytes([frame[20] ^ 0xFF]) + frame[21:]
        yield frame


# Other vendors' models on InvokeModel ----------------------------------------------------------


def _native_kind(model_id: str) -> str | None:
    for kind in ("meta.llama", "amazon.nova", "amazon.titan-text"):
        if kind in model_id:
            return kind
    return None


def _metrics() -> dict[str, int]:
    return {
        "inputTokenCount": NATIVE_INPUT,
        "outputTokenCount": NATIVE_OUTPUT,
        "invocationLatency": 301,
        "firstByteLatency": 90,
    }


async def _native_invoke(
    fake: FakeUpstream, request: web.Request, body: bytes, model_id: str, stream: bool
) -> web.StreamResponse:
    from llmtally.testing.fake_upstream import _pieces

    kind = _native_kind(model_id)
    if kind is None:
        return _error(400, "ValidationException", "The provided model identifier is invalid.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    needs = {"meta.llama": "prompt", "amazon.nova": "messages", "amazon.titan-text": "inputText"}[kind]
    if not isinstance(payload, dict) or needs not in payload:
        return _error(
            400, "ValidationException", f"Malformed input request: #: required key [{needs}] not found"
        )
    pieces = _pieces(fake.config)
    text = "".join(pieces)
    headers = {"x-amzn-RequestId": "5b8a1e0c-fake-4c1d-9a7e-llmtally0003"}
    if not stream:
        answer: dict[str, Any]
        if kind == "meta.llama":
            answer = {
                "generation": text,
                "prompt_token_count": NATIVE_INPUT,
                "generation_token_count": NATIVE_OUTPUT,
                "stop_reason": "stop",
            }
        elif kind == "amazon.nova":
            answer = {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": "end_turn",
                "usage": {
                    "inputTokens": NATIVE_INPUT,
                    "outputTokens": NATIVE_OUTPUT,
                    "totalTokens": NATIVE_INPUT + NATIVE_OUTPUT,
                },
            }
        else:
            answer = {
                "inputTextTokenCount": NATIVE_INPUT,
                "results": [{"tokenCount": NATIVE_OUTPUT, "outputText": text, "completionReason": "FINISH"}],
            }
        counts = {"input_tokens": NATIVE_INPUT, "output_tokens": NATIVE_OUTPUT}
        if "nousage" not in model_id:
            headers.update(_count_headers(counts))
        return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)

    def frames() -> Any:
        events: list[dict[str, Any]]
        if kind == "meta.llama":
            events = [
                {
                    "generation": piece,
                    "prompt_token_count": NATIVE_INPUT if i == 0 else None,
                    "generation_token_count": i + 1,
                    "stop_reason": None,
                }
                for i, piece in enumerate(pieces)
            ]
            events.append({"generation": "", "generation_token_count": NATIVE_OUTPUT, "stop_reason": "stop"})
        elif kind == "amazon.nova":
            events = [{"messageStart": {"role": "assistant"}}]
            events += [{"contentBlockDelta": {"delta": {"text": p}, "contentBlockIndex": 0}} for p in pieces]
            events += [
                {"contentBlockStop": {"contentBlockIndex": 0}},
                {"messageStop": {"stopReason": "end_turn"}},
            ]
            events.append(
                {"metadata": {"usage": {"inputTokens": NATIVE_INPUT, "outputTokens": NATIVE_OUTPUT}}}
            )
        else:
            events = [{"outputText": p, "index": 0, "totalOutputTextTokenCount": None} for p in pieces]
            events[-1].update(
                {"completionReason": "FINISH", "inputTextTokenCount": NATIVE_INPUT,
                 "totalOutputTextTokenCount": NATIVE_OUTPUT}
            )  # fmt: skip
        if "nousage" not in model_id:
            events[-1] = {**events[-1], "amazon-bedrock-invocationMetrics": _metrics()}
        for event in events:
            yield eventstream.invoke_chunk(event)

    return await fake._sse(
        request,
        frames(),
        "application/vnd.amazon.eventstream",
        {**headers, "X-Amzn-Bedrock-Content-Type": "application/json"},
    )

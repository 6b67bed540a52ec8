"""Azure OpenAI's chat completions wire format, for the fake upstream (``/openai/...`` paths).

What sets it apart from OpenAI's, as Azure sends it: ``prompt_filter_results`` on the response (and
in a first stream chunk with ``choices: []`` and empty ids), ``content_filter_results`` per choice,
asynchronous-filter chunks carrying ``content_filter_offsets`` (``usage: null`` when usage was asked
for), an ``api-key`` header or an Entra bearer, a required ``api-version`` on the classic URLs, and a
400 for ``stream_options`` on api-versions that predate it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from llmtally.platforms.azure import reports_stream_usage

if TYPE_CHECKING:
    from llmtally.testing.fake_upstream import FakeUpstream

#: Deployments the fake Azure resource has, and the model each serves.
DEPLOYMENTS = {
    "prod-chat": "gpt-4o-2024-08-06",
    "mini": "gpt-4o-mini-2024-07-18",
    "prod-image": "gpt-image-1",
}

_SAFE = {"filtered": False, "severity": "safe"}
FILTER_RESULTS: dict[str, Any] = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_FILTER = [
    {
        "prompt_index": 0,
        "content_filter_results": {**FILTER_RESULTS, "jailbreak": {"filtered": False, "detected": False}},
    }
]


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def azure_chat(fake: FakeUpstream, request: web.Request) -> web.StreamResponse:
    """``POST /openai/deployments/{d}/chat/completions?api-version=…`` or ``/openai/v1/chat/completions``."""
    payload, error = await fake._begin(request, ("api-key", "Authorization"))
    if error:
        return error
    deployment = request.match_info.get("deployment")
    api_version = request.query.get("api-version")
    if deployment is not None and not api_version:
        return _error(404, "404", "Resource not found")
    name = deployment or str(payload.get("model", ""))
    model = DEPLOYMENTS.get(name)
    if model is None:
        return _error(
            404, "DeploymentNotFound", f"The API deployment for this resource does not exist: {name}"
        )
    stream = payload.get("stream") is True
    options = payload.get("stream_options")
    if options is not None and not reports_stream_usage(api_version):
        return _error(400, "BadRequest", "Unrecognized request argument supplied: stream_options")
    text = "Hello from Azure!"
    headers = {
        "apim-request-id": "4e0f0c8a-fake-azure",
        "x-request-id": "req-azure-0001",
        "x-ms-region": "East US",
    }
    if not stream:
        body = {
            "choices": [
                {
                    "content_filter_results": FILTER_RESULTS,
                    "finish_reason": "stop",
                    "index": 0,
                    "logprobs": None,
                    "message": {"annotations": [], "content": text, "refusal": None, "role": "assistant"},
                }
            ],
            "created": 1_760_000_000,
            "id": "chatcmpl-azure0001",
            "model": model,
            "object": "chat.completion",
            "prompt_filter_results": PROMPT_FILTER,
            "system_fingerprint": "fp_azure",
            "usage": fake._openai_usage(),
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json", headers=headers)
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(choice: dict[str, Any]) -> bytes:
        obj: dict[str, Any] = {
            "choices": [choice],
            "created": 1_760_000_000,
            "id": "chatcmpl-azure0001",
            "model": model,
            "object": "chat.completion.chunk",
            "system_fingerprint": "fp_azure",
        }
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    def events() -> Iterator[bytes]:
        # The prompt's filter verdict comes first, in a chunk with no choices and empty ids.
        yield _sse(
            {
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": PROMPT_FILTER,
            }
        )
        yield chunk(
            {
                "content_filter_results": {},
                "delta": {"content": "", "refusal": None, "role": "assistant"},
                "finish_reason": None,
                "index": 0,
                "logprobs": None,
            }
        )
        for word in ("Hello", " from", " Azure!"):
            yield chunk(
                {
                    "content_filter_results": FILTER_RESULTS,
                    "delta": {"content": word},
                    "finish_reason": None,
                    "index": 0,
                    "logprobs": None,
                }
            )
        yield chunk(
            {"content_filter_results": {}, "delta": {}, "finish_reason": "stop", "index": 0, "logprobs": None}
        )
        # Asynchronous filtering reports on the text after it was sent.
        offsets = {"check_offset": 0, "start_offset": 0, "end_offset": len(text)}
        late: dict[str, Any] = {
            "choices": [
                {
                    "content_filter_offsets": offsets,
                    "content_filter_results": FILTER_RESULTS,
                    "finish_reason": None,
                    "index": 0,
                }
            ],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
        }
        if include_usage:
            late["usage"] = None
        yield _sse(late)
        if include_usage:
            yield _sse(
                {
                    "choices": [],
                    "created": 1_760_000_000,
                    "id": "chatcmpl-azure0001",
                    "model": model,
                    "object": "chat.completion.chunk",
                    "system_fingerprint": "fp_azure",
                    "usage": fake._openai_usage(),
                }
            )
        yield b"data: [DONE]\n\n"

    return await fake._sse(request, events(), "text/event-stream; charset=utf-8", headers)

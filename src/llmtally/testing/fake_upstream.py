"""A fake OpenAI + Anthropic + Gemini upstream speaking each provider's wire format.

Used by ``llmtally demo``, the test suite and the load tests. Responses are deterministic (fixed
ids and timestamps) so a direct call and a proxied call can be compared byte for byte, and the
usage is realistic: cached input, cache writes of both durations, reasoning/thinking tokens.

Special model names: a model containing ``nousage`` gets responses without usage;
``fake-error-500`` gets a provider-shaped 500 error; ``fake-hang`` never answers.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

CREATED = 1_760_000_000

#: Dated snapshots the real APIs report for an alias.
SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-5": "gpt-5-2025-08-07",
    "o4-mini": "o4-mini-2025-04-16",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}


@dataclass(frozen=True, slots=True)
class FakeUsage:
    """The usage every fake response reports (per provider wire names)."""

    # OpenAI chat/completions/responses
    openai_prompt: int = 1200
    openai_cached: int = 1024
    openai_completion: int = 300
    openai_reasoning: int = 128
    openai_embedding_prompt: int = 8
    # Anthropic (input excludes cache fields)
    anthropic_input: int = 50
    anthropic_cache_write_5m: int = 1500
    anthropic_cache_write_1h: int = 500
    anthropic_cache_read: int = 10000
    anthropic_output: int = 400
    # Gemini (prompt includes cached)
    gemini_prompt: int = 3000
    gemini_cached: int = 2048
    gemini_candidates: int = 250
    gemini_thoughts: int = 500
    gemini_tool_use_prompt: int = 0
    gemini_embedding_prompt: int = 9
    # Images: per image in an OpenAI request (low detail), per image in a Gemini prompt, per image a
    # Gemini image model writes (1024x1024), and the Images API's (gpt-image-*) usage.
    openai_image_input: int = 85
    gemini_image_input: int = 258
    gemini_image_output: int = 1290
    images_text_input: int = 20
    images_image_input: int = 388
    images_output: int = 1056
    images_output_text: int = 24


@dataclass(slots=True)
class FakeUpstreamConfig:
    usage: FakeUsage = field(default_factory=FakeUsage)
    #: Delay before the response headers.
    latency_s: float = 0.0
    #: Text pieces in a streamed response.
    chunks: int = 3
    #: Delay between streamed pieces.
    chunk_interval_s: float = 0.0
    #: Characters of text in each piece (0: one word per piece).
    piece_chars: int = 0


@dataclass(slots=True)
class Seen:
    """The last request the fake received (tests check what the proxy forwarded)."""

    method: str = ""
    path_qs: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _pieces(cfg: FakeUpstreamConfig) -> list[str]:
    words = ["Hello", " from", " the", " fake", " upstream", "!"]
    out = []
    for i in range(cfg.chunks):
        word = words[i % len(words)]
        if cfg.piece_chars:
            word = (word * (cfg.piece_chars // len(word) + 1))[: cfg.piece_chars]
        out.append(word)
    return out


_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 500: "INTERNAL"}


def _error_response(request: web.Request, status: int, kind: str, message: str) -> web.Response:
    """An error body in the shape of the provider the path belongs to."""
    path = request.path
    if path.startswith("/v1/messages"):
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    elif path.startswith(("/v1beta/", "/v1/models/")):
        body = {
            "error": {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}
        }
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(body=_pretty(body), status=status, content_type="application/json")


#: Server tool uses the fake reports for a request offering Anthropic's web search / web fetch tools.
SERVER_TOOL_USES = {"web_search": ("web_search_requests", 2), "web_fetch": ("web_fetch_requests", 1)}


def _with_server_tools(payload: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    used = {}
    for tool in payload.get("tools") or ():
        kind = str(tool.get("type", "")) if isinstance(tool, dict) else ""
        for prefix, (field_name, count) in SERVER_TOOL_USES.items():
            if kind.startswith(prefix + "_"):
                used[field_name] = count
    return {**usage, "server_tool_use": used} if used else usage


#: A 1x1 PNG: what the fake answers as a generated image.
FAKE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def get(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def image_parts(messages: Any) -> int:
    """Image parts in OpenAI chat ``messages`` (``image_url``) or Responses ``input`` (``input_image``)."""
    if not isinstance(messages, list):
        return 0
    return sum(
        1
        for message in messages
        for part in (get(message, "content") if isinstance(get(message, "content"), list) else ())
        if isinstance(part, dict) and part.get("type") in ("image_url", "input_image")
    )


def _snapshot(model: str) -> str:
    return SNAPSHOTS.get(model, model)


def _pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2)


def _compact(obj: Any) -> bytes:
    return orjson.dumps(obj)


class FakeUpstream:
    """``await FakeUpstream().start()`` → base URL; ``await stop()``."""

    def __init__(self, config: FakeUpstreamConfig | None = None) -> None:
        self.config = config or FakeUpstreamConfig()
        self.seen = Seen()
        self.requests = 0
        self.cancelled_streams = 0
        self.app = web.Application(client_max_size=256 * 1024 * 1024)
        r = self.app.router
        r.add_post("/v1/chat/completions", self._openai_chat)
        r.add_post("/v1/completions", self._openai_completions)
        r.add_post("/v1/responses", self._openai_responses)
        r.add_post("/v1/embeddings", self._openai_embeddings)
        r.add_post("/v1/images/generations", self._openai_images)
        r.add_post("/v1/images/edits", self._openai_images)
        r.add_post("/v1/messages", self._anthropic_messages)
        r.add_post("/v1/messages/count_tokens", self._anthropic_count)
        r.add_post("/v1/responses/input_tokens", self._openai_input_tokens)
        r.add_post(r"/{version:v1beta|v1}/models/{model}:countTokens", self._gemini_count)
        r.add_post(r"/{version:v1beta|v1}/models/{model}:generateContent", self._gemini_generate)
        r.add_post(r"/{version:v1beta|v1}/models/{model}:streamGenerateContent", self._gemini_stream)
        r.add_post(r"/{version:v1beta|v1}/models/{model}:embedContent", self._gemini_embed)
        r.add_post(r"/{version:v1beta|v1}/models/{model}:batchEmbedContents", self._gemini_batch_embed)
        r.add_get("/v1/models", self._openai_models)
        # Vertex AI (the proxy's /vertex upstream): Gemini and Claude.
        vertex = r"/{version:v1|v1beta1}/projects/{project}/locations/{location}/publishers"
        r.add_post(vertex + "/google/models/{model}:generateContent", self._vertex_generate)
        r.add_post(vertex + "/google/models/{model}:streamGenerateContent", self._vertex_stream)
        r.add_post(vertex + "/google/models/{model}:countTokens", self._vertex_count)
        r.add_post(vertex + "/anthropic/models/{model}:rawPredict", self._vertex_claude)
        r.add_post(vertex + "/anthropic/models/{model}:streamRawPredict", self._vertex_claude)
        # Azure OpenAI (the proxy's /azure-openai upstream): classic and v1 URLs.
        r.add_post("/openai/deployments/{deployment}/chat/completions", self._azure_chat)
        r.add_post("/openai/v1/chat/completions", self._azure_chat)
        r.add_post("/openai/deployments/{deployment}/images/generations", self._openai_images)
        r.add_post("/openai/deployments/{deployment}/images/edits", self._openai_images)
        # Amazon Bedrock's runtime (the proxy's /bedrock upstream): InvokeModel for Claude, SigV4 checked.
        r.add_post("/model/{model:.+}/invoke", self._bedrock_invoke)
        r.add_post("/model/{model:.+}/invoke-with-response-stream", self._bedrock_stream)
        r.add_post("/model/{model:.+}/converse", self._bedrock_converse)
        r.add_post("/model/{model:.+}/converse-stream", self._bedrock_converse_stream)
        r.add_post("/model/{model:.+}/count-tokens", self._bedrock_other)
        r.add_route("*", "/echo/{tail:.*}", self._echo)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Listen on ``host:port`` (port 0: any free one), over TLS with ``ssl_context``; the base URL."""
        # Short shutdown: a "fake-hang" handler must not hold a test up for the default 60 s. Handlers
        # are cancelled when the proxy closes the connection, as a provider stops generating.
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"{'https' if ssl_context is not None else 'http'}://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- helpers -----------------------------------------------------------------------------

    async def _begin(
        self, request: web.Request, auth: tuple[str, ...]
    ) -> tuple[dict[str, Any], web.Response | None]:
        self.requests += 1
        body = await request.read()
        self.seen = Seen(request.method, request.raw_path, dict(request.headers), body)
        if not any(request.headers.get(h) for h in auth):
            return {}, _error_response(request, 401, "authentication_error", "missing API key")
        try:
            payload = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return {}, _error_response(request, 400, "invalid_request_error", "bad JSON")
        model = str(payload.get("model") or request.match_info.get("model", ""))
        if model == "fake-hang":
            await asyncio.sleep(3600)
        if model == "fake-error-500":
            return payload, _error_response(request, 500, "server_error", "fake failure")
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        return payload, None

    async def _sse(
        self,
        request: web.Request,
        events: Iterator[bytes],
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Cache-Control": "no-cache", **(headers or {})}
        )
        await response.prepare(request)
        try:
            # The cadence applies between text pieces only: providers send the closing events (finish,
            # usage, [DONE], message_stop) together, right after the last piece.
            pieces = self.config.chunks
            for index, event in enumerate(events):
                if 0 < index <= pieces and self.config.chunk_interval_s:
                    await asyncio.sleep(self.config.chunk_interval_s)
                await response.write(event)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_streams += 1
            raise
        return response

    # ---- OpenAI ------------------------------------------------------------------------------

    def _openai_usage(self, responses_shape: bool = False, images: int = 0) -> dict[str, Any]:
        """``images``: image parts in the request, reported as image tokens of the prompt."""
        u = self.config.usage
        image_tokens = {"image_tokens": images * u.openai_image_input} if images else {}
        if responses_shape:
            return {
                "input_tokens": u.openai_prompt,
                "input_tokens_details": {"cached_tokens": u.openai_cached, **image_tokens},
                "output_tokens": u.openai_completion,
                "output_tokens_details": {"reasoning_tokens": u.openai_reasoning},
                "total_tokens": u.openai_prompt + u.openai_completion,
            }
        return {
            "prompt_tokens": u.openai_prompt,
            "completion_tokens": u.openai_completion,
            "total_tokens": u.openai_prompt + u.openai_completion,
            "prompt_tokens_details": {"cached_tokens": u.openai_cached, "audio_tokens": 0, **image_tokens},
            "completion_tokens_details": {
                "reasoning_tokens": u.openai_reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("Authorization",))
        if error:
            return error
        model = _snapshot(str(payload.get("model", "")))
        with_usage = "nousage" not in model
        images = image_parts(payload.get("messages"))
        pieces = _pieces(self.config)
        headers = {"x-request-id": "req_fake_openai_0001", "openai-processing-ms": "12"}
        if not payload.get("stream"):
            body = {
                "id": "chatcmpl-fake0001",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(pieces),
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            if with_usage:
                body["usage"] = self._openai_usage(images=images)
            return web.Response(body=_pretty(body), content_type="application/json", headers=headers)
        options = payload.get("stream_options") or {}
        include_usage = with_usage and options.get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None, index: int) -> bytes:
            obj: dict[str, Any] = {
                "id": "chatcmpl-fake0001",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            obj["obfuscation"] = f"ob{index:04d}"
            return b"data: " + _compact(obj) + b"\n\n"

        def events() -> Iterator[bytes]:
            yield chunk({"role": "assistant", "content": "", "refusal": None}, None, 0)
            for i, piece in enumerate(pieces, 1):
                yield chunk({"content": piece}, None, i)
            yield chunk({}, "stop", len(pieces) + 1)
            if include_usage:
                final = {
                    "id": "chatcmpl-fake0001",
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": model,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": self._openai_usage(images=images),
                    "obfuscation": "obusage",
                }
                yield b"data: " + _compact(final) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await self._sse(request, events(), "text/event-stream; charset=utf-8", headers)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("Authorization",))
        if error:
            return error
        model = _snapshot(str(payload.get("model", "")))
        pieces = _pieces(self.config)
        usage = {"prompt_tokens": 50, "completion_tokens": 16, "total_tokens": 66}
        if not payload.get("stream"):
            body = {
                "id": "cmpl-fake0001",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "length"}
                ],
                "usage": usage,
            }
            return web.Response(body=_pretty(body), content_type="application/json")
        include_usage = (payload.get("stream_options") or {}).get("include_usage") is True

        def events() -> Iterator[bytes]:
            for i, piece in enumerate(pieces):
                obj: dict[str, Any] = {
                    "id": "cmpl-fake0001",
                    "object": "text_completion",
                    "created": CREATED,
                    "choices": [
                        {
                            "text": piece,
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": "length" if i == len(pieces) - 1 else None,
                        }
                    ],
                    "model": model,
                }
                if include_usage:
                    obj["usage"] = None
                yield b"data: " + _compact(obj) + b"\n\n"
            if include_usage:
                final = {
                    "id": "cmpl-fake0001",
                    "object": "text_completion",
                    "created": CREATED,
                    "choices": [],
                    "model": model,
                    "usage": usage,
                }
                yield b"data: " + _compact(final) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await self._sse(request, events(), "text/event-stream; charset=utf-8")

    def _response_object(
        self, model: str, status: str, text: str, with_usage: bool, images: int = 0
    ) -> dict[str, Any]:
        output = []
        if status == "completed":
            output = [
                {
                    "type": "message",
                    "id": "msg_fake0001",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
        return {
            "id": "resp_fake0001",
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": "medium", "summary": None},
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": self._openai_usage(responses_shape=True, images=images)
            if with_usage and status == "completed"
            else None,
            "user": None,
            "metadata": {},
        }

    async def _openai_responses(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("Authorization",))
        if error:
            return error
        model = _snapshot(str(payload.get("model", "")))
        with_usage = "nousage" not in model
        pieces = _pieces(self.config)
        text = "".join(pieces)
        images = image_parts(payload.get("input"))
        if not payload.get("stream"):
            body = self._response_object(model, "completed", text, with_usage, images)
            return web.Response(body=_pretty(body), content_type="application/json")

        def events() -> Iterator[bytes]:
            seq = 0

            def ev(kind: str, data: dict[str, Any]) -> bytes:
                nonlocal seq
                data = {"type": kind, "sequence_number": seq, **data}
                seq += 1
                return f"event: {kind}\n".encode() + b"data: " + _compact(data) + b"\n\n"

            yield ev(
                "response.created", {"response": self._response_object(model, "in_progress", "", with_usage)}
            )
            yield ev(
                "response.in_progress",
                {"response": self._response_object(model, "in_progress", "", with_usage)},
            )
            for piece in pieces:
                yield ev(
                    "response.output_text.delta",
                    {
                        "item_id": "msg_fake0001",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                        "logprobs": [],
                    },
                )
            yield ev(
                "response.output_text.done",
                {
                    "item_id": "msg_fake0001",
                    "output_index": 0,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                },
            )
            yield ev(
                "response.completed",
                {"response": self._response_object(model, "completed", text, with_usage, images)},
            )

        return await self._sse(request, events(), "text/event-stream; charset=utf-8")

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("Authorization",))
        if error:
            return error
        inputs = payload.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        vector = [0.25, -0.5, 0.125, 1.0]
        if payload.get("encoding_format") == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            encoded = vector
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encoded} for i in range(count)],
            "model": str(payload.get("model", "")),
            "usage": {
                "prompt_tokens": self.config.usage.openai_embedding_prompt,
                "total_tokens": self.config.usage.openai_embedding_prompt,
            },
        }
        return web.Response(body=_pretty(body), content_type="application/json")

    async def _openai_models(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.seen = Seen(request.method, request.path_qs, dict(request.headers), b"")
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

    async def _openai_images(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_images import openai_images

        return await openai_images(self, request)

    async def _vertex_generate(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_vertex import vertex_generate

        return await vertex_generate(self, request, stream=False)

    async def _vertex_stream(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_vertex import vertex_generate

        return await vertex_generate(self, request, stream=True)

    async def _vertex_count(self, request: web.Request) -> web.Response:
        from llmtally.testing.fake_vertex import vertex_count

        return await vertex_count(self, request)

    async def _vertex_claude(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_vertex import vertex_claude

        return await vertex_claude(self, request)

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_azure import azure_chat

        return await azure_chat(self, request)

    async def _bedrock_invoke(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_bedrock import bedrock_invoke

        return await bedrock_invoke(self, request, stream=False)

    async def _bedrock_stream(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_bedrock import bedrock_invoke

        return await bedrock_invoke(self, request, stream=True)

    async def _bedrock_converse(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_bedrock import bedrock_converse

        return await bedrock_converse(self, request, stream=False)

    async def _bedrock_converse_stream(self, request: web.Request) -> web.StreamResponse:
        from llmtally.testing.fake_bedrock import bedrock_converse

        return await bedrock_converse(self, request, stream=True)

    async def _bedrock_other(self, request: web.Request) -> web.Response:
        from llmtally.testing.fake_bedrock import bedrock_other

        return await bedrock_other(self, request)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen = Seen(request.method, request.raw_path, dict(request.headers), body)
        return web.Response(body=body, headers={"x-echo-length": str(len(body))})

    # ---- Anthropic ---------------------------------------------------------------------------

    def _anthropic_usage(self, output: int) -> dict[str, Any]:
        u = self.config.usage
        return {
            "input_tokens": u.anthropic_input,
            "cache_creation_input_tokens": u.anthropic_cache_write_5m + u.anthropic_cache_write_1h,
            "cache_read_input_tokens": u.anthropic_cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": u.anthropic_cache_write_5m,
                "ephemeral_1h_input_tokens": u.anthropic_cache_write_1h,
            },
            "output_tokens": output,
            "service_tier": "standard",
        }

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("x-api-key", "Authorization"))
        if error:
            return error
        return await self.anthropic_answer(request, payload, _snapshot(str(payload.get("model", ""))))

    async def anthropic_answer(
        self, request: web.Request, payload: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """A Messages API answer from ``model`` (also Claude on Vertex and Bedrock)."""
        with_usage = "nousage" not in model
        pieces = _pieces(self.config)
        thinking = bool(payload.get("thinking"))
        headers = {"request-id": "req_fake_anthropic_0001"}
        if not payload.get("stream"):
            content: list[dict[str, Any]] = []
            if thinking:
                content.append({"type": "thinking", "thinking": "Let me think.", "signature": "sig_fake"})
            content.append({"type": "text", "text": "".join(pieces)})
            body = {
                "id": "msg_fake0001",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": _with_server_tools(
                    payload, self._anthropic_usage(self.config.usage.anthropic_output)
                )
                if with_usage
                else None,
            }
            return web.Response(body=_compact(body), content_type="application/json", headers=headers)

        def ev(kind: str, data: dict[str, Any]) -> bytes:
            if kind == "ping":
                return b'event: ping\ndata: {"type": "ping"}\n\n'
            return f"event: {kind}\n".encode() + b"data: " + _compact({"type": kind, **data}) + b"\n\n"

        events = (ev(kind, data) for kind, data in self.anthropic_events(payload, model))
        return await self._sse(request, events, "text/event-stream; charset=utf-8", headers)

    def anthropic_events(self, payload: dict[str, Any], model: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """A streamed Messages answer's events as (type, fields): SSE for the direct API and Vertex,
        event-stream chunks for Bedrock."""
        with_usage = "nousage" not in model
        thinking = bool(payload.get("thinking"))
        start_usage = self._anthropic_usage(1) if with_usage else None
        message: dict[str, Any] = {
            "id": "msg_fake0001", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage,
        }  # fmt: skip
        yield "message_start", {"message": message}
        index = 0
        if thinking:
            yield "content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": ""}}
            yield "content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm."}}
            yield "content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": "s"}}
            yield "content_block_stop", {"index": 0}
            index = 1
        yield "content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}
        yield "ping", {}
        for piece in _pieces(self.config):
            yield "content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}}
        yield "content_block_stop", {"index": index}
        delta_usage: dict[str, Any] | None = None
        if with_usage:
            # Cumulative, repeating the input and cache fields as the real API does.
            full = _with_server_tools(payload, self._anthropic_usage(self.config.usage.anthropic_output))
            delta_usage = {k: full[k] for k in full if k not in ("cache_creation", "service_tier")}
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        yield "message_delta", {"delta": delta, "usage": delta_usage}
        yield "message_stop", {}

    async def _openai_input_tokens(self, request: web.Request) -> web.Response:
        _, error = await self._begin(request, ("Authorization",))
        if error:
            return error
        return web.json_response({"object": "response.input_tokens", "input_tokens": 77})

    async def _gemini_count(self, request: web.Request) -> web.Response:
        _, error = await self._begin(request, ("x-goog-api-key",))
        if error:
            return error
        return web.json_response(
            {"totalTokens": 33, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 33}]}
        )

    async def _anthropic_count(self, request: web.Request) -> web.Response:
        _, error = await self._begin(request, ("x-api-key", "Authorization"))
        if error:
            return error
        return web.json_response({"input_tokens": 42})

    # ---- Gemini ------------------------------------------------------------------------------

    def _gemini_usage(
        self, candidates: int, embedding: bool = False, images_in: int = 0, image_out: bool = False
    ) -> dict[str, Any]:
        u = self.config.usage
        if embedding:
            return {
                "promptTokenCount": u.gemini_embedding_prompt,
                "totalTokenCount": u.gemini_embedding_prompt,
            }
        meta: dict[str, Any] = {
            "promptTokenCount": u.gemini_prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": u.gemini_prompt + candidates + u.gemini_thoughts + u.gemini_tool_use_prompt,
            "cachedContentTokenCount": u.gemini_cached,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": u.gemini_prompt}],
            "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": u.gemini_cached}],
            "thoughtsTokenCount": u.gemini_thoughts,
        }
        if images_in:  # of the prompt, the images' (the count stays the same)
            image_in = images_in * u.gemini_image_input
            meta["promptTokensDetails"] = [
                {"modality": "TEXT", "tokenCount": u.gemini_prompt - image_in},
                {"modality": "IMAGE", "tokenCount": image_in},
            ]
        if image_out:  # an image model's answer: text and one image
            meta["candidatesTokenCount"] = candidates + u.gemini_image_output
            meta["totalTokenCount"] += u.gemini_image_output
            meta["candidatesTokensDetails"] = [
                {"modality": "TEXT", "tokenCount": candidates},
                {"modality": "IMAGE", "tokenCount": u.gemini_image_output},
            ]
        if u.gemini_tool_use_prompt:
            meta["toolUsePromptTokenCount"] = u.gemini_tool_use_prompt
        return meta

    def _gemini_chunk(
        self, model: str, text: str, finish: bool, candidates: int, payload: Any = None
    ) -> dict[str, Any]:
        """``payload``: the request; one asking for IMAGE output gets an image in its last chunk."""
        parts: list[dict[str, Any]] = [{"text": text}]
        image_out = finish and "IMAGE" in (get(payload, "generationConfig", "responseModalities") or ())
        if image_out:
            parts.append({"inlineData": {"mimeType": "image/png", "data": FAKE_PNG_B64}})
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = "STOP"
        obj: dict[str, Any] = {"candidates": [candidate]}
        if "nousage" not in model:
            images_in = sum(
                1
                for content in get(payload, "contents") or ()
                for part in get(content, "parts") or ()
                if isinstance(part, dict) and "inlineData" in part
            )
            obj["usageMetadata"] = self._gemini_usage(candidates, images_in=images_in, image_out=image_out)
        obj["modelVersion"] = model
        obj["responseId"] = "fake-gemini-0001"
        return obj

    async def _gemini_generate(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("x-goog-api-key",))
        if error:
            return error
        model = request.match_info["model"]
        text = "".join(_pieces(self.config))
        body = self._gemini_chunk(model, text, True, self.config.usage.gemini_candidates, payload)
        return web.Response(body=_pretty(body), content_type="application/json", charset="UTF-8")

    async def _gemini_stream(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("x-goog-api-key",))
        if error:
            return error
        model = request.match_info["model"]
        pieces = _pieces(self.config)
        total = self.config.usage.gemini_candidates
        # Cumulative usage: candidates grow chunk by chunk and end at the total.
        counts = [total * (i + 1) // len(pieces) for i in range(len(pieces))]
        chunks = [
            self._gemini_chunk(model, piece, i == len(pieces) - 1, counts[i], payload)
            for i, piece in enumerate(pieces)
        ]
        if request.query.get("alt") == "sse":
            events = (b"data: " + _compact(c) + b"\r\n\r\n" for c in chunks)
            return await self._sse(request, events, "text/event-stream")

        def array() -> Iterator[bytes]:
            for i, c in enumerate(chunks):
                yield (b"[" if i == 0 else b",\r\n") + _pretty(c)
            yield b"]"

        return await self._sse(request, array(), "application/json; charset=UTF-8")

    async def _gemini_embed(self, request: web.Request) -> web.StreamResponse:
        _, error = await self._begin(request, ("x-goog-api-key",))
        if error:
            return error
        body = {"embedding": {"values": [0.25, -0.5, 0.125, 1.0]}}
        return web.Response(body=_pretty(body), content_type="application/json", charset="UTF-8")

    async def _gemini_batch_embed(self, request: web.Request) -> web.StreamResponse:
        payload, error = await self._begin(request, ("x-goog-api-key",))
        if error:
            return error
        model = request.match_info["model"]
        n = len(payload.get("requests") or [])
        body: dict[str, Any] = {"embeddings": [{"values": [0.25, -0.5, 0.125, 1.0]} for _ in range(n)]}
        if "nousage" not in model:
            body["usageMetadata"] = self._gemini_usage(0, embedding=True)
        return web.Response(body=_pretty(body), content_type="application/json", charset="UTF-8")

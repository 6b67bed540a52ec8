"""OpenAI's Images API, for the fake upstream: ``/v1/images/generations`` (JSON) and
``/v1/images/edits`` (``multipart/form-data``, the images as file parts), streamed and not; also under
Azure OpenAI's ``/openai/deployments/{d}/images/…`` (``api-key`` auth, the deployment's model).

As the API answers GPT Image models: a body with ``created``, ``data`` and token ``usage`` (no
``model``); ``gpt-image-1`` / ``gpt-image-1-mini`` report no ``output_tokens_details`` (all output
tokens are image tokens), later models split image and text output. ``stream=true`` answers SSE
``image_generation.partial_image`` events (``partial_images`` of them) and one
``image_generation.completed`` with the usage (``image_edit.*`` for edits), no ``[DONE]``. A model
containing ``nousage`` (or ``dall-e``) gets no usage, as DALL·E answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from llmtally.testing.fake_upstream import CREATED, FAKE_PNG_B64, Seen, _error_response

if TYPE_CHECKING:
    from llmtally.testing.fake_upstream import FakeUpstream

#: Models whose usage has no ``output_tokens_details`` (every output token is an image token).
IMAGE_ONLY_OUTPUT = ("gpt-image-1", "gpt-image-1-mini")


async def openai_images(fake: FakeUpstream, request: web.Request) -> web.StreamResponse:
    fake.requests += 1
    edit = request.path.endswith("/edits")
    fields: dict[str, Any]
    images = 0
    if edit:
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        images = sum(1 for v in form.values() if not isinstance(v, str))
        body = b""
    else:
        body = await request.read()
        try:
            fields = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error_response(request, 400, "invalid_request_error", "bad JSON")
    fake.seen = Seen(request.method, request.raw_path, dict(request.headers), body)
    if not (request.headers.get("Authorization") or request.headers.get("api-key")):
        return _error_response(request, 401, "authentication_error", "missing API key")
    model = str(fields.get("model") or "dall-e-2")
    deployment = request.match_info.get("deployment")
    if deployment is not None:  # Azure OpenAI: the deployment's model answers
        from llmtally.testing.fake_azure import DEPLOYMENTS

        model = DEPLOYMENTS.get(deployment, model)
    if model == "fake-error-500":
        return _error_response(request, 500, "server_error", "fake failure")
    usage = None if "nousage" in model or model.startswith("dall-e") else image_usage(fake, model, images)
    stream = fields.get("stream") in (True, "true")
    if not stream:
        answer: dict[str, Any] = {
            "created": CREATED,
            "background": "opaque",
            "data": [{"b64_json": FAKE_PNG_B64}],
            "output_format": "png",
            "quality": "medium",
            "size": "1024x1024",
        }
        if usage is not None:
            answer["usage"] = usage
        return web.Response(
            body=orjson.dumps(answer, option=orjson.OPT_INDENT_2), content_type="application/json"
        )
    kind = "image_edit" if edit else "image_generation"
    partials = int(fields.get("partial_images") or 0)

    def events() -> Iterator[bytes]:
        common = {
            "b64_json": FAKE_PNG_B64, "background": "opaque", "created_at": CREATED, "output_format": "png",
            "quality": "medium", "size": "1024x1024",
        }  # fmt: skip
        for index in range(partials):
            event = {"type": f"{kind}.partial_image", **common, "partial_image_index": index}
            yield f"event: {kind}.partial_image\n".encode() + b"data: " + orjson.dumps(event) + b"\n\n"
        done: dict[str, Any] = {"type": f"{kind}.completed", **common}
        if usage is not None:  # the event's usage has no output details: its output is the image's
            details = usage.get("output_tokens_details") or {}
            done["usage"] = {
                k: v
                for k, v in usage.items()
                if k not in ("output_tokens_details", "output_tokens", "total_tokens")
            }
            out = details.get("image_tokens", usage["output_tokens"])
            done["usage"] |= {"output_tokens": out, "total_tokens": usage["input_tokens"] + out}
        yield f"event: {kind}.completed\n".encode() + b"data: " + orjson.dumps(done) + b"\n\n"

    return await fake._sse(request, events(), "text/event-stream; charset=utf-8")


def image_usage(fake: FakeUpstream, model: str, images: int) -> dict[str, Any]:
    """The Images API's usage: text and input-image tokens in, image (and text) tokens out."""
    u = fake.config.usage
    image_in = images * u.images_image_input
    text_out = 0 if model in IMAGE_ONLY_OUTPUT else u.images_output_text
    output = u.images_output + text_out
    usage: dict[str, Any] = {
        "input_tokens": u.images_text_input + image_in,
        "input_tokens_details": {"image_tokens": image_in, "text_tokens": u.images_text_input},
        "output_tokens": output,
        "total_tokens": u.images_text_input + image_in + output,
    }
    if model not in IMAGE_ONLY_OUTPUT:
        usage["output_tokens_details"] = {"image_tokens": u.images_output, "text_tokens": text_out}
    return usage

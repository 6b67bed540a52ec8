"""OpenAI: chat completions, responses, completions, embeddings and image generation / edits.

Usage mapping (already OTel-shaped): ``prompt_tokens``/``input_tokens`` include cached, audio and
image tokens; ``completion_tokens``/``output_tokens`` include reasoning, audio and image tokens. The
Images API's ``output_tokens`` are image tokens unless ``output_tokens_details`` splits them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.parser import BytesHeaderParser
from typing import Any

import orjson

from llmtally.providers.base import (
    Endpoint,
    MeteredRequest,
    Refusal,
    ResponseSummary,
    as_int,
    as_list,
    first_count,
    get_path,
    json_refusal,
    parse_object,
    read_usage,
)
from llmtally.providers.batch import BATCH, BatchDownload, BatchResult
from llmtally.providers.streams import SSESplitter
from llmtally.record import Provider, TokenUsage

#: Metered paths and their endpoints (made once: a route is looked up on every call).
_ROUTES = {
    path: Endpoint(provider="openai", name=name)
    for path, name in {
        "v1/chat/completions": "chat.completions",
        "v1/responses": "responses",
        "v1/completions": "completions",
        "v1/embeddings": "embeddings",
        "v1/images/generations": "images.generations",
        "v1/images/edits": "images.edits",
    }.items()
}
#: The Images API: usage in the response (or its ``*.completed`` stream event), no ``model`` in it.
_IMAGES = frozenset({"images.generations", "images.edits"})
#: Endpoints whose streams report usage only when asked with stream_options.include_usage.
_USAGE_OPT_IN = frozenset({"chat.completions", "completions"})
_INJECTED = b'"stream_options":{"include_usage":true}'
_USAGE_NULL_FORMS = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')


def usage_from_openai(usage: Any, images: bool = False) -> TokenUsage | None:
    """Map an OpenAI ``usage`` object (chat/completions/embeddings, responses or ``images`` shape)."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:  # Responses API
        input_tokens = as_int(usage.get("input_tokens"))
        output_tokens = as_int(usage.get("output_tokens"))
        in_details, out_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
    else:
        input_tokens = as_int(usage.get("prompt_tokens"))
        output_tokens = as_int(usage.get("completion_tokens"))
        in_details, out_details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    reasoning = get_path(out_details, "reasoning_tokens")
    image_out = get_path(out_details, "image_tokens")
    if images and not isinstance(out_details, dict):  # gpt-image-1: every output token is image
        image_out = output_tokens
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=as_int(get_path(in_details, "cached_tokens")),
        reasoning_tokens=as_int(reasoning) if reasoning is not None else None,
        input_audio_tokens=as_int(get_path(in_details, "audio_tokens")),
        output_audio_tokens=as_int(get_path(out_details, "audio_tokens")),
        input_image_tokens=as_int(get_path(in_details, "image_tokens")),
        output_image_tokens=as_int(image_out),
    )


def error_from_body(obj: Any) -> str | None:
    """A short, key-free description of an OpenAI-style error body (messages may echo key prefixes)."""
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        kind = err.get("type") or err.get("code") or "error"
        return f"upstream error: {kind}"
    return None


class OpenAIAdapter:
    name: Provider = "openai"
    request_id_header: str | None = "x-request-id"
    usage_headers: tuple[str, ...] = ()

    def route(self, subpath: str) -> Endpoint | None:
        return _ROUTES.get(subpath.rstrip("/"))

    def prepare(
        self, endpoint: Endpoint, body: bytes, query: Mapping[str, str], inject_stream_usage: bool
    ) -> MeteredRequest:
        payload: dict[str, Any] | MeteredRequest
        if endpoint.name == "images.edits" and body.startswith(b"--"):
            payload = form_fields(body, ("model", "stream"))  # multipart/form-data, the SDK's form
            payload["stream"] = payload.get("stream") == "true"
        else:
            payload = parse_object(endpoint, body)
        if isinstance(payload, MeteredRequest):
            return payload  # forwarded as is; the record says why it could not be read
        model = payload.get("model")
        stream = payload.get("stream") is True
        request = MeteredRequest(
            endpoint=endpoint,
            body=body,
            model=model if isinstance(model, str) else None,
            stream=stream,
            payload=payload,
            stream_format="sse" if stream else None,
            service_tier=_str_or_none(payload.get("service_tier")),
        )
        if stream and inject_stream_usage and endpoint.name in _USAGE_OPT_IN:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                request.body = _inject_include_usage(body, payload)
                request.injected_usage = True
        return request

    def parse_response(self, request: MeteredRequest, body: bytes) -> ResponseSummary:
        summary = ResponseSummary(complete=True)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            summary.error = f"response body is not JSON: {exc}"
            return summary
        if not isinstance(obj, dict):
            summary.error = "response body is not a JSON object"
            return summary
        return _summary_of(request.endpoint.name, obj, summary)

    def max_output_tokens(self, request: MeteredRequest) -> int | None:
        if request.endpoint.name in ("embeddings", "moderations"):
            return 0
        if request.endpoint.name in _IMAGES:
            return None  # image tokens follow size and quality, not a max_tokens
        return first_count(
            request.payload, ("max_completion_tokens",), ("max_output_tokens",), ("max_tokens",)
        )

    def refusal(self, status: int, message: str) -> Refusal:
        kind = "rate_limit_exceeded" if status == 429 else "server_error"
        return json_refusal({"error": {"message": message, "type": kind, "param": None, "code": kind}})

    def usage_from_headers(self, headers: Mapping[str, str]) -> TokenUsage | None:
        return None  # the body carries the usage

    def batch_route(self, subpath: str) -> BatchDownload | None:
        """``GET v1/files/{id}/content``: any file's content, a batch's output or error file among
        them (only lines shaped as batch results are metered). The lines do not name their batch:
        ``batch_id`` is the file's id (one output file per batch)."""
        match = _FILE_CONTENT.match(subpath)
        if match is None:
            return None
        return BatchDownload("jsonl", _BATCH, match.group(1), read_line=batch_result)

    def stream_parser(self, request: MeteredRequest) -> _OpenAIStreamParser:
        return _OpenAIStreamParser(request)

    def stream_editor(self, request: MeteredRequest) -> _InjectedUsageHider | None:
        return _InjectedUsageHider() if request.injected_usage else None

    def endpoint_for_request(self, payload: dict[str, Any], model: str | None) -> Endpoint:
        if "messages" in payload:
            name = "chat.completions"
        elif "prompt" in payload:
            name = "completions"
        elif "input" in payload and str(payload.get("model", model or "")).startswith("text-embedding"):
            name = "embeddings"
        else:
            name = "responses"
        return Endpoint(provider="openai", name=name)

    def endpoint_for_response(self, obj: Any, stream: bool, model: str | None) -> Endpoint:
        return Endpoint(provider="openai", name=endpoint_name_of(obj))


def endpoint_name_of(obj: Any) -> str:
    """The endpoint a response object (or first stream event) belongs to."""
    kind = obj.get("object") if isinstance(obj, dict) else None
    event = obj.get("type") if isinstance(obj, dict) else None
    if kind == "response" or (isinstance(event, str) and event.startswith("response.")):
        return "responses"
    if kind == "text_completion":
        return "completions"
    if kind == "list" or kind == "embedding":
        return "embeddings"
    if isinstance(event, str) and event.startswith(("image_generation.", "image_edit.")):
        return "images.edits" if event.startswith("image_edit.") else "images.generations"
    if kind is None and isinstance(obj, dict) and "created" in obj and "choices" not in obj:
        return "images.generations"  # an ImagesResponse: {created, data, usage}, no ``object``
    return "chat.completions"


def _summary_of(endpoint: str, obj: dict[str, Any], summary: ResponseSummary) -> ResponseSummary:
    """A complete response object's summary (``obj``: a chat completion, response, embedding list …)."""
    summary.error = error_from_body(obj)
    summary.model = _str_or_none(obj.get("model"))
    summary.service_tier = _str_or_none(obj.get("service_tier"))
    summary.usage = read_usage(summary, lambda: usage_from_openai(obj.get("usage"), endpoint in _IMAGES))
    summary.line_items = line_items_from_responses(obj)
    if endpoint == "embeddings" and summary.usage is not None:
        summary.usage = TokenUsage(input_tokens=summary.usage.input_tokens)
    return summary


_FILE_CONTENT = re.compile(r"^v1/files/([^/]+)/content/?$")
_BATCH = Endpoint(provider="openai", name=BATCH)


def batch_result(line: Any) -> BatchResult | None:
    """One line of a batch output or error file: ``{"id", "custom_id", "response": {"status_code",
    "request_id", "body"}, "error"}``; None for a line of any other file (a batch's input lines have
    ``method``/``url``/``body`` and no ``response``)."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or "response" not in line:
        return None
    response = line.get("response")
    summary = ResponseSummary(complete=True)
    result = BatchResult(summary, custom_id=line["custom_id"], status=None)
    if isinstance(response, dict):
        status = response.get("status_code")
        result.status = status if isinstance(status, int) and not isinstance(status, bool) else None
        summary.upstream_request_id = _str_or_none(response.get("request_id"))
        body = response.get("body")
        if isinstance(body, dict):
            result.endpoint = endpoint_name_of(body)
            _summary_of(result.endpoint, body, summary)
    error = line.get("error")
    if isinstance(error, dict) and summary.error is None:
        summary.error = f"batch request failed: {error.get('code') or 'error'}"
    return result


def form_fields(body: bytes, names: tuple[str, ...]) -> dict[str, Any]:
    """The text fields ``names`` of a ``multipart/form-data`` body (an image edit's ``model``,
    ``stream``), without reading its files: the body is cut at its boundary line (the first line,
    RFC 2046) and only the small parts' headers are parsed, by the standard library's parser."""
    delimiter = body[: body.find(b"\r\n")]
    fields: dict[str, Any] = {}
    if len(delimiter) < 3 or len(delimiter) > 72:
        return fields
    for part in body.split(b"\r\n" + delimiter):
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep or len(value) > 1024 or b"filename=" in head:
            continue
        headers = BytesHeaderParser().parsebytes(head.removeprefix(delimiter).lstrip(b"\r\n"))
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str) and name in names and name not in fields:
            fields[name] = value.decode("utf-8", "replace")
    return fields


def _inject_include_usage(body: bytes, payload: dict[str, Any]) -> bytes:
    """Ask for usage in the stream, editing the bytes rather than re-encoding the body."""
    if "stream_options" not in payload:
        start = body.find(b"{")
        rest = body[start + 1 :]
        sep = b"" if rest.lstrip().startswith(b"}") else b","
        return body[: start + 1] + _INJECTED + sep + rest
    # The client set other stream options: merge (re-encoding is unavoidable here).
    options = dict(payload["stream_options"]) if isinstance(payload["stream_options"], dict) else {}
    options["include_usage"] = True
    return orjson.dumps({**payload, "stream_options": options})


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _OpenAIStreamParser:
    """Parses an OpenAI SSE stream for its usage and text (:class:`_InjectedUsageHider` edits it)."""

    __slots__ = ("_endpoint", "_kept", "_splitter", "summary")

    def __init__(self, request: MeteredRequest) -> None:
        self._endpoint = request.endpoint.name
        self._splitter = SSESplitter()
        self._kept = [0]
        self.summary = ResponseSummary()

    def feed(self, chunk: bytes) -> None:
        for event in self._splitter.feed(chunk):
            self._on_event(event.event, event.data)

    def finish(self) -> ResponseSummary:
        events, _ = self._splitter.finish()
        for event in events:
            self._on_event(event.event, event.data)
        return self.summary

    def _on_event(self, event: str | None, data: str | None) -> Any:
        """Update the summary; return the parsed chunk object (or None)."""
        if data is None:
            return None
        if data == "[DONE]":
            self.summary.complete = True
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.summary.error = "stream chunk is not JSON"
            return None
        if not isinstance(obj, dict):
            return None
        summary = self.summary
        if self._endpoint == "responses":
            self._on_responses_event(obj)
            return obj
        if self._endpoint in _IMAGES:
            self._on_images_event(obj)
            return obj
        if "error" in obj:
            summary.error = error_from_body(obj)
        model = obj.get("model")
        if isinstance(model, str):
            summary.model = model
        tier = obj.get("service_tier")
        if isinstance(tier, str):
            summary.service_tier = tier
        usage = read_usage(summary, lambda: usage_from_openai(obj.get("usage")))
        if usage is not None:
            summary.usage = usage
        for choice in as_list(obj.get("choices")):
            if not isinstance(choice, dict):
                continue
            if "text" in choice:  # legacy completions
                self._keep(choice.get("text"))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._keep(delta.get("content"))
                self._keep(delta.get("refusal"))
                for call in as_list(delta.get("tool_calls")):
                    self._keep(get_path(call, "function", "arguments"))
        return obj

    def _on_responses_event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            self._keep(obj.get("delta"))
            return
        response = obj.get("response")
        if isinstance(response, dict):
            if isinstance(response.get("model"), str):
                self.summary.model = response["model"]
            if isinstance(response.get("service_tier"), str):
                self.summary.service_tier = response["service_tier"]
            usage = read_usage(self.summary, lambda: usage_from_openai(response.get("usage")))
            if usage is not None:
                self.summary.usage = usage
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.summary.line_items = line_items_from_responses(response)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.summary.complete = True
            if kind == "response.failed":
                err = get_path(obj, "response", "error", "code")
                self.summary.error = f"upstream error: {err or 'response.failed'}"
        elif kind == "error":
            self.summary.error = f"upstream error: {obj.get('code') or 'error'}"

    def _on_images_event(self, obj: dict[str, Any]) -> None:
        """``image_generation.partial_image`` … ``image_generation.completed`` (``image_edit.*`` for
        edits): the completed event carries the usage; there is no ``[DONE]``."""
        kind = obj.get("type")
        if isinstance(kind, str) and kind.endswith(".completed"):
            usage = read_usage(self.summary, lambda: usage_from_openai(obj.get("usage"), images=True))
            if usage is not None:
                self.summary.usage = usage
            self.summary.complete = True
        elif kind == "error" or "error" in obj:
            self.summary.error = error_from_body(obj) or f"upstream error: {obj.get('code') or 'error'}"

    def _keep(self, text: Any) -> None:
        if isinstance(text, str):
            self.summary.keep_text(text, self._kept)


#: Responses API output items billed per call (beyond their tokens), by the item each is billed as.
_BILLED_CALLS = {"web_search_call": "web_search", "file_search_call": "file_search"}


def line_items_from_responses(response: Any) -> dict[str, int]:
    """Hosted tool calls in a Responses ``output``: each ``web_search_call`` / ``file_search_call``."""
    counts: dict[str, int] = {}
    for item in as_list(get_path(response, "output")):
        billed = _BILLED_CALLS.get(str(item.get("type"))) if isinstance(item, dict) else None
        if billed is not None:
            counts[billed] = counts.get(billed, 0) + 1
    return counts


class _InjectedUsageHider:
    """Removes from an OpenAI stream what the ``include_usage`` injection added, so the client gets the
    stream it asked for: each chunk's ``"usage":null`` member and the final usage-only chunk.

    It edits bytes and parses only an event that carries a usage object (the last one): forwarding the
    stream costs a few byte searches per read, not a JSON parse per event on the proxy's event loop.
    The unedited stream is metered separately. Only whole events go out; a partial one waits for its
    end. In a JSON chunk an unescaped ``"usage":null`` can only be a member (a string's quotes are
    escaped), and chat chunks have no nested ``usage``.
    """

    __slots__ = ("_held", "_splitter")

    def __init__(self) -> None:
        self._held = b""
        #: After the first CR (OpenAI sends LF): the general WHATWG framing from then on.
        self._splitter: SSESplitter | None = None

    def feed(self, chunk: bytes) -> bytes:
        buf = self._held + chunk if self._held else chunk
        if self._splitter is None and b"\r" in buf:
            self._splitter, self._held = SSESplitter(keep_raw=True), b""
        if self._splitter is not None:
            return b"".join(_hide(event.raw, event.data) for event in self._splitter.feed(buf))
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._held = buf
            return b""
        whole, self._held = buf[: cut + 2], buf[cut + 2 :]
        if b'"usage"' not in whole:
            return whole
        return b"".join(_hide(event + b"\n\n") for event in whole[:-2].split(b"\n\n"))

    def finish(self) -> bytes:
        """End of stream: an unterminated last event, edited like the rest."""
        if self._splitter is None:
            held, self._held = self._held, b""
            return _hide(held) if held else b""
        events, tail = self._splitter.finish()
        out = b"".join(_hide(event.raw, event.data) for event in events if event.raw)
        if tail:
            last = [event.data for event in events if not event.raw]
            out += _hide(tail, last[-1] if last else None)
        return out


def _hide(raw: bytes, data: str | None = None) -> bytes:
    """An event's bytes without what the injection added (``data``: its data, when already split)."""
    if b'"usage"' not in raw:
        return raw
    for form in _USAGE_NULL_FORMS:
        if form in raw:
            return raw.replace(form, b"", 1)
    if data is None:
        splitter = SSESplitter()
        events = splitter.feed(raw) + splitter.finish()[0]
        data = events[0].data if events else None
    if data is None:
        return raw
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return raw
    if isinstance(obj, dict) and obj.get("usage") is not None and obj.get("choices") == []:
        return b""  # the usage-only chunk the injection added
    return raw

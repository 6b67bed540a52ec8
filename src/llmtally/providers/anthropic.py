"""Anthropic: the Messages API, streamed and not.

Usage mapping: Anthropic's ``input_tokens`` excludes cache writes and reads, so
``input = input_tokens + cache_creation_input_tokens + cache_read_input_tokens``. In a stream,
``message_start.message.usage`` is the base and each ``message_delta.usage`` is cumulative and may
repeat input and cache fields: later values replace earlier ones, they are never added.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from llmtally.providers.base import (
    Endpoint,
    MeteredRequest,
    Refusal,
    ResponseSummary,
    as_int,
    count_of,
    first_count,
    get_path,
    json_refusal,
    parse_object,
    read_usage,
)
from llmtally.providers.batch import BATCH, BatchDownload, BatchResult
from llmtally.providers.streams import SSESplitter
from llmtally.record import Provider, TokenUsage

#: The metered endpoint (made once: a route is looked up on every call).
_MESSAGES = Endpoint(provider="anthropic", name="messages")


def usage_from_anthropic(usage: Any) -> TokenUsage | None:
    if not isinstance(usage, dict):
        return None
    cache_write = as_int(usage.get("cache_creation_input_tokens"))
    cache_read = as_int(usage.get("cache_read_input_tokens"))
    write_1h = as_int(get_path(usage, "cache_creation", "ephemeral_1h_input_tokens"))
    return TokenUsage(
        input_tokens=as_int(usage.get("input_tokens")) + cache_write + cache_read,
        output_tokens=as_int(usage.get("output_tokens")),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=min(write_1h, cache_write) if cache_write else write_1h,
        reasoning_tokens=None,  # thinking is billed inside output_tokens and not reported apart
    )


def line_items_from_anthropic(usage: Any) -> dict[str, int]:
    """Server tools billed per use: ``usage.server_tool_use.web_search_requests`` / ``web_fetch_requests``."""
    tools = get_path(usage, "server_tool_use")
    if not isinstance(tools, dict):
        return {}
    counts = {
        "web_search": count_of(tools.get("web_search_requests")),
        "web_fetch": count_of(tools.get("web_fetch_requests")),
    }
    return {item: n for item, n in counts.items() if n}


def _error(obj: Any) -> str | None:
    if isinstance(obj, dict) and obj.get("type") == "error":
        kind = get_path(obj, "error", "type")
        return f"upstream error: {kind or 'error'}"
    return None


class AnthropicAdapter:
    name: Provider = "anthropic"
    request_id_header: str | None = "request-id"
    usage_headers: tuple[str, ...] = ()

    def route(self, subpath: str) -> Endpoint | None:
        return _MESSAGES if subpath.rstrip("/") == "v1/messages" else None

    def prepare(
        self, endpoint: Endpoint, body: bytes, query: Mapping[str, str], inject_stream_usage: bool
    ) -> MeteredRequest:
        payload = parse_object(endpoint, body)
        if isinstance(payload, MeteredRequest):
            return payload  # forwarded as is; the record says why it could not be read
        model = payload.get("model")
        stream = payload.get("stream") is True
        tier = payload.get("service_tier")
        geo = payload.get("inference_geo")
        return MeteredRequest(
            endpoint=endpoint,
            body=body,
            model=model if isinstance(model, str) else None,
            stream=stream,
            payload=payload,
            stream_format="sse" if stream else None,
            service_tier=tier if isinstance(tier, str) else None,
            inference_geo=geo if isinstance(geo, str) else None,
        )

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
        return _summary_of(obj, summary)

    def max_output_tokens(self, request: MeteredRequest) -> int | None:
        return first_count(request.payload, ("max_tokens",))  # thinking's budget is inside it

    def refusal(self, status: int, message: str) -> Refusal:
        kind = "rate_limit_error" if status == 429 else "overloaded_error"
        return json_refusal({"type": "error", "error": {"type": kind, "message": message}})

    def usage_from_headers(self, headers: Mapping[str, str]) -> TokenUsage | None:
        return None  # the body carries the usage

    def batch_route(self, subpath: str) -> BatchDownload | None:
        """``GET v1/messages/batches/{id}/results``: one result per line, every line a result; and
        ``GET v1/messages/batches[/{id}]``, whose ``results_url`` is relinked through the proxy."""
        match = _BATCH_RESULTS.match(subpath)
        if match is not None:
            return BatchDownload("jsonl", _BATCH, match.group(1), read_line=batch_result, results_only=True)
        if _BATCH_INFO.match(subpath):  # its results_url names the upstream: point it at the proxy
            return BatchDownload("relink", _BATCH, None)
        return None

    def stream_parser(self, request: MeteredRequest) -> _AnthropicStreamParser:
        return _AnthropicStreamParser()

    def stream_editor(self, request: MeteredRequest) -> None:
        return None  # streams are forwarded as they come

    def endpoint_for_request(self, payload: dict[str, Any], model: str | None) -> Endpoint:
        return Endpoint(provider="anthropic", name="messages")

    def endpoint_for_response(self, obj: Any, stream: bool, model: str | None) -> Endpoint:
        return Endpoint(provider="anthropic", name="messages")


def _summary_of(obj: dict[str, Any], summary: ResponseSummary) -> ResponseSummary:
    """A complete Message's summary."""
    summary.error = _error(obj)
    if isinstance(obj.get("model"), str):
        summary.model = obj["model"]
    usage = obj.get("usage")
    summary.usage = read_usage(summary, lambda: usage_from_anthropic(usage))
    summary.line_items = line_items_from_anthropic(usage)
    tier = get_path(usage, "service_tier")
    summary.service_tier = tier if isinstance(tier, str) else None
    geo = get_path(usage, "inference_geo")
    summary.inference_geo = geo if isinstance(geo, str) else None
    return summary


_BATCH_RESULTS = re.compile(r"^v1/messages/batches/([^/]+)/results/?$")
#: A batch (retrieve) or the list of batches: each with its ``results_url``.
_BATCH_INFO = re.compile(r"^v1/messages/batches(?:/[^/]+)?/?$")
_BATCH = Endpoint(provider="anthropic", name=BATCH)
#: An errored batch request's error type → the HTTP status the same error has on the Messages API.
_ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}  # fmt: skip


def batch_result(line: Any) -> BatchResult | None:
    """One line of a batch's results: ``{"custom_id", "result": {"type": "succeeded", "message"}}``,
    or ``errored`` (with the error), ``canceled``, ``expired``: not billed, so no usage and no cost;
    ``status`` is the errored request's HTTP status (by its error type), None for the others."""
    if not isinstance(line, dict):
        return None
    custom_id = line.get("custom_id")
    result = line.get("result")
    kind = get_path(result, "type")
    summary = ResponseSummary(complete=True)
    batch = BatchResult(summary, custom_id=custom_id if isinstance(custom_id, str) else None)
    batch.endpoint = "messages"
    if kind == "succeeded":
        message = get_path(result, "message")
        if isinstance(message, dict):
            _summary_of(message, summary)
        else:
            summary.error = "batch result has no message"
        return batch
    if kind == "errored":
        error_type = get_path(result, "error", "error", "type")
        batch.status = _ERROR_STATUS.get(error_type) if isinstance(error_type, str) else None
        summary.error = f"batch request errored: {error_type or 'error'}"
    elif isinstance(kind, str):
        batch.status = None
        summary.error = f"batch request {kind}: not billed"
    else:
        batch.status = None
        summary.error = "not a batch result line"
    return batch


class _AnthropicStreamParser:
    __slots__ = ("_kept", "_splitter", "_usage", "summary")

    def __init__(self) -> None:
        self._splitter = SSESplitter()
        self._usage: dict[str, Any] = {}
        self._kept = [0]
        self.summary = ResponseSummary()

    def feed(self, chunk: bytes) -> None:
        for event in self._splitter.feed(chunk):
            self._on_data(event.data)

    def finish(self) -> ResponseSummary:
        events, _ = self._splitter.finish()
        for event in events:
            self._on_data(event.data)
        return self.summary

    def _on_data(self, data: str | None) -> None:
        if not data:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.summary.error = "stream event is not JSON"
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        summary = self.summary
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    text = delta.get(key)
                    if isinstance(text, str):
                        summary.keep_text(text, self._kept)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    summary.model = message["model"]
                self._merge_usage(message.get("usage"))
        elif kind == "message_delta":
            self._merge_usage(obj.get("usage"))
        elif kind == "message_stop":
            summary.complete = True
        elif kind == "error":
            summary.error = _error(obj)

    def _merge_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        # Cumulative: a later non-null value replaces the earlier one.
        for key, value in usage.items():
            if value is not None:
                self._usage[key] = value
        self.summary.usage = read_usage(self.summary, lambda: usage_from_anthropic(self._usage))
        self.summary.line_items = line_items_from_anthropic(self._usage)
        tier = self._usage.get("service_tier")
        if isinstance(tier, str):
            self.summary.service_tier = tier
        geo = self._usage.get("inference_geo")
        if isinstance(geo, str):
            self.summary.inference_geo = geo

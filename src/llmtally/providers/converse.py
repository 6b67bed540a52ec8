"""Amazon Bedrock's Converse API (Converse, ConverseStream): one request and response shape for every
Bedrock model, and so a dialect of its own.

Reached only through the Bedrock platform (``/bedrock/model/{modelId}/converse``): the model is the
URL's, the body never names it. Usage mapping: Converse's ``inputTokens`` excludes cache reads and
writes, so ``input = inputTokens + cacheReadInputTokens + cacheWriteInputTokens``; ``outputTokens``
includes any reasoning (not reported apart). A ConverseStream's events reach the stream parser as SSE
events named by their event-stream type (the platform undoes the framing): ``contentBlockDelta`` for
text, ``metadata`` for the usage, ``messageStop`` for the end, an exception as ``error``.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from llmtally.providers.streams import SSESplitter
from llmtally.record import Provider, TokenUsage

CONVERSE = Endpoint(provider="converse", name="converse")
CONVERSE_STREAM = Endpoint(provider="converse", name="converse-stream", always_stream=True)


def usage_from_converse(usage: Any) -> TokenUsage | None:
    if not isinstance(usage, dict):
        return None
    read = as_int(usage.get("cacheReadInputTokens"))
    write = as_int(usage.get("cacheWriteInputTokens"))
    return TokenUsage(
        input_tokens=as_int(usage.get("inputTokens")) + read + write,
        output_tokens=as_int(usage.get("outputTokens")),
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=None,
    )


def _tier(payload: Mapping[str, Any]) -> str | None:
    tier = get_path(payload, "serviceTier", "type")
    return tier if isinstance(tier, str) else None


def aws_refusal(status: int, message: str) -> Refusal:
    """An error in AWS's JSON protocol shape: botocore reads its code from ``x-amzn-ErrorType``
    (ThrottlingException: retried, then raised as ``ClientError``), the message from the body."""
    kind = "ThrottlingException" if status == 429 else "ServiceUnavailableException"
    return json_refusal(
        {"message": message},
        ("x-amzn-ErrorType", f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
    )


class ConverseAdapter:
    name: Provider = "converse"
    request_id_header: str | None = "x-amzn-RequestId"
    usage_headers: tuple[str, ...] = ()

    def batch_route(self, subpath: str) -> None:
        return None  # Bedrock batch inference writes its results to S3, not through the API

    def route(self, subpath: str) -> Endpoint | None:
        return None  # only the Bedrock platform routes here (the model is in its URL)

    def prepare(
        self, endpoint: Endpoint, body: bytes, query: Mapping[str, str], inject_stream_usage: bool
    ) -> MeteredRequest:
        payload = parse_object(endpoint, body)
        if isinstance(payload, MeteredRequest):
            return payload
        return MeteredRequest(
            endpoint=endpoint,
            body=body,
            model=None,  # the URL's, set by the platform
            stream=endpoint.always_stream,
            payload=payload,
            service_tier=_tier(payload),
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
        if "output" not in obj and isinstance(obj.get("message"), str):
            summary.error = "upstream error"  # Bedrock's error body: {"message": …}; the type is a header
            return summary
        summary.usage = read_usage(summary, lambda: usage_from_converse(obj.get("usage")))
        kept = [0]
        for block in as_list(get_path(obj, "output", "message", "content")):
            text = block.get("text") if isinstance(block, dict) else None
            if isinstance(text, str):
                summary.keep_text(text, kept)
        tier = get_path(obj, "serviceTier", "type")
        summary.service_tier = tier if isinstance(tier, str) else None
        return summary

    def max_output_tokens(self, request: MeteredRequest) -> int | None:
        return first_count(request.payload, ("inferenceConfig", "maxTokens"))

    def refusal(self, status: int, message: str) -> Refusal:
        return aws_refusal(status, message)

    def usage_from_headers(self, headers: Mapping[str, str]) -> TokenUsage | None:
        return None  # the body carries the usage

    def stream_parser(self, request: MeteredRequest) -> ConverseStreamParser:
        return ConverseStreamParser()

    def stream_editor(self, request: MeteredRequest) -> None:
        return None

    def endpoint_for_request(self, payload: dict[str, Any], model: str | None) -> Endpoint:
        return CONVERSE

    def endpoint_for_response(self, obj: Any, stream: bool, model: str | None) -> Endpoint:
        return CONVERSE_STREAM if stream else CONVERSE


class ConverseStreamParser:
    """ConverseStream events, as SSE events named by type (see the module's docstring)."""

    __slots__ = ("_kept", "_splitter", "summary")

    def __init__(self) -> None:
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

    def _on_event(self, kind: str | None, data: str | None) -> None:
        try:
            obj = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            self.summary.error = "stream event is not JSON"
            return
        if not isinstance(obj, dict):
            return
        summary = self.summary
        if kind == "contentBlockDelta":
            text = get_path(obj, "delta", "text")
            if isinstance(text, str):
                summary.keep_text(text, self._kept)
        elif kind == "metadata":
            usage = read_usage(summary, lambda: usage_from_converse(obj.get("usage")))
            if usage is not None:
                summary.usage = usage
                summary.complete = True
        elif kind == "error":
            summary.error = f"upstream error: {obj.get('type') or 'error'}"

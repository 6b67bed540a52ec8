"""Amazon Bedrock's InvokeModel with a model's own body (Amazon Nova and Titan, Meta Llama, Mistral,
Cohere, DeepSeek, …): one dialect for the bodies llmtally has no parser of their own for.

Reached only through the Bedrock platform (``/bedrock/model/{modelId}/invoke`` and
``/invoke-with-response-stream`` for a model id that is not Claude's, or an application inference
profile): the model is the URL's, the body never names it. Every such body is another vendor's shape,
so the usage is read from what Bedrock adds to every model's answer, not from the body:

* a non-streamed answer: the response headers ``X-Amzn-Bedrock-Input-Token-Count`` and
  ``-Output-Token-Count`` (and ``-Cache-Read-`` / ``-Cache-Write-Input-Token-Count``);
* a stream: ``amazon-bedrock-invocationMetrics`` in the last chunk's event (``inputTokenCount``,
  ``outputTokenCount``, ``cacheRead…`` / ``cacheWriteInputTokenCount``).

Bedrock's input count excludes cache reads and writes (as Converse's does): they are added. Where the
headers are missing, the body's own counts are read for the vendors that report them (Nova's
``usage``, Llama's ``prompt_token_count`` / ``generation_token_count``, Titan's ``inputTextTokenCount``
and ``tokenCount``). Output text is kept from the known shapes, for an estimate when no usage came.
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
    parse_object,
    read_usage,
)
from llmtally.providers.converse import aws_refusal
from llmtally.providers.streams import SSESplitter
from llmtally.record import Provider, TokenUsage

INVOKE = Endpoint(provider="invoke", name="invoke")
INVOKE_STREAM = Endpoint(provider="invoke", name="invoke-with-response-stream", always_stream=True)

#: Bedrock's token counts on every InvokeModel answer, whatever the model.
INPUT_HEADER = "X-Amzn-Bedrock-Input-Token-Count"
OUTPUT_HEADER = "X-Amzn-Bedrock-Output-Token-Count"
CACHE_READ_HEADER = "X-Amzn-Bedrock-Cache-Read-Input-Token-Count"
CACHE_WRITE_HEADER = "X-Amzn-Bedrock-Cache-Write-Input-Token-Count"
METRICS_KEY = "amazon-bedrock-invocationMetrics"


def _usage(input_tokens: Any, output_tokens: Any, cache_read: Any, cache_write: Any) -> TokenUsage:
    read, write = as_int(cache_read), as_int(cache_write)
    return TokenUsage(
        input_tokens=as_int(input_tokens) + read + write,
        output_tokens=as_int(output_tokens),
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=None,
    )


def usage_from_headers(headers: Mapping[str, str]) -> TokenUsage | None:
    """Bedrock's count headers as usage; None when it sent none. Raises InvalidUsage for a value that
    is not a count (read through :func:`read_usage`)."""
    if headers.get(INPUT_HEADER) is None and headers.get(OUTPUT_HEADER) is None:
        return None
    values = [_header_int(headers.get(name)) for name in (INPUT_HEADER, OUTPUT_HEADER)]
    cache = [_header_int(headers.get(name)) for name in (CACHE_READ_HEADER, CACHE_WRITE_HEADER)]
    return _usage(*values, *cache)


def _header_int(value: str | None) -> Any:
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isdigit() and len(text) < 20 else value  # as_int refuses what is left


def usage_from_metrics(metrics: Any) -> TokenUsage | None:
    if not isinstance(metrics, dict):
        return None
    return _usage(
        metrics.get("inputTokenCount"),
        metrics.get("outputTokenCount"),
        metrics.get("cacheReadInputTokenCount"),
        metrics.get("cacheWriteInputTokenCount"),
    )


def usage_from_body(obj: dict[str, Any]) -> TokenUsage | None:
    """The counts some vendors put in their own bodies (used when Bedrock's headers are missing)."""
    usage = obj.get("usage")
    if isinstance(usage, dict) and ("inputTokens" in usage or "outputTokens" in usage):  # Nova
        return _usage(
            usage.get("inputTokens"),
            usage.get("outputTokens"),
            usage.get("cacheReadInputTokenCount"),
            usage.get("cacheWriteInputTokenCount"),
        )
    if "prompt_token_count" in obj or "generation_token_count" in obj:  # Llama
        return _usage(obj.get("prompt_token_count"), obj.get("generation_token_count"), None, None)
    if "inputTextTokenCount" in obj:  # Titan text
        output = sum(as_int(r.get("tokenCount")) for r in as_list(obj.get("results")) if isinstance(r, dict))
        return _usage(obj.get("inputTextTokenCount"), output, None, None)
    return None


def texts_of(obj: dict[str, Any]) -> list[str]:
    """Output text in the shapes Bedrock's vendors answer with (whole bodies and stream events)."""
    out: list[str] = []
    for key in ("generation", "outputText", "completion", "text"):  # Llama, Titan stream, …, Cohere
        if isinstance(obj.get(key), str):
            out.append(obj[key])
    for item in as_list(obj.get("results")) + as_list(obj.get("outputs")) + as_list(obj.get("generations")):
        if isinstance(item, dict):  # Titan, Mistral, Cohere
            text = item.get("outputText", item.get("text"))
            if isinstance(text, str):
                out.append(text)
    for choice in as_list(obj.get("choices")):  # DeepSeek, gpt-oss (OpenAI's shape)
        if isinstance(choice, dict):
            text = (
                choice.get("text")
                or get_path(choice, "message", "content")
                or get_path(choice, "delta", "content")
            )
            if isinstance(text, str):
                out.append(text)
    for block in as_list(get_path(obj, "output", "message", "content")):  # Nova
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            out.append(block["text"])
    delta = get_path(obj, "contentBlockDelta", "delta", "text")  # Nova's stream
    if isinstance(delta, str):
        out.append(delta)
    return out


class InvokeAdapter:
    name: Provider = "invoke"
    request_id_header: str | None = "x-amzn-RequestId"
    usage_headers: tuple[str, ...] = (INPUT_HEADER, OUTPUT_HEADER, CACHE_READ_HEADER, CACHE_WRITE_HEADER)

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
            endpoint=endpoint, body=body, model=None, stream=endpoint.always_stream, payload=payload
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
        if len(obj) == 1 and isinstance(obj.get("message"), str):
            summary.error = "upstream error"  # Bedrock's error body: {"message": …}; the type is a header
            return summary
        summary.usage = read_usage(summary, lambda: usage_from_body(obj))
        kept = [0]
        for text in texts_of(obj):
            summary.keep_text(text, kept)
        return summary

    def max_output_tokens(self, request: MeteredRequest) -> int | None:
        # Each vendor's own name for it (Anthropic, Mistral, Cohere, DeepSeek; gpt-oss; Llama; Titan;
        # Nova's two request shapes).
        return first_count(
            request.payload,
            ("max_tokens",), ("max_completion_tokens",), ("max_gen_len",),
            ("textGenerationConfig", "maxTokenCount"), ("inferenceConfig", "maxTokens"),
            ("inferenceConfig", "max_new_tokens"),
        )  # fmt: skip

    def refusal(self, status: int, message: str) -> Refusal:
        return aws_refusal(status, message)

    def usage_from_headers(self, headers: Mapping[str, str]) -> TokenUsage | None:
        return usage_from_headers(headers)

    def stream_parser(self, request: MeteredRequest) -> InvokeStreamParser:
        return InvokeStreamParser()

    def stream_editor(self, request: MeteredRequest) -> None:
        return None

    def endpoint_for_request(self, payload: dict[str, Any], model: str | None) -> Endpoint:
        return INVOKE

    def endpoint_for_response(self, obj: Any, stream: bool, model: str | None) -> Endpoint:
        return INVOKE_STREAM if stream else INVOKE


class InvokeStreamParser:
    """The model's own stream events, one per SSE ``data:`` (the Bedrock platform undoes the
    event-stream framing); the usage is the last chunk's invocation metrics (the vendors' own
    per-chunk counts are partial: Llama's prompt count comes in the first chunk only)."""

    __slots__ = ("_kept", "_splitter", "summary")

    def __init__(self) -> None:
        self._splitter = SSESplitter()
        self._kept = [0]
        self.summary = ResponseSummary()

    def feed(self, chunk: bytes) -> None:
        for event in self._splitter.feed(chunk):
            self._on_event(event.data)

    def finish(self) -> ResponseSummary:
        events, _ = self._splitter.finish()
        for event in events:
            self._on_event(event.data)
        return self.summary

    def _on_event(self, data: str | None) -> None:
        try:
            obj = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            self.summary.error = "stream event is not JSON"
            return
        if not isinstance(obj, dict):
            return
        summary = self.summary
        if obj.get("type") == "error":  # an exception message mid-stream (the platform's error event)
            summary.error = f"upstream error: {get_path(obj, 'error', 'type') or 'error'}"
            return
        for text in texts_of(obj):
            summary.keep_text(text, self._kept)
        if METRICS_KEY in obj:
            usage = read_usage(summary, lambda: usage_from_metrics(obj[METRICS_KEY]))
            if usage is not None:
                summary.usage = usage
                summary.complete = True

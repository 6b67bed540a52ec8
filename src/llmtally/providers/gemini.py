"""Google Gemini (Generative Language API): generate, stream, embed; ``/v1beta/`` and ``/v1/``.

Usage mapping: ``promptTokenCount`` includes ``cachedContentTokenCount``; tool-use prompt tokens
are input too; output is ``candidatesTokenCount + thoughtsTokenCount``. In a stream every chunk's
``usageMetadata`` is cumulative: the last one wins, they are never added.
"""

from __future__ import annotations

import functools
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
    as_list,
    first_count,
    get_path,
    json_refusal,
    read_usage,
)
from llmtally.providers.batch import BATCH, BatchDownload, BatchResult
from llmtally.providers.streams import JSONArraySplitter, SSESplitter
from llmtally.record import Provider, TokenUsage

_PATH = re.compile(
    r"^(?:v1beta|v1|v1alpha)/((?:models|tunedModels)/[^/:]+)"
    r":(generateContent|streamGenerateContent|embedContent|batchEmbedContents)/?$"
)
_EMBED = frozenset({"embedContent", "batchEmbedContents"})


def usage_from_gemini(meta: Any, embedding: bool = False) -> TokenUsage | None:
    if not isinstance(meta, dict):
        return None
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    output = 0 if embedding else as_int(meta.get("candidatesTokenCount")) + thoughts
    return TokenUsage(
        input_tokens=as_int(meta.get("promptTokenCount")) + as_int(meta.get("toolUsePromptTokenCount")),
        output_tokens=output,
        cache_read_tokens=as_int(meta.get("cachedContentTokenCount")),
        reasoning_tokens=None if embedding else thoughts,
        input_audio_tokens=modality_tokens(meta.get("promptTokensDetails"), "AUDIO"),
        output_audio_tokens=0 if embedding else modality_tokens(meta.get("candidatesTokensDetails"), "AUDIO"),
        # A document's pages are billed as images (genai-prices maps DOCUMENT to image tokens too).
        input_image_tokens=modality_tokens(meta.get("promptTokensDetails"), "IMAGE", "DOCUMENT"),
        output_image_tokens=0
        if embedding
        else modality_tokens(meta.get("candidatesTokensDetails"), "IMAGE", "DOCUMENT"),
    )


def modality_tokens(details: Any, *modalities: str) -> int:
    """Tokens of some modalities in a ``[{"modality": "AUDIO", "tokenCount": n}, …]`` list."""
    if not isinstance(details, list):
        return 0
    return sum(
        as_int(d.get("tokenCount"))
        for d in details
        if isinstance(d, dict) and d.get("modality") in modalities
    )


def _error(obj: Any) -> str | None:
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return f"upstream error: {err.get('status') or err.get('code') or 'error'}"
    return None


@functools.lru_cache(maxsize=256)  # a route is looked up on every call; models are few
def _route(subpath: str) -> Endpoint | None:
    match = _PATH.match(subpath)
    if match is None:
        return None
    resource, method = match.groups()
    model = resource.split("/", 1)[1]
    return Endpoint(
        provider="gemini",
        name=method,
        url_model=model,
        always_stream=method == "streamGenerateContent",
    )


class GeminiAdapter:
    name: Provider = "gemini"
    request_id_header: str | None = None
    usage_headers: tuple[str, ...] = ()

    def route(self, subpath: str) -> Endpoint | None:
        return _route(subpath)

    def prepare(
        self, endpoint: Endpoint, body: bytes, query: Mapping[str, str], inject_stream_usage: bool
    ) -> MeteredRequest:
        stream = endpoint.always_stream
        request = MeteredRequest(
            endpoint=endpoint,
            body=body,
            model=endpoint.url_model,
            stream=stream,
            payload=None,
            stream_format=("sse" if query.get("alt") == "sse" else "json-array") if stream else None,
        )
        try:
            payload = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as exc:
            request.error = f"request body is not JSON: {exc}"
            return request
        if isinstance(payload, dict):
            request.payload = payload
            tier = get_path(payload, "serviceTier") or get_path(payload, "generationConfig", "serviceTier")
            request.service_tier = tier if isinstance(tier, str) else None
        else:
            request.error = "request body is not a JSON object"
        return request

    def parse_response(self, request: MeteredRequest, body: bytes) -> ResponseSummary:
        state = _GeminiState(request.endpoint.name in _EMBED)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            state.summary.error = f"response body is not JSON: {exc}"
            return state.summary
        state.on_object(obj)
        state.summary.complete = True
        return state.summary

    def max_output_tokens(self, request: MeteredRequest) -> int | None:
        if "mbed" in request.endpoint.name:  # embedContent, batchEmbedContents
            return 0
        most = first_count(request.payload, ("generationConfig", "maxOutputTokens"), ("maxOutputTokens",))
        if most is None:
            return None
        # Thinking is billed as output but not always inside maxOutputTokens: add its budget.
        thinking = first_count(request.payload, ("generationConfig", "thinkingConfig", "thinkingBudget"))
        return most + (thinking or 0)

    def refusal(self, status: int, message: str) -> Refusal:
        state = "RESOURCE_EXHAUSTED" if status == 429 else "UNAVAILABLE"
        return json_refusal({"error": {"code": status, "message": message, "status": state}})

    def usage_from_headers(self, headers: Mapping[str, str]) -> TokenUsage | None:
        return None  # the body carries the usage

    def batch_route(self, subpath: str) -> BatchDownload | None:
        """``GET v1beta/batches/{id}``: the batch operation, with its inlined responses once done;
        ``GET [download/]v1beta/files/{id}:download``: a file, a batch's JSONL results among them."""
        match = _BATCH_GET.match(subpath)
        if match is not None:
            return BatchDownload("json", _BATCH, match.group(1), read_whole=batch_results)
        match = _FILE_DOWNLOAD.match(subpath)
        if match is not None:
            return BatchDownload("jsonl", _BATCH, match.group(1), read_line=batch_file_result)
        return None

    def stream_parser(self, request: MeteredRequest) -> _GeminiStreamParser:
        return _GeminiStreamParser(request.stream_format == "sse")

    def stream_editor(self, request: MeteredRequest) -> None:
        return None  # streams are forwarded as they come

    def endpoint_for_request(self, payload: dict[str, Any], model: str | None) -> Endpoint:
        model = (model or "").removeprefix("models/") or None
        if "requests" in payload:
            return Endpoint(provider="gemini", name="batchEmbedContents", url_model=model)
        if "content" in payload:
            return Endpoint(provider="gemini", name="embedContent", url_model=model)
        return Endpoint(provider="gemini", name="generateContent", url_model=model)

    def endpoint_for_response(self, obj: Any, stream: bool, model: str | None) -> Endpoint:
        model = (model or "").removeprefix("models/") or None
        if isinstance(obj, dict) and "embeddings" in obj:
            return Endpoint(provider="gemini", name="batchEmbedContents", url_model=model)
        if isinstance(obj, dict) and "embedding" in obj:
            return Endpoint(provider="gemini", name="embedContent", url_model=model)
        name = "streamGenerateContent" if stream else "generateContent"
        return Endpoint(provider="gemini", name=name, url_model=model, always_stream=stream)


_BATCH_GET = re.compile(r"^(?:v1beta|v1|v1alpha)/(batches/[^/:]+)/?$")
_FILE_DOWNLOAD = re.compile(r"^(?:download/)?(?:v1beta|v1|v1alpha)/(files/[^/:]+):download/?$")
_BATCH = Endpoint(provider="gemini", name=BATCH)


def _result_of(item: dict[str, Any], custom_id: Any, model: str | None) -> BatchResult:
    """One batch response: ``{"response": GenerateContentResponse}`` or ``{"error": Status}``."""
    state = _GeminiState()
    summary = state.summary
    result = BatchResult(summary, custom_id=custom_id if isinstance(custom_id, str) else None)
    result.endpoint = "generateContent"
    response = item.get("response")
    error = item.get("error")
    if isinstance(response, dict):
        state.on_object(response)
        summary.complete = True
    elif isinstance(error, dict):
        code = error.get("code")
        result.status = code if isinstance(code, int) and not isinstance(code, bool) else None
        summary.error = f"batch request failed: {error.get('status') or code or 'error'}"
    else:
        summary.error = "batch result has no response"
    summary.model = summary.model or model
    return result


def batch_results(operation: Any) -> list[BatchResult]:
    """A batch operation's inlined responses (``metadata.output`` as the SDK reads it, or the
    operation's ``response``), each ``{response | error, metadata}``; none while it runs. A request's
    ``metadata.key``, when it set one, is its ``custom_id``."""
    found = get_path(operation, "metadata", "output", "inlinedResponses", "inlinedResponses")
    if not isinstance(found, list):
        found = get_path(operation, "response", "inlinedResponses", "inlinedResponses")
    model = get_path(operation, "metadata", "model")
    model = model.removeprefix("models/") if isinstance(model, str) else None
    return [
        _result_of(item, get_path(item, "metadata", "key"), model)
        for item in as_list(found)
        if isinstance(item, dict)
    ]


def batch_file_result(line: Any) -> BatchResult | None:
    """One line of a batch's results file: ``{"key", "response" | "error"}``; None for a line of any
    other file (a batch's input lines carry ``request``)."""
    if not isinstance(line, dict) or not ("response" in line or "error" in line) or "key" not in line:
        return None
    return _result_of(line, line.get("key"), None)


def grounding_items(model: str | None, queries: set[str], grounded: bool) -> dict[str, int]:
    """Grounding with Google Search as Google bills it: Gemini 3 per search query the model ran,
    earlier models per grounded prompt (a response with grounding metadata)."""
    if not grounded:
        return {}
    if (model or "").removeprefix("models/").startswith("gemini-3"):
        return {"web_search_query": len(queries)} if queries else {}
    return {"grounded_prompt": 1}


class _GeminiState:
    __slots__ = ("_embedding", "_grounded", "_kept", "_queries", "summary")

    def __init__(self, embedding: bool = False) -> None:
        self._embedding = embedding
        self._kept = [0]
        self._queries: set[str] = set()
        self._grounded = False
        self.summary = ResponseSummary()

    def on_object(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.summary.error = "response is not a JSON object"
            return
        summary = self.summary
        error = _error(obj)
        if error:
            summary.error = error
            return
        if isinstance(obj.get("modelVersion"), str):
            summary.model = obj["modelVersion"]
        if isinstance(obj.get("responseId"), str):
            summary.upstream_request_id = obj["responseId"]
        meta = obj.get("usageMetadata")
        usage = read_usage(summary, lambda: usage_from_gemini(meta, self._embedding))
        if usage is not None and isinstance(meta, dict):
            summary.usage = usage  # cumulative: the last one wins
            # Vertex says how the call was served in trafficType (ON_DEMAND, PROVISIONED_THROUGHPUT, …).
            tier = meta.get("serviceTier") or meta.get("trafficType")
            if isinstance(tier, str):
                summary.service_tier = tier.lower() if tier.isupper() else tier
        for candidate in as_list(obj.get("candidates")):
            if not isinstance(candidate, dict):
                continue
            if candidate.get("finishReason"):
                summary.complete = True
            grounding = candidate.get("groundingMetadata")
            if isinstance(grounding, dict):
                queries = [q for q in as_list(grounding.get("webSearchQueries")) if isinstance(q, str)]
                if queries or grounding.get("groundingChunks"):
                    self._grounded = True
                    self._queries.update(queries)
                    summary.line_items = grounding_items(summary.model, self._queries, self._grounded)
            for part in as_list(get_path(candidate, "content", "parts")):
                if not isinstance(part, dict):
                    continue
                text = part.get("text")
                if isinstance(text, str):
                    summary.keep_text(text, self._kept)
                call = part.get("functionCall")
                if isinstance(call, dict):
                    summary.keep_text(orjson.dumps(call).decode(), self._kept)


class _GeminiStreamParser:
    __slots__ = ("_array", "_sse", "_state")

    def __init__(self, sse: bool) -> None:
        self._sse = SSESplitter() if sse else None
        self._array = None if sse else JSONArraySplitter()
        self._state = _GeminiState()

    def feed(self, chunk: bytes) -> None:
        if self._sse is not None:
            for event in self._sse.feed(chunk):
                self._on_json(event.data)
        elif self._array is not None:
            for element in self._array.feed(chunk):
                self._on_json(element)

    def finish(self) -> ResponseSummary:
        if self._sse is not None:
            events, _ = self._sse.finish()
            for event in events:
                self._on_json(event.data)
        return self._state.summary

    def _on_json(self, data: str | bytes | None) -> None:
        if not data:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._state.summary.error = "stream chunk is not JSON"
            return
        self._state.on_object(obj)

"""What every provider module offers the proxy and the library.

A provider module knows its URL layout, its request and response bodies and its usage fields;
the proxy (transport) and the pipeline never look inside a body themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from llmtally.record import Provider, TokenUsage

if TYPE_CHECKING:
    from llmtally.providers.batch import BatchDownload

#: Output text kept per response for estimating when no usage arrives (a disconnect).
MAX_KEPT_TEXT_CHARS = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A metered API operation, e.g. ``chat.completions`` or ``streamGenerateContent``."""

    provider: Provider
    name: str
    #: Model named by the URL (Gemini) rather than the body.
    url_model: str | None = None
    #: The response is a stream whatever the body says (Gemini ``:streamGenerateContent``).
    always_stream: bool = False


@dataclass(slots=True)
class MeteredRequest:
    """A parsed request: what metering needs, and the exact bytes to send upstream."""

    endpoint: Endpoint
    body: bytes
    model: str | None
    stream: bool
    #: The parsed JSON body, or None when it is not JSON (then ``error`` says why).
    payload: dict[str, Any] | None
    #: True when llmtally added ``stream_options.include_usage`` and must hide its effects.
    injected_usage: bool = False
    #: Stream framing of the response: ``sse``, ``json-array`` or ``None`` (a single JSON body).
    stream_format: str | None = None
    service_tier: str | None = None
    #: Data-residency region the request asked for (Anthropic ``inference_geo``).
    inference_geo: str | None = None
    error: str | None = None


@dataclass(slots=True)
class ResponseSummary:
    """What a response body told us."""

    model: str | None = None
    usage: TokenUsage | None = None
    #: Output text seen, used to estimate output tokens when no usage arrives.
    output_text: list[str] = field(default_factory=list)
    upstream_request_id: str | None = None
    service_tier: str | None = None
    #: Where inference ran, when the provider says (Anthropic ``usage.inference_geo``).
    inference_geo: str | None = None
    error: str | None = None
    #: The provider's usage held a value that is not a token count: none of its usage is trusted.
    usage_error: str | None = None
    #: The stream reached its documented end (final usage / terminal event).
    complete: bool = False
    #: Billed units beyond tokens the response reports, item → count (``web_search``, ``web_fetch``,
    #: ``file_search``, ``grounded_prompt``, ``web_search_query``): priced by the pricing engine.
    line_items: dict[str, int] = field(default_factory=dict)

    def keep_text(self, text: str, kept: list[int]) -> None:
        """Remember output text up to MAX_KEPT_TEXT_CHARS (``kept`` is a 1-item running count)."""
        if text and kept[0] < MAX_KEPT_TEXT_CHARS:
            self.output_text.append(text)
            kept[0] += len(text)


class StreamParser(Protocol):
    """Incremental parser of one streamed response, for metering: ``feed`` gets each chunk (decoded)
    as it arrives, cut anywhere."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> ResponseSummary:
        """End of stream: what it told us."""
        ...


class StreamEditor(Protocol):
    """Edits a streamed response on its way to the client (undoing what llmtally's request edit added).

    ``feed`` gets each upstream chunk and returns the bytes to send now; ``finish`` the bytes still
    held back at the end. Metering reads the unedited stream through a :class:`StreamParser`.
    """

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class ProviderAdapter(Protocol):
    """One provider's parsing, registered in :mod:`llmtally.providers`."""

    name: Provider
    #: Response header carrying the provider's request id, if it sends one.
    request_id_header: str | None
    #: Response headers that carry token counts (Bedrock's on InvokeModel), kept for
    #: :meth:`usage_from_headers`; empty for dialects whose usage is in the body.
    usage_headers: tuple[str, ...]

    def route(self, subpath: str) -> Endpoint | None:
        """Map the path after ``/<provider>/`` to a metered endpoint, or None to pass through."""
        ...

    def batch_route(self, subpath: str) -> BatchDownload | None:
        """A GET of the path after ``/<provider>/`` that downloads batch results (metered one record
        per result), or None."""
        ...

    def prepare(
        self, endpoint: Endpoint, body: bytes, query: Mapping[str, str], inject_stream_usage: bool
    ) -> MeteredRequest:
        """Parse a request body; never raises (a bad body gives ``error`` and is forwarded as is)."""
        ...

    def parse_response(self, request: MeteredRequest, body: bytes) -> ResponseSummary:
        """Parse a complete (non-streamed) response body; never raises."""
        ...

    def usage_from_headers(self, headers: Mapping[str, str]) -> TokenUsage | None:
        """Usage from the response headers named in ``usage_headers`` (they win over the body's:
        they are what the platform bills); None when there is none. May raise InvalidUsage."""
        ...

    def stream_parser(self, request: MeteredRequest) -> StreamParser:
        """A new incremental parser for one streamed response."""
        ...

    def stream_editor(self, request: MeteredRequest) -> StreamEditor | None:
        """An editor for this streamed response, or None when it goes to the client as it comes."""
        ...

    def endpoint_for_request(self, payload: dict[str, Any], model: str | None) -> Endpoint:
        """The endpoint a request body is for (``llmtally count --request``)."""
        ...

    def max_output_tokens(self, request: MeteredRequest) -> int | None:
        """The most output tokens the request lets the model write (its ``max_tokens`` or the
        dialect's equivalent, thinking included), 0 for calls that write none (embeddings), None when
        the request does not say: the bound a spend limit reserves (llmtally.budgets)."""
        ...

    def refusal(self, status: int, message: str) -> Refusal:
        """An error answer in this dialect's own shape, so each SDK raises its usual error for
        ``status`` with ``message`` readable (a spend limit's 429)."""
        ...

    def endpoint_for_response(self, obj: Any, stream: bool, model: str | None) -> Endpoint:
        """The endpoint a response object (or first stream event) belongs to (library ``track_usage``)."""
        ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer llmtally gives itself, without going upstream: the head's extra headers and the body."""

    headers: tuple[tuple[str, str], ...]
    body: bytes


JSON_HEADER = ("Content-Type", "application/json")


def json_refusal(obj: object, *headers: tuple[str, str]) -> Refusal:
    return Refusal((JSON_HEADER, *headers), orjson.dumps(obj))


def first_count(payload: dict[str, Any] | None, *paths: tuple[str, ...]) -> int | None:
    """The first of ``paths`` in ``payload`` that holds a non-negative integer, else None."""
    for path in paths:
        value = get_path(payload, *path)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def parse_object(endpoint: Endpoint, body: bytes) -> dict[str, Any] | MeteredRequest:
    """A request body as a JSON object, or the MeteredRequest that says why it is not one."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return MeteredRequest(endpoint, body, None, False, None, error=f"request body is not JSON: {exc}")
    if not isinstance(payload, dict):
        return MeteredRequest(endpoint, body, None, False, None, error="request body is not a JSON object")
    return payload


#: No call uses this many tokens; a count at or past it is a broken or hostile upstream. Below it,
#: sums of a few counts stay within a signed 64-bit field (protobuf, PostgreSQL) and exact in a double.
MAX_TOKEN_COUNT = 2**53


class InvalidUsage(ValueError):
    """A usage field holds something that is not a token count (negative, fractional, huge, text)."""


def as_int(value: Any) -> int:
    """A usage field as an int; absent or null counts as 0, anything else that is not a token count
    raises :class:`InvalidUsage` (taken as it came, it would be billed or break a sink)."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKEN_COUNT:
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value < MAX_TOKEN_COUNT:
        return int(value)
    text = repr(value)
    raise InvalidUsage(text if len(text) <= 40 else text[:37] + "...")


def read_usage(summary: ResponseSummary, read: Callable[[], TokenUsage | None]) -> TokenUsage | None:
    """``read()``, or None with ``summary.usage_error`` set when the usage it reads is invalid."""
    try:
        return read()
    except InvalidUsage as exc:
        if summary.usage_error is None:
            summary.usage_error = f"provider usage is not a token count ({exc})"
        return None


def count_of(value: Any) -> int:
    """A count a provider reports (web searches …): a whole number ≥ 0, else 0 (never raises)."""
    return (
        value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKEN_COUNT
        else 0
    )


def as_list(value: Any) -> list[Any]:
    """A field that should be a JSON array; anything else (a number, ``true``) counts as empty."""
    return value if isinstance(value, list) else []


def get_path(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...`` or None when any step is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def header_value(headers: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return value
    return None

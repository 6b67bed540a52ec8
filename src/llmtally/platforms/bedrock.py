"""Amazon Bedrock under ``/bedrock``: its routes, and its framing (AWS event-stream messages around the
dialect's own events).

Metered: ``model/{modelId}/invoke`` and ``/invoke-with-response-stream`` for Claude models (bare ids,
cross-region inference profiles ``us.`` / ``eu.`` / ``global.`` …, and foundation-model or inference-
profile ARNs), read by the Anthropic parser, and for every other model by the ``invoke`` dialect
(Bedrock's count headers and invocation metrics); ``/converse`` and ``/converse-stream`` for any model,
read by the Converse parser. Priced by the URL's model id (an application inference profile's by
``[bedrock.inference_profiles]``) with Bedrock's prices.

``InvokeModelWithResponseStream`` sends each of the model's events (Claude's ``message_start`` …
``message_stop``) base64-encoded in ``{"bytes": …}`` inside an event-stream ``chunk`` message. Messages
are read with botocore's parser (prelude and message CRC32 checked), and each event is handed to the
dialect's stream parser as the SSE event the direct API would have sent, so the dialect never knows
the route.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from yarl import URL

from llmtally.platforms.base import PlatformName, Route
from llmtally.providers import ADAPTERS
from llmtally.providers.base import MeteredRequest, ProviderAdapter, ResponseSummary, StreamParser
from llmtally.providers.converse import CONVERSE, CONVERSE_STREAM, aws_refusal
from llmtally.providers.invoke import INVOKE, INVOKE_STREAM
from llmtally.record import Provider

#: genai-prices' provider for Bedrock: its model ids (``anthropic.claude-…-v1:0``, with the ``us.`` /
#: ``eu.`` / ``global.`` inference-profile prefixes and ARNs) and the regional vs global rates.
PRICE_DATA: Mapping[Provider, str] = {"anthropic": "aws", "converse": "aws", "invoke": "aws"}


class FrameError(ValueError):
    """A message that is not what its event type promises (an InvokeModel chunk with no event)."""


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One event-stream message: ``message_type`` is ``event``, ``exception`` or ``error``."""

    message_type: str
    event_type: str | None
    exception_type: str | None
    payload: bytes


class EventStreamReader:
    """Whole messages out of an event-stream body fed in chunks cut anywhere.

    botocore is imported on first use: only Bedrock routes need it (the ``bedrock`` extra).
    """

    __slots__ = ("_buffer", "error")

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer

        self._buffer = EventStreamBuffer()
        #: Why the stream stopped being readable; nothing is read after it.
        self.error: str | None = None

    def feed(self, chunk: bytes) -> list[EventMessage]:
        """The messages this chunk completes; those before a corrupt one are returned, and ``error``
        is set from then on."""
        if self.error is not None:
            return []
        from botocore.eventstream import ParserError

        self._buffer.add_data(chunk)
        out: list[EventMessage] = []
        try:
            for message in self._buffer:
                headers = message.headers
                out.append(
                    EventMessage(
                        message_type=str(headers.get(":message-type", "event")),
                        event_type=_text(headers.get(":event-type")),
                        exception_type=_text(headers.get(":exception-type") or headers.get(":error-code")),
                        payload=bytes(message.payload),
                    )
                )
        except (ParserError, ValueError, UnicodeDecodeError) as exc:
            self.error = f"the event stream is corrupt ({type(exc).__name__})"
        return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def invoke_event_as_sse(message: EventMessage) -> bytes:
    """The SSE event the direct API sends for this InvokeModel stream message (b"" for none).

    A ``chunk``'s inner event goes as ``data: <event>``; an exception mid-stream (throttling, a
    model error) as the dialect's error event, so the record says the stream failed.
    """
    if message.message_type != "event":
        kind = message.exception_type or message.message_type
        return b'data: {"type":"error","error":{"type":"' + _json_safe(kind) + b'"}}\n\n'
    if message.event_type != "chunk":
        return b""
    try:
        wrapper = orjson.loads(message.payload)
        inner = base64.b64decode(wrapper["bytes"], validate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise FrameError(f"an InvokeModel chunk holds no event ({type(exc).__name__})") from None
    return b"data: " + inner.replace(b"\n", b" ") + b"\n\n"


def converse_event_as_sse(message: EventMessage) -> bytes:
    """A ConverseStream message as an SSE event named by its type (``event: metadata``); an exception
    as ``event: error``. The payload is the event's JSON, as sent."""
    if message.message_type != "event":
        failure = message.exception_type or message.message_type
        return b'event: error\ndata: {"type":"' + _json_safe(failure) + b'"}\n\n'
    kind = message.event_type
    if not kind or not kind.isalpha():  # an event type is a name: nothing else goes into the SSE
        return b""
    return b"event: " + kind.encode() + b"\ndata: " + message.payload.replace(b"\n", b" ") + b"\n\n"


def _json_safe(text: str) -> bytes:
    return orjson.dumps(text)[1:-1]


@dataclass(slots=True)
class InvokeStreamParser:
    """A dialect's :class:`StreamParser` behind Bedrock's event-stream framing."""

    dialect: StreamParser
    #: What each message becomes for the dialect: InvokeModel's inner event, or a Converse event.
    convert: Callable[[EventMessage], bytes] = invoke_event_as_sse
    reader: EventStreamReader = field(default_factory=EventStreamReader)
    error: str | None = None
    #: Bytes of the SSE the dialect was fed (tests compare it with the direct API's stream).
    on_sse: Callable[[bytes], None] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        try:
            for message in self.reader.feed(chunk):
                sse = self.convert(message)
                if sse:
                    if self.on_sse is not None:
                        self.on_sse(sse)
                    self.dialect.feed(sse)
        except FrameError as exc:
            self.error = f"metering failed: {exc}"
        if self.reader.error is not None and self.error is None:
            self.error = f"metering failed: {self.reader.error}"

    def finish(self) -> ResponseSummary:
        summary = self.dialect.finish()
        if self.error is not None:
            summary.error = summary.error or self.error
        return summary


# The route -----------------------------------------------------------------------------------------

#: ``model/{modelId}/{operation}``: the id may be an ARN, with ``/`` in it (boto3 sends it as ``%2F``).
_MODEL_CALL = re.compile(
    r"model/(?P<model>.+)/(?P<op>invoke|invoke-with-response-stream|converse|converse-stream)"
)
#: A Claude model id, bare or behind a cross-region inference profile (``us.``, ``eu.``, ``global.`` …).
_CLAUDE = re.compile(r"(?:[a-z-]+\.)?anthropic\.claude[^/]*")
#: ``arn:aws:bedrock:<region>:<account>:<kind>/<id>``: the id of a foundation model or a (system)
#: inference profile names the model; an application inference profile's id does not.
_ARN = re.compile(r"arn:aws[a-z-]*:bedrock:[^:]*:[^:]*:(?P<kind>[a-z-]+)/(?P<id>.+)")
_NAMED_BY_ARN = frozenset({"foundation-model", "inference-profile"})
_REGION_IN_HOST = re.compile(r"bedrock-runtime(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com")
#: The streams' framings (MeteredRequest.stream_format, read by the record builder): InvokeModel's
#: chunks around the model's own events, and ConverseStream's typed events.
EVENT_STREAM = "aws-eventstream"
TYPED_EVENT_STREAM = "aws-eventstream-typed"
MAX_ROUTES = 1024


def model_of(model_id: str) -> str | None:
    """The model a URL's model id names (for pricing), or None (an application inference profile)."""
    arn = _ARN.fullmatch(model_id)
    if arn is None:
        return model_id
    return arn["id"] if arn["kind"] in _NAMED_BY_ARN else None


def region_of(upstream: URL) -> str | None:
    found = _REGION_IN_HOST.fullmatch(upstream.host or "")
    return found["region"] if found else None


Signer = Callable[[str, str, list[tuple[str, str]], bytes], list[tuple[str, str]]]


class BedrockPlatform:
    """Amazon Bedrock's runtime under ``/bedrock``: InvokeModel (and its stream), metered by the
    Anthropic parser for Claude and by the ``invoke`` dialect (Bedrock's count headers and invocation
    metrics) for every other model; Converse for any model; every other operation forwarded unmetered
    (re-signed when signing is)."""

    name: PlatformName = "bedrock"
    prefix = "bedrock"

    __slots__ = ("_passthrough", "_profiles", "_routes", "_sign", "upstream")

    def __init__(self, upstream: URL, sign: Signer | None, profiles: Mapping[str, str] | None = None) -> None:
        self.upstream = upstream
        self._sign = sign
        #: Application inference profile (ARN or id) → model, from ``[bedrock.inference_profiles]``.
        self._profiles = dict(profiles or {})
        self._passthrough = Route("bedrock", self.prefix, "anthropic", None, upstream, sign=sign)
        self._routes: dict[str, Route] = {}

    def route(self, method: str, tail: str, query: Mapping[str, str]) -> Route:
        if method != "POST":
            return self._passthrough
        route = self._routes.get(tail)  # before any regex: a service calls a few model ids
        if route is None:
            route = self._parse(tail)
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            self._routes[tail] = route
        return route

    def model_of(self, model_id: str) -> str | None:
        """The model a URL's model id names: a configured application inference profile's, else
        :func:`model_of`'s (None: an application inference profile nobody configured)."""
        mapped = self._profiles.get(model_id)
        if mapped is None:
            arn = _ARN.fullmatch(model_id)
            mapped = self._profiles.get(arn["id"]) if arn is not None else None
        return mapped or model_of(model_id)

    def _parse(self, tail: str) -> Route:
        call = _MODEL_CALL.fullmatch(tail)
        if call is None:
            return self._passthrough  # count tokens, guardrails …: forwarded, not metered
        model = self.model_of(call["model"])
        notes = {} if model is not None else {"": _UNKNOWN_PROFILE.format(call["model"])}
        op = call["op"]
        if op.startswith("converse"):  # one dialect for every model
            streamed = op == "converse-stream"
            return Route(
                "bedrock", self.prefix, "converse", CONVERSE_STREAM if streamed else CONVERSE, self.upstream,
                model=model or call["model"], framing=TYPED_EVENT_STREAM if streamed else None,
                price_by_route_model=True, pricing_notes=notes, sign=self._sign,
            )  # fmt: skip
        streamed = op == "invoke-with-response-stream"
        if model is not None and _CLAUDE.fullmatch(model):
            endpoint = ADAPTERS["anthropic"].route("v1/messages")
            return Route(
                "bedrock", self.prefix, "anthropic", endpoint, self.upstream, model=model,
                framing=EVENT_STREAM if streamed else None, price_by_route_model=True, sign=self._sign,
                refusal=aws_refusal,
            )  # fmt: skip
        # Another vendor's body (or a profile whose model is unknown): Bedrock's own counts.
        return Route(
            "bedrock", self.prefix, "invoke", INVOKE_STREAM if streamed else INVOKE, self.upstream,
            model=model or call["model"], framing=EVENT_STREAM if streamed else None,
            price_by_route_model=True, pricing_notes=notes, sign=self._sign,
        )  # fmt: skip


_UNKNOWN_PROFILE = (
    "application inference profile {} names no model: map it in [bedrock.inference_profiles] to price it"
)


def stream_parser(adapter: ProviderAdapter, request: MeteredRequest) -> StreamParser:
    """The dialect's stream parser, behind InvokeModel's event-stream framing."""
    return InvokeStreamParser(adapter.stream_parser(request))


def typed_stream_parser(adapter: ProviderAdapter, request: MeteredRequest) -> StreamParser:
    """The dialect's stream parser, behind ConverseStream's typed events."""
    return InvokeStreamParser(adapter.stream_parser(request), converse_event_as_sse)

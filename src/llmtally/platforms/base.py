"""What every platform offers the proxy: a request target in, a :class:`Route` out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from yarl import URL

from llmtally.providers.base import Endpoint, Refusal
from llmtally.providers.batch import BatchDownload
from llmtally.record import PlatformName as PlatformName
from llmtally.record import Provider


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes and who reads it: made by a platform, used by the transport."""

    platform: PlatformName
    #: The platform's path prefix (``openai``, ``azure-openai``, …): the upstream path is what follows it.
    prefix: str
    #: The API dialect whose parser reads the bodies (``openai`` for Azure, ``anthropic`` for Claude
    #: on Vertex or Bedrock, …).
    dialect: Provider
    #: The metered operation, or None: forwarded, not metered.
    endpoint: Endpoint | None
    #: The upstream the request's path (after the platform's prefix) is appended to.
    upstream: URL
    #: The model the URL names (an Azure deployment's model, a Bedrock model id), for pricing.
    model: str | None = None
    #: Names a client calls models by in the body (Azure deployments) → the model each one is.
    models: Mapping[str, str] = field(default_factory=dict)
    #: The upstream can add usage to a stream when asked (``stream_options.include_usage``); where it
    #: cannot (early Azure api-versions), nothing is injected and the stream's usage is estimated.
    stream_usage: bool = True
    #: The platform's framing around the dialect's stream (``aws-eventstream``), when the URL says the
    #: answer streams in it (Bedrock's ``invoke-with-response-stream``): the call is metered as a stream.
    framing: str | None = None
    #: Price by ``model`` (the URL's) rather than the response's: the URL names what is billed more
    #: exactly (a Bedrock inference profile: ``us.`` and ``global.`` are priced apart).
    price_by_route_model: bool = False
    #: Why the price may differ from the bill, for calls naming a model the route knows more about (an
    #: Azure deployment of a type the price data has no rates for): by the name the call used.
    pricing_notes: Mapping[str, str] = field(default_factory=dict)
    #: Signs the request for the upstream: ``sign(method, url, headers, body)`` → the headers to send.
    sign: Callable[[str, str, list[tuple[str, str]], bytes], list[tuple[str, str]]] | None = None
    #: The platform's own error shape for llmtally's refusals (Bedrock's AWS errors, whatever the
    #: dialect), or None: the dialect's (``ProviderAdapter.refusal``).
    refusal: Callable[[int, str], Refusal] | None = None
    #: A GET that downloads batch results (``endpoint`` is None: it is forwarded as it streams, and
    #: metered one record per result as it passes).
    batch: BatchDownload | None = None


class Platform(Protocol):
    """One route prefix of the proxy (``/openai``, ``/azure-openai``, ``/vertex``, ``/bedrock``)."""

    name: PlatformName
    #: The first path segment of its requests, without slashes.
    prefix: str

    def route(self, method: str, tail: str, query: Mapping[str, str]) -> Route | None:
        """The route of ``method /{prefix}/{tail}?{query}`` (``tail`` decoded, without its query), or
        None when the path names no upstream this platform may reach (answered 400)."""
        ...

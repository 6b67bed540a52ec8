"""What every platform offers the proxy: a request target in, a :class:`Route` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from yarl import URL

from llmtally.providers.base import Endpoint
from llmtally.record import Provider

PlatformName = Literal["direct", "azure", "vertex", "bedrock"]


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


class Platform(Protocol):
    """One route prefix of the proxy (``/openai``, ``/azure-openai``, ``/vertex``, ``/bedrock``)."""

    name: PlatformName
    #: The first path segment of its requests, without slashes.
    prefix: str

    def route(self, method: str, tail: str) -> Route:
        """The route of ``method /{prefix}/{tail}`` (``tail`` decoded, without its query)."""
        ...

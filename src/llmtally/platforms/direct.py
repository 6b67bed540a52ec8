"""The providers' own APIs: ``/openai``, ``/anthropic``, ``/gemini`` go to the configured upstream."""

from __future__ import annotations

from collections.abc import Mapping

from yarl import URL

from llmtally.platforms.base import PlatformName, Route
from llmtally.providers import ADAPTERS
from llmtally.providers.base import Endpoint
from llmtally.record import Provider

#: genai-prices' provider id for each dialect's own API.
PRICE_DATA: Mapping[Provider, str] = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}


class DirectPlatform:
    """A provider's API as the provider serves it: the prefix is the dialect's name."""

    name: PlatformName = "direct"

    __slots__ = ("_adapter", "_passthrough", "_routes", "dialect", "prefix", "upstream")

    def __init__(self, dialect: Provider, upstream: URL) -> None:
        self.dialect = dialect
        self.prefix: str = dialect
        self.upstream = upstream
        self._adapter = ADAPTERS[dialect]
        self._passthrough = Route("direct", dialect, dialect, None, upstream)
        #: One route per endpoint (the adapters make each endpoint once): nothing allocated per call.
        self._routes: dict[Endpoint, Route] = {}

    def route(self, method: str, tail: str, query: Mapping[str, str]) -> Route:
        endpoint = self._adapter.route(tail) if method == "POST" else None
        if endpoint is None:
            batch = self._adapter.batch_route(tail) if method == "GET" else None
            if batch is not None:  # a batch's results: metered as they stream by
                return Route("direct", self.prefix, self.dialect, None, self.upstream, batch=batch)
            return self._passthrough
        route = self._routes.get(endpoint)
        if route is None:
            route = self._routes[endpoint] = Route(
                "direct", self.prefix, self.dialect, endpoint, self.upstream
            )
        return route

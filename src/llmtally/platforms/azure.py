"""Azure OpenAI: the OpenAI dialect behind Azure's deployment URLs, under ``/azure-openai``.

Two URL layouts reach the same deployments:

- classic, ``/openai/deployments/{deployment}/{operation}?api-version=…`` (``openai.AzureOpenAI``,
  ``api-key`` header): the deployment is in the URL, and ``[azure_openai.deployments]`` says which model
  it serves;
- v1, ``/openai/v1/{operation}`` (``openai.OpenAI(base_url=…/openai/v1/)``, a bearer): the body's
  ``model`` is the deployment name, mapped the same way.

Either way a response that names its dated snapshot (``gpt-4o-2024-08-06``) is priced by it; the map
stands in when it does not (a stream cut short, an error). Keys and Entra tokens pass untouched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from yarl import URL

from llmtally.platforms.base import PlatformName, Route
from llmtally.providers import ADAPTERS
from llmtally.record import Provider

#: genai-prices' provider for Azure OpenAI: its own models, falling back to OpenAI's list prices
#: (Azure's Global deployments bill OpenAI's list prices).
PRICE_DATA: Mapping[Provider, str] = {"openai": "azure"}
#: The first api-version whose streams report usage when asked (``stream_options.include_usage``):
#: 2024-06-01 (GA) and the previews before 2024-08-01 refuse the option with a 400.
FIRST_STREAM_USAGE_VERSION = "2024-08-01"
_DATED = re.compile(r"\d{4}-\d{2}-\d{2}")
_CLASSIC = re.compile(r"openai/deployments/(?P<deployment>[^/]+)/(?P<operation>.+)")
#: Routes remembered (deployments × operations × api-versions are few; a flood of made-up names is not).
MAX_ROUTES = 1024


def reports_stream_usage(api_version: str | None) -> bool:
    """Whether this api-version can add usage to a stream (v1 and undated versions can)."""
    if not api_version or not _DATED.match(api_version):
        return True
    return api_version[:10] >= FIRST_STREAM_USAGE_VERSION


class AzureOpenAIPlatform:
    name: PlatformName = "azure"
    prefix = "azure-openai"

    __slots__ = ("_deployments", "_notes", "_passthrough", "_routes", "upstream")

    def __init__(
        self, upstream: URL, deployments: Mapping[str, str], deployment_types: Mapping[str, str] | None = None
    ) -> None:
        self.upstream = upstream
        self._deployments = dict(deployments)
        self._notes = {
            name: f"Azure {kind} deployment: the price data has Global rates only, used here"
            for name, kind in (deployment_types or {}).items()
            if kind != "global"
        }
        self._passthrough = Route("azure", self.prefix, "openai", None, upstream)
        #: Routes by (path, api-version).
        self._routes: dict[tuple[str, str | None], Route] = {}

    def route(self, method: str, tail: str, query: Mapping[str, str]) -> Route:
        if method != "POST":
            return self._batch(tail) if method == "GET" else self._passthrough
        key = (tail, query.get("api-version"))
        route = self._routes.get(key)  # before any parsing: the calls of a service repeat a few paths
        if route is None:
            route = self._parse(tail, key[1])
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _batch(self, tail: str) -> Route:
        """A batch output file's content (``openai/files/{id}/content`` classic, or under
        ``openai/v1/``): metered as OpenAI's, one record per result; any other GET passes."""
        files = tail.removeprefix("openai/").removeprefix("v1/")
        batch = ADAPTERS["openai"].batch_route(f"v1/{files}") if files.startswith("files/") else None
        if batch is None:
            return self._passthrough
        return Route("azure", self.prefix, "openai", None, self.upstream, batch=batch)

    def _parse(self, tail: str, api_version: str | None) -> Route:
        classic = _CLASSIC.fullmatch(tail)
        if classic is not None:
            deployment, operation = classic["deployment"], classic["operation"]
        elif tail.startswith("openai/v1/"):
            deployment, operation = None, tail.removeprefix("openai/")[3:]
        else:
            return self._passthrough
        return self._make(operation, deployment, reports_stream_usage(api_version))

    def _make(self, operation: str, deployment: str | None, stream_usage: bool) -> Route:
        endpoint = ADAPTERS["openai"].route(f"v1/{operation}")
        if endpoint is None:
            return self._passthrough
        model = None
        if deployment is not None:
            model = self._deployments.get(deployment, deployment)
        return Route(
            "azure",
            self.prefix,
            "openai",
            endpoint,
            self.upstream,
            model=model,
            models=self._deployments,
            stream_usage=stream_usage,
            pricing_notes={deployment: self._notes[deployment]}
            if deployment in self._notes
            else self._notes
            if deployment is None
            else {},
        )

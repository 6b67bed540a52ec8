"""Google Vertex AI under ``/vertex``: Gemini (the Gemini dialect) and Claude (the Anthropic dialect).

Paths are Vertex's own,
``{v1|v1beta1}/projects/{p}/locations/{l}/publishers/{publisher}/models/{m}:{method}``:

- ``google`` models: ``:generateContent`` and ``:streamGenerateContent`` (SSE with ``?alt=sse``, a JSON
  array without) are metered by the Gemini parser; ``:countTokens`` and the rest pass through;
- ``anthropic`` models: ``:rawPredict`` and ``:streamRawPredict`` are metered by the Anthropic parser; the
  model is the URL's (the body holds ``anthropic_version`` instead).

The upstream may be regional: ``{location}`` in ``[upstreams] vertex`` is filled from the path's
``locations/{l}`` (``global`` drops the ``{location}-`` prefix, as Google's own clients do). A location
must be a Google region name (``us-central1``, ``europe-west4``) or ``global``: nothing in a path can
make the host anything but the configured one with a region name in it, and a path whose location is
not a region name is refused whatever the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from yarl import URL

from llmtally.platforms.base import PlatformName, Route
from llmtally.providers import ADAPTERS
from llmtally.record import Provider

#: genai-prices' provider for Vertex AI: Google's, which lists Claude on Vertex too.
PRICE_DATA: Mapping[Provider, str] = {"gemini": "google", "anthropic": "google"}
LOCATION_PLACEHOLDER = "{location}"
#: A Google Cloud region (``us-central1``, ``northamerica-northeast2``) or the global endpoint.
_LOCATION = re.compile(r"global|[a-z]+(?:-[a-z]+)+\d{1,2}")
_MODEL_CALL = re.compile(
    r"(?:v1|v1beta1)/projects/[^/]+/locations/(?P<location>[^/]*)/publishers/(?P<publisher>google|anthropic)"
    r"/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)"
)
_ANY_LOCATION = re.compile(r"(?:v1|v1beta1)/projects/[^/]+/locations/(?P<location>[^/]*)(?:/|$)")
_GEMINI_METERED = frozenset({"generateContent", "streamGenerateContent"})
_CLAUDE_METERED = frozenset({"rawPredict", "streamRawPredict"})
MAX_ROUTES = 1024


def upstream_for(template: str, location: str | None) -> URL | None:
    """The upstream base URL for ``location`` (None: not a location this route may reach)."""
    if LOCATION_PLACEHOLDER not in template:
        return URL(template)
    if location is None or location == "global":
        return URL(template.replace(LOCATION_PLACEHOLDER + "-", "").replace(LOCATION_PLACEHOLDER + ".", ""))
    if not _LOCATION.fullmatch(location):
        return None
    return URL(template.replace(LOCATION_PLACEHOLDER, location))


class VertexPlatform:
    name: PlatformName = "vertex"
    prefix = "vertex"

    __slots__ = ("_routes", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        #: Metered routes by path (models × locations are few; a flood of made-up ones is bounded).
        self._routes: dict[str, Route | None] = {}

    def route(self, method: str, tail: str, query: Mapping[str, str]) -> Route | None:
        if method == "POST" and tail in self._routes:  # before any parsing: calls repeat a few paths
            return self._routes[tail]
        call = _MODEL_CALL.match(tail) if method == "POST" else None
        if call is None:
            where = _ANY_LOCATION.match(tail)
            return self._passthrough(where["location"] if where else None)
        upstream = (
            upstream_for(self.template, call["location"]) if _LOCATION.fullmatch(call["location"]) else None
        )
        route = (
            None
            if upstream is None
            else self._metered(upstream, call["publisher"], call["method"], call["model"])
        )
        if len(self._routes) >= MAX_ROUTES:
            self._routes.clear()
        self._routes[tail] = route
        return route

    def _passthrough(self, location: str | None) -> Route | None:
        if location is not None and not _LOCATION.fullmatch(location):
            return None  # whatever the upstream, a path names Google regions only
        upstream = upstream_for(self.template, location)
        return None if upstream is None else Route("vertex", self.prefix, "gemini", None, upstream)

    def _metered(self, upstream: URL, publisher: str, method: str, model: str) -> Route:
        if publisher == "google" and method in _GEMINI_METERED:
            endpoint = ADAPTERS["gemini"].route(f"v1/models/{model}:{method}")
            return Route("vertex", self.prefix, "gemini", endpoint, upstream)
        if publisher == "anthropic" and method in _CLAUDE_METERED:
            endpoint = ADAPTERS["anthropic"].route("v1/messages")
            return Route("vertex", self.prefix, "anthropic", endpoint, upstream, model=model)
        return Route(
            "vertex", self.prefix, "gemini" if publisher == "google" else "anthropic", None, upstream
        )

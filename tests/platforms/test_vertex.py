"""Vertex AI paths → routes of the Gemini and Anthropic dialects, and the regional upstream host."""

from __future__ import annotations

import pytest

from llmtally.platforms.vertex import VertexPlatform, upstream_for

TEMPLATE = "https://{location}-aiplatform.googleapis.com"
VERTEX = VertexPlatform(TEMPLATE)
GEMINI = "v1beta1/projects/p/locations/{l}/publishers/google/models/gemini-2.5-flash:{m}"
CLAUDE = "v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:{m}"


@pytest.mark.parametrize(
    ("location", "host"),
    [
        ("us-central1", "us-central1-aiplatform.googleapis.com"),
        ("europe-west4", "europe-west4-aiplatform.googleapis.com"),
        ("northamerica-northeast2", "northamerica-northeast2-aiplatform.googleapis.com"),
        ("global", "aiplatform.googleapis.com"),
        (None, "aiplatform.googleapis.com"),
    ],
)
def test_the_location_fills_the_host(location: str | None, host: str) -> None:
    url = upstream_for(TEMPLATE, location)
    assert url is not None and url.host == host and url.scheme == "https"


@pytest.mark.parametrize(
    "location", ["evil.com", "us-central1.evil.com", "a/b", "us-central1#", "", "x" * 80]
)
def test_nothing_else_can_steer_the_host(location: str) -> None:
    assert upstream_for(TEMPLATE, location) is None
    assert VERTEX.route("POST", GEMINI.format(l=location, m="generateContent"), {}) is None


def test_gemini_calls_are_metered_by_the_gemini_dialect() -> None:
    route = VERTEX.route("POST", GEMINI.format(l="us-central1", m="streamGenerateContent"), {"alt": "sse"})
    assert route is not None and route.endpoint is not None
    assert (route.platform, route.dialect, route.endpoint.name) == (
        "vertex",
        "gemini",
        "streamGenerateContent",
    )
    assert route.endpoint.url_model == "gemini-2.5-flash" and route.endpoint.always_stream


@pytest.mark.parametrize("method", ["rawPredict", "streamRawPredict"])
def test_claude_calls_are_metered_by_the_anthropic_dialect(method: str) -> None:
    route = VERTEX.route("POST", CLAUDE.format(m=method), {})
    assert route is not None and route.endpoint is not None
    assert (route.dialect, route.endpoint.name, route.model) == (
        "anthropic",
        "messages",
        "claude-sonnet-4-5@20250929",
    )
    assert route.upstream.host == "us-east5-aiplatform.googleapis.com"


@pytest.mark.parametrize(
    ("method", "tail"),
    [
        ("POST", GEMINI.format(l="us-central1", m="countTokens")),
        ("GET", GEMINI.format(l="us-central1", m="generateContent")),
        ("GET", "v1/projects/p/locations/us-central1/endpoints"),
        ("POST", CLAUDE.format(m="countTokens")),
    ],
)
def test_the_rest_passes_through_to_the_regional_host(method: str, tail: str) -> None:
    route = VERTEX.route(method, tail, {})
    assert route is not None and route.endpoint is None and route.upstream.host is not None
    assert route.upstream.host.endswith("-aiplatform.googleapis.com")


def test_a_fixed_upstream_takes_every_region() -> None:
    fixed = VertexPlatform("http://127.0.0.1:9")
    route = fixed.route("POST", GEMINI.format(l="asia-northeast1", m="generateContent"), {})
    assert route is not None and str(route.upstream) == "http://127.0.0.1:9"

"""Platforms: the routes a dialect is billed through (direct, Azure OpenAI, Vertex AI, Bedrock).

A platform maps a request target to its dialect, model, upstream and auth, and undoes its own framing
(AWS event-stream); it never parses usage, which is the dialect's (:mod:`llmtally.providers`).
"""

from __future__ import annotations

from collections.abc import Mapping

from yarl import URL

from llmtally.config import Config
from llmtally.platforms import azure, bedrock, direct, vertex
from llmtally.platforms.azure import AzureOpenAIPlatform
from llmtally.platforms.base import Platform, PlatformName, Route
from llmtally.platforms.direct import DirectPlatform
from llmtally.platforms.vertex import VertexPlatform
from llmtally.record import Provider

#: Platform → dialect → the genai-prices provider whose prices it bills (each platform's module says).
PRICE_DATA: Mapping[PlatformName, Mapping[Provider, str]] = {
    "direct": direct.PRICE_DATA,
    "azure": azure.PRICE_DATA,
    "vertex": vertex.PRICE_DATA,
    "bedrock": bedrock.PRICE_DATA,
}


def price_data_provider(platform: PlatformName, dialect: Provider) -> str:
    """The genai-prices provider id that prices ``dialect`` calls made through ``platform``."""
    by_dialect = PRICE_DATA.get(platform) or direct.PRICE_DATA
    return by_dialect.get(dialect) or direct.PRICE_DATA[dialect]


def build_platforms(config: Config) -> dict[str, Platform]:
    """Route prefix → platform, for the upstreams configured (an optional route is off when empty)."""
    upstreams = config.upstreams
    platforms: list[Platform] = [
        DirectPlatform("openai", URL(upstreams.openai)),
        DirectPlatform("anthropic", URL(upstreams.anthropic)),
        DirectPlatform("gemini", URL(upstreams.gemini)),
    ]
    if upstreams.azure_openai:
        platforms.append(AzureOpenAIPlatform(URL(upstreams.azure_openai), config.azure_openai.deployments))
    if upstreams.vertex:
        platforms.append(VertexPlatform(upstreams.vertex))
    return {platform.prefix: platform for platform in platforms}


__all__ = ["PRICE_DATA", "Platform", "PlatformName", "Route", "build_platforms", "price_data_provider"]

"""Platforms: the routes a dialect is billed through (direct, Azure OpenAI, Vertex AI, Bedrock).

A platform maps a request target to its dialect, model, upstream and auth, and undoes its own framing
(AWS event-stream); it never parses usage, which is the dialect's (:mod:`llmtally.providers`).
"""

from __future__ import annotations

from yarl import URL

from llmtally.config import Config
from llmtally.platforms.azure import AzureOpenAIPlatform
from llmtally.platforms.base import Platform, PlatformName, Route
from llmtally.platforms.direct import DirectPlatform
from llmtally.platforms.vertex import VertexPlatform


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


__all__ = ["Platform", "PlatformName", "Route", "build_platforms"]

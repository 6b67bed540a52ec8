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
from llmtally.providers.base import MeteredRequest, ProviderAdapter, StreamParser
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
    return by_dialect.get(dialect) or direct.PRICE_DATA.get(dialect) or bedrock.PRICE_DATA[dialect]


def build_platforms(config: Config) -> dict[str, Platform]:
    """Route prefix → platform, for the upstreams configured (an optional route is off when empty)."""
    upstreams = config.upstreams
    platforms: list[Platform] = [
        DirectPlatform("openai", URL(upstreams.openai)),
        DirectPlatform("anthropic", URL(upstreams.anthropic)),
        DirectPlatform("gemini", URL(upstreams.gemini)),
    ]
    if upstreams.azure_openai:
        azure_openai = config.azure_openai
        platforms.append(
            AzureOpenAIPlatform(
                URL(upstreams.azure_openai), azure_openai.deployments, azure_openai.deployment_types
            )
        )
    if upstreams.vertex:
        platforms.append(VertexPlatform(upstreams.vertex))
    if upstreams.bedrock:
        platforms.append(_bedrock(config))
    return {platform.prefix: platform for platform in platforms}


class PlatformConfigError(ValueError):
    """A platform cannot work as configured (the message says what to set)."""


def _bedrock(config: Config) -> bedrock.BedrockPlatform:
    upstream = URL(config.upstreams.bedrock)
    if config.bedrock.signing == "passthrough":
        return bedrock.BedrockPlatform(upstream, None, config.bedrock.inference_profiles)
    region = config.bedrock.region or bedrock.region_of(upstream)
    if not region:
        raise PlatformConfigError(
            f"[bedrock] region: cannot tell the region to sign for from {upstream.host!r}; set it"
        )
    from llmtally.platforms.sigv4 import Resigner, SigningError

    try:
        credentials = None
        if config.upstreams.fake:  # the built-in fake checks signatures made with its own identity
            from botocore.credentials import Credentials

            from llmtally.testing.fake_bedrock import ACCESS_KEY, SECRET_KEY

            credentials = Credentials(ACCESS_KEY, SECRET_KEY)
        resigner = Resigner(region, credentials)
    except SigningError as exc:
        raise PlatformConfigError(f"[bedrock] {exc}") from None
    except ImportError:
        raise PlatformConfigError("[bedrock] needs botocore: pip install 'llmtally[bedrock]'") from None

    def sign(method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
        return resigner.sign(method, url, headers, body).headers

    return bedrock.BedrockPlatform(upstream, sign, config.bedrock.inference_profiles)


#: Platform framings around a dialect's stream (``MeteredRequest.stream_format``).
_FRAMINGS = {
    bedrock.EVENT_STREAM: bedrock.stream_parser,
    bedrock.TYPED_EVENT_STREAM: bedrock.typed_stream_parser,
}


def stream_parser(adapter: ProviderAdapter, request: MeteredRequest) -> StreamParser:
    """The parser for a streamed answer: the dialect's, behind the platform's framing if it has one."""
    framed = _FRAMINGS.get(request.stream_format or "")
    return framed(adapter, request) if framed is not None else adapter.stream_parser(request)


__all__ = [
    "PRICE_DATA",
    "Platform",
    "PlatformConfigError",
    "PlatformName",
    "Route",
    "build_platforms",
    "price_data_provider",
    "stream_parser",
]

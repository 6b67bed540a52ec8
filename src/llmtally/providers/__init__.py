"""Provider registry: provider name → the module that parses its traffic."""

from __future__ import annotations

from llmtally.providers.anthropic import AnthropicAdapter
from llmtally.providers.base import (
    Endpoint,
    MeteredRequest,
    ProviderAdapter,
    ResponseSummary,
    StreamEditor,
    StreamParser,
)
from llmtally.providers.converse import ConverseAdapter
from llmtally.providers.gemini import GeminiAdapter
from llmtally.providers.invoke import InvokeAdapter
from llmtally.providers.openai import OpenAIAdapter
from llmtally.record import Provider

ADAPTERS: dict[Provider, ProviderAdapter] = {
    "openai": OpenAIAdapter(),
    "anthropic": AnthropicAdapter(),
    "gemini": GeminiAdapter(),
    "converse": ConverseAdapter(),
    "invoke": InvokeAdapter(),
}

__all__ = [
    "ADAPTERS",
    "Endpoint",
    "MeteredRequest",
    "ProviderAdapter",
    "ResponseSummary",
    "StreamEditor",
    "StreamParser",
]

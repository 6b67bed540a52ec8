"""Local token counting, one module per provider, and the registry that maps provider → counter."""

from __future__ import annotations

from llmtally.config import CountersConfig
from llmtally.counters.anthropic import AnthropicCounter, Calibration
from llmtally.counters.base import ChatInput, TokenCount, TokenCounter
from llmtally.counters.bundled import TokenizerUnavailable
from llmtally.counters.cache import TokenCache
from llmtally.counters.converse import ConverseCounter, InvokeCounter
from llmtally.counters.gemini import GeminiCounter
from llmtally.counters.openai import OpenAICounter
from llmtally.record import Provider


def build_counters(
    config: CountersConfig, load_on_demand: bool = True, cache: TokenCache | None = None, strict: bool = False
) -> dict[Provider, TokenCounter]:
    """The counter registry, sharing one content cache.

    ``load_on_demand=False`` keeps slow tokenizers (Gemma 3) unloaded until explicitly loaded.
    """
    cache = cache if cache is not None else TokenCache(config.cache_mb * 1024 * 1024)
    return {
        "openai": OpenAICounter(cache),
        "anthropic": AnthropicCounter(cache),
        "converse": ConverseCounter(cache),
        "invoke": InvokeCounter(cache),
        "gemini": GeminiCounter(
            config.gemini.tokenizer, load_on_demand=load_on_demand, cache=cache, strict=strict
        ),
    }


__all__ = [
    "AnthropicCounter",
    "Calibration",
    "ChatInput",
    "GeminiCounter",
    "OpenAICounter",
    "TokenCache",
    "TokenCount",
    "TokenCounter",
    "TokenizerUnavailable",
    "build_counters",
]

"""Local token counting, one module per provider, and the registry that maps provider → counter."""

from __future__ import annotations

from llmtally.config import CountersConfig
from llmtally.counters.anthropic import AnthropicCounter
from llmtally.counters.base import TokenCount, TokenCounter
from llmtally.counters.bundled import TokenizerUnavailable
from llmtally.counters.gemini import GeminiCounter
from llmtally.counters.openai import OpenAICounter
from llmtally.record import Provider


def build_counters(config: CountersConfig, load_on_demand: bool = True) -> dict[Provider, TokenCounter]:
    """The counter registry. ``load_on_demand=False`` keeps slow tokenizers unloaded until preloaded."""
    return {
        "openai": OpenAICounter(),
        "anthropic": AnthropicCounter(),
        "gemini": GeminiCounter(config.gemini.tokenizer, load_on_demand=load_on_demand),
    }


__all__ = ["TokenCount", "TokenCounter", "TokenizerUnavailable", "build_counters"]

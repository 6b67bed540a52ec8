"""llmtally: meter LLM token usage and cost for OpenAI, Anthropic and Gemini.

Two faces: a transparent HTTP proxy (``llmtally serve``) that writes one priced usage record per
call, and a library. See README.md and docs/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtally._lazy import lazy_exports

if TYPE_CHECKING:
    from llmtally.config import Config, ConfigError, load_config
    from llmtally.counters import TokenCount, TokenizerUnavailable
    from llmtally.record import Cost, TokenUsage, UsageRecord
    from llmtally.tracker import (
        CallParams,
        Price,
        TokenCountParams,
        TokenTracker,
        UnknownModelError,
        UsageMetrics,
    )

# Imported on first use (PEP 562): a proxy worker imports llmtally.config and the transport, and must
# not pay for tokenizers, price data and the record pipeline it never uses (~15 MB per process).
_PUBLIC = {
    "Config": "llmtally.config",
    "ConfigError": "llmtally.config",
    "load_config": "llmtally.config",
    "TokenCount": "llmtally.counters",
    "TokenizerUnavailable": "llmtally.counters",
    "Cost": "llmtally.record",
    "TokenUsage": "llmtally.record",
    "UsageRecord": "llmtally.record",
    "CallParams": "llmtally.tracker",
    "Price": "llmtally.tracker",
    "TokenCountParams": "llmtally.tracker",
    "TokenTracker": "llmtally.tracker",
    "UnknownModelError": "llmtally.tracker",
    "UsageMetrics": "llmtally.tracker",
}


__getattr__ = lazy_exports(__name__, _PUBLIC)


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "CallParams",
    "Config",
    "ConfigError",
    "Cost",
    "Price",
    "TokenCount",
    "TokenCountParams",
    "TokenTracker",
    "TokenUsage",
    "TokenizerUnavailable",
    "UnknownModelError",
    "UsageMetrics",
    "UsageRecord",
    "__version__",
    "load_config",
]

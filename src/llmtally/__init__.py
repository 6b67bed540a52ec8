"""llmtally: meter LLM token usage and cost for OpenAI, Anthropic and Gemini.

Two faces: a transparent HTTP proxy (``llmtally serve``) that writes one priced usage record per
call, and a library. See README.md and docs/.
"""

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

"""llmtally: meter LLM token usage and cost for OpenAI, Anthropic and Gemini.

Two faces: a transparent HTTP proxy (``llmtally serve``) that writes one priced usage record per
call, and a library. See README.md and docs/.
"""

from llmtally.config import Config, ConfigError, load_config
from llmtally.counters import TokenCount
from llmtally.record import Cost, TokenUsage, UsageRecord

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Cost",
    "TokenCount",
    "TokenUsage",
    "UsageRecord",
    "__version__",
    "load_config",
]

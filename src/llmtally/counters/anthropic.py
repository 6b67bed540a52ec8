"""Claude token estimates. No public tokenizer exists for Claude 3 and later.

The estimate is o200k_base tokens times a per-family factor; the counts are always flagged
``exact = False``. Provider-reported usage remains the billing truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmtally.counters.base import TokenCount, text_of
from llmtally.counters.bundled import tiktoken_encoding
from llmtally.record import Provider

#: Claude tokens per o200k_base token. A starting point only: Claude's tokenizers produce
#: more tokens than OpenAI's for the same text, most for code and non-English text.
DEFAULT_FACTOR = 1.2
#: Per-message framing tokens (role markers), an estimate.
PER_MESSAGE = 3


class AnthropicCounter:
    provider: Provider = "anthropic"

    def __init__(self, factor: float = DEFAULT_FACTOR) -> None:
        self.factor = factor

    def ready(self, model: str) -> bool:
        return True

    def _estimate(self, texts: Sequence[str], extra: int = 0) -> TokenCount:
        enc = tiktoken_encoding("o200k_base")
        n = sum(len(enc.encode_ordinary(t)) for t in texts)
        return TokenCount(
            input_tokens=round(n * self.factor) + extra,
            exact=False,
            tokenizer=f"o200k_base*{self.factor:g}",
        )

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        return self._estimate(texts)

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        texts: list[str] = []
        system = payload.get("system")
        if system is not None:
            texts.extend(text_of(_drop_media(system)))
        messages = payload.get("messages") or []
        for message in messages:
            if isinstance(message, dict):
                texts.extend(text_of(_drop_media(message.get("content"))))
        if payload.get("tools"):
            texts.extend(text_of(payload["tools"]))
        return self._estimate(texts, extra=PER_MESSAGE * len(messages))


def _drop_media(value: Any) -> Any:
    if isinstance(value, list):
        return [_drop_media(v) for v in value if not (isinstance(v, dict) and v.get("type") in _MEDIA)]
    if isinstance(value, dict):
        return {k: _drop_media(v) for k, v in value.items() if k not in ("source", "cache_control", "type")}
    return value


_MEDIA = frozenset({"image", "document"})

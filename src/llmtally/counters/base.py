"""What every provider's token counter offers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmtally.record import Provider


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A local token count. ``exact`` is True only when the provider's own tokenizer produced it."""

    input_tokens: int
    response_tokens: int = 0
    exact: bool = False
    #: Which tokenizer (and adjustment) produced the numbers, e.g. ``o200k_base``.
    tokenizer: str = ""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.response_tokens


class TokenCounter(Protocol):
    """One provider's local counting; registered in :mod:`llmtally.counters`."""

    provider: Provider

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        """Tokens of plain texts (no chat overhead)."""
        ...

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        """Input tokens of a request body of ``endpoint`` (the provider's endpoint name)."""
        ...

    def ready(self, model: str) -> bool:
        """True when counting for ``model`` needs no slow load (the proxy skips estimates otherwise)."""
        ...


def text_of(value: Any) -> list[str]:
    """Every string inside a JSON value, in order (for counting tool schemas and unknown parts)."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for key, val in reversed(list(item.items())):
                stack.append(val)
                stack.append(key)
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return out

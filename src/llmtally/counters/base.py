"""What every provider's token counter offers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmtally.record import Provider


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A local token count. ``exact`` is True only when the provider's own tokenizer and rules produced it."""

    input_tokens: int
    response_tokens: int = 0
    exact: bool = False
    #: Which tokenizer (and adjustment) produced the numbers, e.g. ``o200k_base`` or ``o200k_base*1.2``.
    tokenizer: str = ""
    #: Scaled estimates only: tokens of the text before scaling, and the unscaled fixed part
    #: (tool-use system prompt, images). Lets the estimate calibrate against reported usage.
    text_tokens: int | None = None
    fixed_tokens: int = 0
    #: Why a count is less exact than it could be (a fallback, an unsupported part), if it is.
    note: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.response_tokens


@dataclass(frozen=True, slots=True)
class ExactCountRequest:
    """An HTTP call to a provider's free token-count endpoint."""

    path: str  # appended to the provider's upstream base URL
    body: dict[str, Any]
    #: Header that carries the API key, and a prefix for its value.
    key_header: str
    key_prefix: str = ""
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ChatInput:
    """A conversation in the provider's own request format (the fields of its request body)."""

    messages: Sequence[Any] = ()
    tools: Sequence[Any] | None = None
    tool_choice: Any = None
    #: Anthropic ``system`` / Gemini ``systemInstruction`` (OpenAI puts it in ``messages``).
    system: Any = None


class TokenCounter(Protocol):
    """One provider's local counting; registered in :mod:`llmtally.counters`."""

    provider: Provider

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        """Tokens of plain texts (no chat overhead)."""
        ...

    def count_chat(self, model: str, chat: ChatInput) -> TokenCount:
        """Input tokens of a conversation as the provider would bill it."""
        ...

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        """Input tokens of a request body of ``endpoint`` (the provider's endpoint name)."""
        ...

    def ready(self, model: str) -> bool:
        """True when counting for ``model`` needs no slow load (the proxy skips estimates otherwise)."""
        ...

    def known_model(self, model: str) -> bool:
        """True when the counter knows which tokenizer ``model`` uses (strict mode refuses others)."""
        ...

    def observe(self, model: str, estimate: TokenCount, reported_input_tokens: int) -> None:
        """Learn from a provider-reported input count for a request we estimated (calibration)."""
        ...

    def exact_request(self, model: str, chat: ChatInput) -> ExactCountRequest:
        """The provider's count-endpoint call for ``chat``."""
        ...

    def exact_result(self, answer: Any) -> int:
        """The input token count in the count endpoint's answer."""
        ...


def text_of(value: Any) -> list[str]:
    """Every string inside a JSON value (keys and values), in order."""
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

"""OpenAI token counting with tiktoken: exact for text, cookbook rules for chat messages."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson

from llmtally.counters.base import TokenCount, text_of
from llmtally.counters.bundled import tiktoken_encoding
from llmtally.record import Provider

# Longest prefix wins; checked in order.
_ENCODING_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),  # Azure deployment names
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
    ("text-davinci-003", "p50k_base"),
    ("text-davinci-002", "p50k_base"),
    ("code-davinci", "p50k_base"),
    ("davinci-002", "cl100k_base"),
    ("babbage-002", "cl100k_base"),
)
#: Models we do not recognise are most likely new o200k-family models.
DEFAULT_ENCODING = "o200k_base"


def base_model(model: str) -> str:
    """``ft:gpt-4o-mini:org::id`` → ``gpt-4o-mini``; ``models/x`` → ``x``; lower case."""
    model = model.lower()
    if model.startswith("ft:"):
        model = model.split(":")[1]
    return model.removeprefix("openai/")


@lru_cache(maxsize=1024)
def encoding_name(model: str) -> tuple[str, bool]:
    """The tiktoken encoding for a model, and whether the model was recognised."""
    name = base_model(model)
    for prefix, encoding in _ENCODING_PREFIXES:
        if name.startswith(prefix):
            return encoding, True
    return DEFAULT_ENCODING, False


class OpenAICounter:
    provider: Provider = "openai"

    def ready(self, model: str) -> bool:
        return True  # tiktoken files load in well under a second

    def _encode_len(self, encoding: str, text: str) -> int:
        # Special-token strings count as plain text, as in the reference counts.
        return len(tiktoken_encoding(encoding).encode_ordinary(text))

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        encoding, known = encoding_name(model)
        n = sum(self._encode_len(encoding, t) for t in texts)
        return TokenCount(input_tokens=n, exact=known, tokenizer=encoding)

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        encoding, known = encoding_name(model)
        if endpoint == "chat.completions":
            n = self.count_messages(model, payload.get("messages") or [])
            exact = known and not payload.get("tools") and not payload.get("functions")
            n += self._count_json_strings(encoding, payload.get("tools") or payload.get("functions"))
        elif endpoint == "responses":
            n = self._count_json_strings(encoding, payload.get("instructions"))
            n += self._count_json_strings(encoding, payload.get("input"))
            n += self._count_json_strings(encoding, payload.get("tools"))
            exact = False  # the Responses API's hidden formatting is not published
        else:  # completions, embeddings: plain text (or token arrays)
            field = "prompt" if endpoint == "completions" else "input"
            n = self._count_plain(encoding, payload.get(field))
            exact = known
        return TokenCount(input_tokens=n, exact=exact, tokenizer=encoding)

    def count_messages(self, model: str, messages: list[Any]) -> int:
        """The OpenAI cookbook's rule: 3 per message (+1 per name), every string value, +3 priming."""
        encoding, _ = encoding_name(model)
        per_message, per_name = (4, -1) if base_model(model) == "gpt-3.5-turbo-0301" else (3, 1)
        total = 3
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += per_message
            for key, value in message.items():
                if isinstance(value, str):
                    total += self._encode_len(encoding, value)
                elif value is not None:
                    total += self._count_json_strings(encoding, value)
                if key == "name":
                    total += per_name
        return total

    def _count_plain(self, encoding: str, value: Any) -> int:
        if isinstance(value, str):
            return self._encode_len(encoding, value)
        if isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):
                return len(value)  # already tokens
            return sum(self._count_plain(encoding, v) for v in value)
        return 0

    def _count_json_strings(self, encoding: str, value: Any) -> int:
        if value is None:
            return 0
        if isinstance(value, str):
            return self._encode_len(encoding, value)
        if isinstance(value, list | dict):
            # Parts: count text, skip image/audio payloads (base64 is not prompt text).
            return sum(self._encode_len(encoding, s) for s in text_of(_without_media(value)))
        return self._encode_len(encoding, orjson.dumps(value).decode())


_MEDIA_KEYS = frozenset({"image_url", "input_audio", "file", "image", "data", "inlineData", "source"})


def _without_media(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_media(v) for k, v in value.items() if k not in _MEDIA_KEYS}
    if isinstance(value, list):
        return [_without_media(v) for v in value]
    return value

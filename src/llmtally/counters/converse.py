"""Local input estimates for Bedrock's Converse API: its messages, system and tool config, counted with
the Anthropic counter's calibrated o200k estimate (Converse serves Claude most of all; for other
vendors' models the estimate is rougher, and every count says it is an estimate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmtally.counters.anthropic import PER_MESSAGE, AnthropicCounter
from llmtally.counters.base import ChatInput, ExactCountRequest, TokenCount, text_of
from llmtally.record import Provider

#: Converse content blocks that carry bytes, not text (their size is not known locally).
_MEDIA = ("image", "document", "video")


class ConverseCounter(AnthropicCounter):
    provider: Provider = "converse"

    def known_model(self, model: str) -> bool:
        return bool(model)  # any Bedrock model id: Converse is one format for all of them

    def count_chat(self, model: str, chat: ChatInput) -> TokenCount:
        texts: list[str] = []
        fixed = 0
        note = None
        for block in chat.system if isinstance(chat.system, list) else ():
            texts.extend(_block_texts(block))
        for message in chat.messages:
            if not isinstance(message, dict):
                continue
            fixed += PER_MESSAGE
            for block in message.get("content") or ():
                if isinstance(block, dict) and any(kind in block for kind in _MEDIA):
                    note = "images, documents and videos are not counted locally"
                texts.extend(_block_texts(block))
        if chat.tools:
            texts.extend(text_of(list(chat.tools)))
        return self._estimate(model, texts, fixed, note)

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        messages = payload.get("messages")
        tools = get_tools(payload)
        return self.count_chat(
            model,
            ChatInput(
                messages=messages if isinstance(messages, list) else (),
                tools=tools or None,
                system=payload.get("system"),
            ),
        )

    def exact_request(self, model: str, chat: ChatInput) -> ExactCountRequest:
        from llmtally.counters.exact import ExactCountError

        raise ExactCountError("Converse has no count endpoint llmtally calls: its counts are estimates")


def get_tools(payload: dict[str, Any]) -> Sequence[Any]:
    config = payload.get("toolConfig")
    tools = config.get("tools") if isinstance(config, dict) else None
    return tools if isinstance(tools, list) else ()


def _block_texts(block: Any) -> list[str]:
    if not isinstance(block, dict):
        return []
    if isinstance(block.get("text"), str):
        return [block["text"]]
    for key in ("toolUse", "toolResult", "reasoningContent"):
        if key in block:
            return text_of(block[key])
    return []


#: Request fields of InvokeModel bodies that hold the prompt, by vendor: Llama / Mistral / DeepSeek
#: ``prompt``, Titan ``inputText``, Nova ``messages`` + ``system``, Cohere ``message`` + ``chat_history``.
_INVOKE_PROMPT_FIELDS = ("prompt", "inputText", "messages", "system", "message", "chat_history", "preamble")


class InvokeCounter(ConverseCounter):
    """Local input estimates for InvokeModel's model-native bodies: every string of the fields that
    hold the prompt, with the same calibrated o200k estimate (each count says it is one)."""

    provider: Provider = "invoke"

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        texts: list[str] = []
        for key in _INVOKE_PROMPT_FIELDS:
            if key in payload:
                _strings(payload[key], texts)
        return self._estimate(model, texts, 0, None)


def _strings(value: Any, out: list[str]) -> None:
    """Every string value (not key) inside a JSON value, in order; ``role`` values left out.
    Iterative: a hostile body may nest as deep as the JSON parser allows."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed([v for k, v in item.items() if k != "role"]))

"""OpenAI token counting with tiktoken.

- Text: exact (the provider's own tokenizer, the right encoding per model).
- Chat messages: the OpenAI cookbook's rule (3 tokens per message, every string value including the
  role, +1 per ``name``, +3 to prime the reply; gpt-3.5-turbo-0301: 4 and -1). Exact for text messages.
- Tools: rendered the way OpenAI's hidden prompt does (a TypeScript ``namespace functions``), plus 9,
  minus 4 when a system message exists (it absorbs the block). Matches the cookbook's published counts;
  flagged inexact because the hidden prompt is not documented.
- Images: the documented tile formula (detail low/high, base + per tile, by model family) or the
  32-px patch formula for patch models; sizes read from data URIs, 1024×1024 assumed for URLs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from llmtally.counters.base import ChatInput, ExactCountRequest, TokenCount, text_of
from llmtally.counters.bundled import tiktoken_encoding
from llmtally.counters.cache import TokenCache
from llmtally.counters.images import DEFAULT_SIZE, size_from_data_uri
from llmtally.record import Provider

# First matching prefix wins.
_ENCODING_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("codex", "o200k_base"),
    ("computer-use", "o200k_base"),
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
    ("code-cushman", "p50k_base"),
    ("davinci-002", "cl100k_base"),
    ("babbage-002", "cl100k_base"),
)
#: Models we do not recognise are most likely new o200k-family models.
DEFAULT_ENCODING = "o200k_base"


def base_model(model: str) -> str:
    """``ft:gpt-4o-mini:org::id`` → ``gpt-4o-mini``; drop an ``openai/`` prefix; lower case."""
    model = model.strip().lower()
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


# ---- images ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TileRule:
    base: int
    per_tile: int


@dataclass(frozen=True, slots=True)
class PatchRule:
    multiplier: float


# First matching prefix wins; the documented values per model family.
_IMAGE_RULES: tuple[tuple[str, TileRule | PatchRule], ...] = (
    ("gpt-4.1-mini", PatchRule(1.62)),
    ("gpt-4.1-nano", PatchRule(2.46)),
    ("gpt-5-mini", PatchRule(1.62)),
    ("gpt-5-nano", PatchRule(2.46)),
    ("o4-mini", PatchRule(1.72)),
    ("gpt-4o-mini", TileRule(2833, 5667)),
    ("gpt-5", TileRule(70, 140)),
    ("o1", TileRule(75, 150)),
    ("o3", TileRule(75, 150)),
    ("computer-use", TileRule(65, 129)),
    ("gpt-4o", TileRule(85, 170)),
    ("gpt-4.1", TileRule(85, 170)),
    ("gpt-4.5", TileRule(85, 170)),
    ("gpt-4", TileRule(85, 170)),
)
_PATCH = 32
_MAX_PATCHES = 1536


def image_tokens(model: str, width: int, height: int, detail: str = "auto") -> int:
    """Input tokens of one image for ``model`` (OpenAI's published formulas)."""
    name = base_model(model)
    rule: TileRule | PatchRule = TileRule(85, 170)
    for prefix, candidate in _IMAGE_RULES:
        if name.startswith(prefix):
            rule = candidate
            break
    if isinstance(rule, PatchRule):
        return math.ceil(_patches(width, height) * rule.multiplier)
    if detail == "low":
        return rule.base
    w, h = float(width), float(height)
    if max(w, h) > 2048:  # fit in a 2048×2048 square
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:  # then shortest side 768
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return rule.base + rule.per_tile * tiles


def _patches(width: int, height: int) -> int:
    raw = math.ceil(width / _PATCH) * math.ceil(height / _PATCH)
    if raw <= _MAX_PATCHES:
        return raw
    shrink = math.sqrt(_PATCH * _PATCH * _MAX_PATCHES / (width * height))
    w_patches, h_patches = width * shrink / _PATCH, height * shrink / _PATCH
    shrink *= min(math.floor(w_patches) / w_patches, math.floor(h_patches) / h_patches)
    return min(math.ceil(width * shrink / _PATCH) * math.ceil(height * shrink / _PATCH), _MAX_PATCHES)


# ---- tools: the hidden TypeScript rendering -----------------------------------------------------


def render_tools(tools: Sequence[Any]) -> str:
    """Function tools as OpenAI's hidden prompt shows them to the model."""
    lines = ["namespace functions {", ""]
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function", tool)  # tools=[{type, function}] or legacy functions=[{...}]
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        if fn.get("description"):
            lines.append(f"// {fn['description']}")
        params = fn.get("parameters")
        if isinstance(params, Mapping) and params.get("properties"):
            lines.append(f"type {fn['name']} = (_: {{")
            lines.extend(_render_properties(params, 0))
            lines.append("}) => any;")
        else:
            lines.append(f"type {fn['name']} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _render_properties(schema: Mapping[str, Any], indent: int) -> list[str]:
    out: list[str] = []
    required = set(schema.get("required") or ())
    pad = "  " * indent
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, Mapping):
            continue
        if prop.get("description"):
            out.append(f"{pad}// {prop['description']}")
        optional = "" if name in required else "?"
        out.append(f"{pad}{name}{optional}: {_render_type(prop, indent)},")
    return out


def _render_type(prop: Mapping[str, Any], indent: int) -> str:
    if prop.get("enum"):
        return " | ".join(orjson.dumps(v).decode() for v in prop["enum"])
    kind = prop.get("type")
    if isinstance(kind, list):
        return " | ".join(_render_type({**prop, "type": k}, indent) for k in kind)
    if kind == "array":
        items = prop.get("items")
        return f"{_render_type(items, indent)}[]" if isinstance(items, Mapping) else "any[]"
    if kind == "object":
        if prop.get("properties"):
            inner = _render_properties(prop, indent + 1)
            return "{\n" + "\n".join(inner) + "\n" + "  " * indent + "}"
        return "object"
    if kind in ("integer", "number"):
        return "number"
    if kind in ("string", "boolean", "null"):
        return str(kind)
    return "any"


@lru_cache(maxsize=8)
def _encoder(encoding: str) -> Any:
    enc = tiktoken_encoding(encoding)

    def encode_len(text: str) -> int:
        return len(enc.encode_ordinary(text))

    return encode_len


#: Fixed tokens around the rendered tools, fitted to the cookbook's published API counts.
TOOLS_OVERHEAD = 9
TOOLS_SYSTEM_MERGE = -4


class OpenAICounter:
    provider: Provider = "openai"

    def __init__(self, cache: TokenCache | None = None) -> None:
        self._cache = cache if cache is not None else TokenCache()

    def ready(self, model: str) -> bool:
        return True  # tiktoken files load in well under a second

    def known_model(self, model: str) -> bool:
        return encoding_name(model)[1]

    def observe(self, model: str, estimate: TokenCount, reported_input_tokens: int) -> None:
        return None  # exact rules: nothing to calibrate

    def encode_len(self, encoding: str, text: str) -> int:
        # Special-token strings count as plain text, as the reference counts do.
        return self._cache.count(encoding, text, _encoder(encoding))

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        encoding, known = encoding_name(model)
        n = sum(self.encode_len(encoding, t) for t in texts)
        return TokenCount(input_tokens=n, exact=known, tokenizer=encoding)

    def count_chat(self, model: str, chat: ChatInput) -> TokenCount:
        encoding, known = encoding_name(model)
        messages = list(chat.messages) if isinstance(chat.messages, list | tuple) else []
        total, exact = self._messages(model, encoding, messages)
        tools = (
            [t for t in chat.tools if isinstance(t, Mapping)] if isinstance(chat.tools, list | tuple) else []
        )
        if tools:
            total += self.encode_len(encoding, render_tools(tools)) + TOOLS_OVERHEAD
            if any(isinstance(m, Mapping) and m.get("role") in ("system", "developer") for m in messages):
                total += TOOLS_SYSTEM_MERGE
            total += self._tool_choice(encoding, chat.tool_choice)
            exact = False
        return TokenCount(input_tokens=total, exact=exact and known, tokenizer=encoding)

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        encoding, known = encoding_name(model)
        if endpoint == "chat.completions":
            return self.count_chat(
                model,
                ChatInput(
                    messages=payload.get("messages") or (),
                    tools=payload.get("tools") or payload.get("functions"),
                    tool_choice=payload.get("tool_choice", payload.get("function_call")),
                ),
            )
        if endpoint == "responses":
            return self._responses(model, encoding, payload)
        field = "prompt" if endpoint == "completions" else "input"
        n = self._plain(encoding, payload.get(field))
        return TokenCount(input_tokens=n, exact=known, tokenizer=encoding)

    def exact_request(self, model: str, chat: ChatInput) -> ExactCountRequest:
        """``POST /v1/responses/input_tokens`` (chat messages are valid Responses input items)."""
        body: dict[str, Any] = {"model": model, "input": list(chat.messages)}
        tools = []
        for tool in chat.tools or ():
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if isinstance(fn, Mapping):  # chat tool shape → Responses tool shape
                tools.append({"type": "function", **fn})
            elif isinstance(tool, Mapping):
                tools.append(dict(tool))
        if tools:
            body["tools"] = tools
        if chat.tool_choice is not None:
            body["tool_choice"] = chat.tool_choice
        return ExactCountRequest("/v1/responses/input_tokens", body, "Authorization", "Bearer ")

    def exact_result(self, answer: Any) -> int:
        return int(answer["input_tokens"])

    def count_messages(self, model: str, messages: Sequence[Any]) -> int:
        """The cookbook's message count (no tools)."""
        encoding, _ = encoding_name(model)
        return self._messages(model, encoding, list(messages))[0]

    # ---- internals ----

    def _messages(self, model: str, encoding: str, messages: list[Any]) -> tuple[int, bool]:
        per_message, per_name = (4, -1) if base_model(model) == "gpt-3.5-turbo-0301" else (3, 1)
        total = 3  # every reply is primed with <|start|>assistant<|message|>
        exact = True
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            total += per_message
            for key, value in message.items():
                if key == "tool_call_id":
                    continue  # an id, not rendered into the prompt
                if isinstance(value, str):
                    total += self.encode_len(encoding, value)
                elif key == "content" and isinstance(value, list):
                    n, parts_exact = self._content_parts(model, encoding, value)
                    total += n
                    exact = exact and parts_exact
                elif key in ("tool_calls", "function_call") and value:
                    total += self._tool_calls(encoding, value)
                    exact = False
                elif value is not None:
                    total += sum(self.encode_len(encoding, s) for s in text_of(value))
                    exact = False
                if key == "name":
                    total += per_name
        return total, exact

    def _content_parts(self, model: str, encoding: str, parts: list[Any]) -> tuple[int, bool]:
        total, exact = 0, True
        for part in parts:
            if isinstance(part, str):
                total += self.encode_len(encoding, part)
                continue
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                total += self.encode_len(encoding, part["text"])
            elif kind in ("image_url", "input_image"):
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                detail = (image.get("detail") if isinstance(image, Mapping) else None) or part.get("detail")
                size = size_from_data_uri(url) if isinstance(url, str) else None
                if size is None:
                    size, exact = DEFAULT_SIZE, False
                total += image_tokens(model, size[0], size[1], str(detail or "auto"))
            else:  # audio, files: not counted locally
                exact = False
        return total, exact

    def _tool_calls(self, encoding: str, value: Any) -> int:
        calls = value if isinstance(value, list) else [{"function": value}]
        total = 0
        for call in calls:
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str):
                        total += self.encode_len(encoding, fn[key])
                total += 3
        return total

    def _tool_choice(self, encoding: str, choice: Any) -> int:
        if choice in (None, "auto", "required"):
            return 0
        if choice == "none":
            return 1
        name = None
        if isinstance(choice, Mapping):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        return self.encode_len(encoding, name) + 4 if isinstance(name, str) else 0

    def _responses(self, model: str, encoding: str, payload: dict[str, Any]) -> TokenCount:
        items = payload.get("input")
        messages: list[Any] = []
        if isinstance(payload.get("instructions"), str):
            messages.append({"role": "developer", "content": payload["instructions"]})
        if isinstance(items, str):
            messages.append({"role": "user", "content": items})
        elif isinstance(items, list):
            for item in items:
                if isinstance(item, Mapping) and isinstance(item.get("role"), str):
                    messages.append({"role": item["role"], "content": item.get("content")})
                elif isinstance(item, Mapping):  # function calls and outputs
                    messages.append(
                        {"role": "tool", "content": text_of(item.get("arguments") or item.get("output"))}
                    )
        raw_tools = payload.get("tools")
        tools = [
            {"function": t} if "name" in t and "function" not in t else t
            for t in (raw_tools if isinstance(raw_tools, list) else ())
            if isinstance(t, Mapping) and t.get("type", "function") == "function"
        ]
        count = self.count_chat(
            model, ChatInput(messages=messages, tools=tools, tool_choice=payload.get("tool_choice"))
        )
        # The Responses API's own framing is not published: the count is an estimate.
        return TokenCount(count.input_tokens, exact=False, tokenizer=encoding)

    def _plain(self, encoding: str, value: Any) -> int:
        if isinstance(value, str):
            return self.encode_len(encoding, value)
        if isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):
                return len(value)  # already tokens
            return sum(self._plain(encoding, v) for v in value)
        return 0

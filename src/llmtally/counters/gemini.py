"""Gemini token counting: the Gemma 3 tokenizer, exact for text on the models that use it.

google-genai maps Gemini 2.x and the Gemini 3 previews (3-pro, 3-flash) to Gemma 3, and the later
3.x models (3.1, 3.5, …) to a Gemma 4 tokenizer that llmtally does not bundle: those are counted
with Gemma 3 and flagged inexact.

Requests are counted the way google-genai's local tokenizer does: the sum of the tokens of a flat
list of texts (text parts; function-call names, argument keys and string values; function responses;
tool declarations' names, descriptions and schemas; the response schema; the system instruction),
with no per-message overhead. Media use the documented rates: 258 tokens per image up to 384 px on
both sides, else 258 per 768×768 tile; audio 32 tokens/s and video 263 tokens/s when the duration
is known (media counts are estimates).

Loading the tokenizer takes ~1.5 s and ~100 MB (~570 MB peak), so it loads once, only when needed,
and the proxy never triggers it unless ``[counters.gemini] preload`` is set; until then the proxy's
Gemini estimates use o200k_base scaled by the corpus ratio (flagged inexact).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmtally.counters.base import ChatInput, ExactCountRequest, TokenCount
from llmtally.counters.bundled import (
    TokenizerUnavailable,
    bundled_path,
    read_verified,
    return_freed_memory,
    tiktoken_encoding,
)
from llmtally.counters.cache import TokenCache
from llmtally.counters.images import DEFAULT_SIZE, size_from_base64
from llmtally.record import Provider

log = logging.getLogger("llmtally.counters")

BUNDLED_TOKENIZER = "gemma3.tokenizer.json.gz"
#: gemma3 tokens per o200k_base token over the shared corpus (1.157 overall, 1.10 median).
APPROX_RATIO = 1.157
#: Models google-genai maps to the Gemma 3 tokenizer (prefixes).
_GEMMA3_MODELS = ("gemini-2.", "gemini-2-", "gemini-live-2.5", "gemini-3-pro", "gemini-3-flash", "gemma-3")
#: Later Gemini models use a tokenizer we do not have; Gemma 3 is the closest approximation.
_LATER_GEMINI = ("gemini-3", "gemini-4", "gemma-4")
IMAGE_TOKENS = 258
IMAGE_SMALL_PX = 384
IMAGE_TILE_PX = 768
AUDIO_TOKENS_PER_S = 32
VIDEO_TOKENS_PER_S = 263


def _model_name(model: str) -> str:
    return model.lower().removeprefix("models/").removeprefix("google/")


def _is_gemma3_model(model: str) -> bool:
    """Exact: the model's own tokenizer is Gemma 3."""
    return _model_name(model).startswith(_GEMMA3_MODELS)


def _uses_gemma(model: str) -> bool:
    """Counted with Gemma 3: its own tokenizer, or the closest one for later models."""
    name = _model_name(model)
    return name.startswith(_GEMMA3_MODELS) or name.startswith(_LATER_GEMINI)


def image_tokens(width: int, height: int) -> int:
    """Gemini 2.x image tokens: 258 up to 384×384, else 258 per 768×768 tile."""
    if width <= IMAGE_SMALL_PX and height <= IMAGE_SMALL_PX:
        return IMAGE_TOKENS
    return IMAGE_TOKENS * math.ceil(width / IMAGE_TILE_PX) * math.ceil(height / IMAGE_TILE_PX)


class GeminiCounter:
    provider: Provider = "gemini"

    def __init__(
        self,
        tokenizer_path: str = "",
        load_on_demand: bool = True,
        cache: TokenCache | None = None,
        strict: bool = False,
    ) -> None:
        self._path = tokenizer_path or os.environ.get("LLMTALLY_GEMINI_TOKENIZER", "")
        self._load_on_demand = load_on_demand
        #: strict: a tokenizer that cannot load raises; otherwise counts fall back to a flagged estimate.
        self._strict = strict
        self._load_error: str | None = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache = cache if cache is not None else TokenCache()

    def ready(self, model: str) -> bool:
        return self._tokenizer is not None or not _uses_gemma(model)

    def known_model(self, model: str) -> bool:
        return _uses_gemma(model)

    def observe(self, model: str, estimate: TokenCount, reported_input_tokens: int) -> None:
        return None

    def load(self) -> Any:
        """Load the tokenizer (once, thread-safe); raises TokenizerUnavailable."""
        if self._tokenizer is not None:
            return self._tokenizer
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _load_tokenizer(self._path)
        return self._tokenizer

    def _count_texts(self, model: str, texts: Sequence[str]) -> TokenCount:
        tok = self._tokenizer_for(model)
        if tok is not None:

            def gemma_len(text: str) -> int:
                return len(tok.encode(text, add_special_tokens=False).ids)

            n = sum(self._cache.count("gemma3", t, gemma_len) for t in texts)
            if _is_gemma3_model(model):
                return TokenCount(n, exact=True, tokenizer="gemma3")
            note = f"{model} uses a newer tokenizer than Gemma 3 (not bundled): counted with Gemma 3"
            return TokenCount(n, exact=False, tokenizer="gemma3", note=note)
        enc = tiktoken_encoding("o200k_base")

        def o200k_len(text: str) -> int:
            return len(enc.encode_ordinary(text))

        n = sum(self._cache.count("o200k_base", t, o200k_len) for t in texts)
        if not _uses_gemma(model):
            note = f"no public tokenizer for {model}"
        else:
            note = self._load_error or "Gemma 3 tokenizer not loaded"
        return TokenCount(round(n * APPROX_RATIO), exact=False, tokenizer="o200k_base*1.157", note=note)

    def _tokenizer_for(self, model: str) -> Any:
        if not _uses_gemma(model) or (self._tokenizer is None and not self._load_on_demand):
            return None
        if self._load_error is not None and not self._strict:
            return None  # failed before: do not retry the slow load on every count
        try:
            return self.load()
        except TokenizerUnavailable as exc:
            if self._strict:
                raise
            self._load_error = f"Gemma 3 tokenizer unavailable ({exc}): estimated"
            log.error("%s", self._load_error)
            return None

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        return self._count_texts(model, texts)

    def count_chat(self, model: str, chat: ChatInput) -> TokenCount:
        acc = _Texts()
        for content in chat.messages if isinstance(chat.messages, list | tuple) else ():
            acc.content(content)
        for tool in chat.tools if isinstance(chat.tools, list | tuple) else ():
            acc.tool(tool)
        if chat.system is not None:
            acc.content(chat.system)
        count = self._count_texts(model, acc.texts)
        return TokenCount(
            count.input_tokens + acc.media_tokens,
            exact=count.exact and acc.media_tokens == 0 and not acc.unsupported,
            tokenizer=count.tokenizer,
            note=count.note or (acc.unsupported or None),
        )

    def exact_request(self, model: str, chat: ChatInput) -> ExactCountRequest:
        """``POST /v1beta/models/{model}:countTokens`` with a full ``generateContentRequest``."""
        name = _model_name(model)
        request: dict[str, Any] = {"model": f"models/{name}", "contents": _as_contents(chat.messages)}
        if chat.system is not None:
            request["systemInstruction"] = _as_contents([chat.system])[0]
        if chat.tools:
            request["tools"] = list(chat.tools)
        return ExactCountRequest(
            f"/v1beta/models/{name}:countTokens", {"generateContentRequest": request}, "x-goog-api-key"
        )

    def exact_result(self, answer: Any) -> int:
        return int(answer["totalTokens"])

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        if endpoint == "batchEmbedContents":
            requests = payload.get("requests")
            contents = (
                [r.get("content") for r in requests if isinstance(r, Mapping)]
                if isinstance(requests, list)
                else []
            )
            return self.count_chat(model, ChatInput(messages=contents))
        if endpoint == "embedContent":
            return self.count_chat(model, ChatInput(messages=[payload.get("content")]))
        chat = ChatInput(
            messages=payload.get("contents") or (),
            tools=payload.get("tools"),
            system=_get(payload, "systemInstruction", "system_instruction"),
        )
        count = self.count_chat(model, chat)
        config = _get(payload, "generationConfig", "generation_config")
        schema = _get(config, "responseSchema", "response_schema") if isinstance(config, Mapping) else None
        if schema is None:
            return count
        extra = _Texts()
        extra.schema(schema)
        more = self._count_texts(model, extra.texts)
        return TokenCount(
            count.input_tokens + more.input_tokens, exact=count.exact, tokenizer=count.tokenizer
        )


def _as_contents(messages: Sequence[Any]) -> list[Any]:
    """Strings become user contents, as google-genai does."""
    return [{"role": "user", "parts": [{"text": m}]} if isinstance(m, str) else m for m in messages]


def _get(obj: Any, *names: str) -> Any:
    if not isinstance(obj, Mapping):
        return None
    for name in names:
        if name in obj:
            return obj[name]
    return None


class _Texts:
    """Collects the texts google-genai's local tokenizer counts, from wire JSON (camel or snake case)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.media_tokens = 0
        self.unsupported = ""

    def content(self, content: Any) -> None:
        if isinstance(content, str):
            self.texts.append(content)
            return
        if isinstance(content, list):  # a bare list of parts
            for part in content:
                self.part(part)
            return
        if not isinstance(content, Mapping):
            return
        parts = content.get("parts")
        if isinstance(parts, str | list):  # anything else (a number, a bool) holds nothing to count
            self.content(parts)

    def part(self, part: Any) -> None:
        if isinstance(part, str):
            self.texts.append(part)
            return
        if not isinstance(part, Mapping):
            return
        if isinstance(part.get("text"), str):
            self.texts.append(part["text"])
        call = _get(part, "functionCall", "function_call")
        if isinstance(call, Mapping):
            if isinstance(call.get("name"), str):
                self.texts.append(call["name"])
            if isinstance(call.get("args"), Mapping):
                self.value(call["args"])
        response = _get(part, "functionResponse", "function_response")
        if isinstance(response, Mapping):
            if isinstance(response.get("name"), str):
                self.texts.append(response["name"])
            if isinstance(response.get("response"), Mapping):
                self.value(response["response"])
        inline = _get(part, "inlineData", "inline_data")
        if isinstance(inline, Mapping):
            self.media(str(_get(inline, "mimeType", "mime_type") or ""), inline.get("data"), part)
        file_data = _get(part, "fileData", "file_data")
        if isinstance(file_data, Mapping):
            self.media(str(_get(file_data, "mimeType", "mime_type") or ""), None, part)

    def media(self, mime: str, data: Any, part: Mapping[str, Any]) -> None:
        if mime.startswith("image/"):
            size = size_from_base64(data) if isinstance(data, str) else None
            w, h = size or DEFAULT_SIZE
            self.media_tokens += image_tokens(w, h)
            if size is None:
                self.unsupported = "image size unknown: 1024x1024 assumed"
            return
        seconds = _duration_s(_get(part, "videoMetadata", "video_metadata"))
        rate = VIDEO_TOKENS_PER_S if mime.startswith("video/") else AUDIO_TOKENS_PER_S
        if seconds is not None and (mime.startswith(("audio/", "video/"))):
            self.media_tokens += math.ceil(seconds * rate)
        else:
            self.unsupported = f"{mime or 'media'} without a known duration is not counted"

    def tool(self, tool: Any) -> None:
        if not isinstance(tool, Mapping):
            return
        for decl in _get(tool, "functionDeclarations", "function_declarations") or ():
            if not isinstance(decl, Mapping):
                continue
            for key in ("name", "description"):
                if isinstance(decl.get(key), str):
                    self.texts.append(decl[key])
            for key in ("parameters", "response", "parametersJsonSchema", "parameters_json_schema"):
                if isinstance(decl.get(key), Mapping):
                    self.schema(decl[key])

    def schema(self, schema: Any) -> None:
        if not isinstance(schema, Mapping):
            return
        for key in ("format", "description"):
            if isinstance(schema.get(key), str):
                self.texts.append(schema[key])
        for key in ("enum", "required"):
            self.texts.extend(v for v in schema.get(key) or () if isinstance(v, str))
        if isinstance(schema.get("items"), Mapping):
            self.schema(schema["items"])
        for name, sub in (schema.get("properties") or {}).items():
            self.texts.append(name)
            self.schema(sub)
        if "example" in schema:
            self.value(schema["example"])

    def value(self, value: Any) -> None:
        if isinstance(value, str):
            self.texts.append(value)
        elif isinstance(value, Mapping):
            self.texts.extend(str(key) for key in value)  # keys first, as google-genai does
            for item in value.values():
                self.value(item)
        elif isinstance(value, list):
            for item in value:
                self.value(item)


def _duration_s(meta: Any) -> float | None:
    """Seconds between videoMetadata startOffset and endOffset (``"12.5s"``), if both are given."""
    if not isinstance(meta, Mapping):
        return None

    def seconds(value: Any) -> float | None:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str) and value.endswith("s"):
            try:
                return float(value[:-1])
            except ValueError:
                return None
        return None

    start = seconds(_get(meta, "startOffset", "start_offset")) or 0.0
    end = seconds(_get(meta, "endOffset", "end_offset"))
    return end - start if end is not None and end > start else None


def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise TokenizerUnavailable("the 'tokenizers' package is not installed") from exc
    if path.endswith(".model"):
        return _sentencepiece(path)
    if not path:
        raw = read_verified(BUNDLED_TOKENIZER)
        source = str(bundled_path(BUNDLED_TOKENIZER))
    else:
        source = path
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise TokenizerUnavailable(f"Gemini tokenizer {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerUnavailable(f"Gemini tokenizer {source}: cannot load: {exc}") from None
    del raw
    return_freed_memory()
    log.info("loaded Gemini tokenizer from %s", source)
    return tokenizer


class _SentencePieceAdapter:
    """Gives a SentencePiece model the ``encode`` shape of a HF tokenizer."""

    class _Ids:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def __init__(self, processor: Any) -> None:
        self._sp = processor

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        return self._Ids(self._sp.encode(text))


def _sentencepiece(path: str) -> Any:
    try:
        import sentencepiece  # type: ignore[import-not-found]
    except ImportError:
        raise TokenizerUnavailable(
            f"Gemini tokenizer {path}: a SentencePiece .model needs the 'sentencepiece' package"
        ) from None
    try:
        return _SentencePieceAdapter(sentencepiece.SentencePieceProcessor(model_file=path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerUnavailable(f"Gemini tokenizer {path}: cannot load: {exc}") from None

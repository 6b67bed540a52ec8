"""Gemini token counting: the Gemma 3 tokenizer (exact for text on Gemini 2.x and 3.x).

Loading that tokenizer takes ~2 s and ~400 MB, so it is loaded once, only when needed, and the
proxy never triggers it on its own unless ``[counters.gemini] preload`` is set; until then
the proxy's Gemini estimates use o200k_base scaled by the corpus ratio (flagged as approximate).
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtally.counters.base import TokenCount, text_of
from llmtally.counters.bundled import TokenizerUnavailable, bundled_path, read_verified, tiktoken_encoding
from llmtally.record import Provider

log = logging.getLogger("llmtally.counters")

BUNDLED_TOKENIZER = "gemma3.tokenizer.json.gz"
#: gemma3 tokens per o200k_base token over the shared corpus (1.157 overall, 1.10 median).
APPROX_RATIO = 1.157
_GEMMA3_FAMILIES = ("gemini-2", "gemini-3", "gemma-3")


def _is_gemma3_model(model: str) -> bool:
    name = model.lower().removeprefix("models/")
    return name.startswith(_GEMMA3_FAMILIES)


class GeminiCounter:
    provider: Provider = "gemini"

    def __init__(self, tokenizer_path: str = "", load_on_demand: bool = True) -> None:
        self._path = tokenizer_path or os.environ.get("LLMTALLY_GEMINI_TOKENIZER", "")
        self._load_on_demand = load_on_demand
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def ready(self, model: str) -> bool:
        return self._tokenizer is not None or not _is_gemma3_model(model)

    def load(self) -> Any:
        """Load the tokenizer (once, thread-safe); raises TokenizerUnavailable."""
        if self._tokenizer is not None:
            return self._tokenizer
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _load_tokenizer(self._path)
        return self._tokenizer

    def _tokens(self, model: str, texts: Sequence[str]) -> TokenCount:
        if _is_gemma3_model(model) and (self._tokenizer is not None or self._load_on_demand):
            tok = self.load()
            encoded = tok.encode_batch(list(texts), add_special_tokens=False) if texts else []
            return TokenCount(sum(len(e.ids) for e in encoded), exact=True, tokenizer="gemma3")
        enc = tiktoken_encoding("o200k_base")
        n = sum(len(enc.encode_ordinary(t)) for t in texts)
        return TokenCount(round(n * APPROX_RATIO), exact=False, tokenizer="o200k_base*1.157")

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        return self._tokens(model, texts)

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        texts: list[str] = []
        if endpoint == "batchEmbedContents":
            for req in payload.get("requests") or ():
                texts.extend(_content_texts(req.get("content") if isinstance(req, dict) else None))
        elif endpoint == "embedContent":
            texts.extend(_content_texts(payload.get("content")))
        else:
            for content in payload.get("contents") or ():
                texts.extend(_content_texts(content))
            texts.extend(
                _content_texts(payload.get("systemInstruction") or payload.get("system_instruction"))
            )
            if payload.get("tools"):
                texts.extend(text_of(payload["tools"]))
        count = self._tokens(model, texts)
        # Tools and function parts are rendered by a hidden template: the count is then approximate.
        exact = count.exact and not payload.get("tools")
        return TokenCount(count.input_tokens, exact=exact, tokenizer=count.tokenizer)


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, dict):
        return []
    out: list[str] = []
    for part in content.get("parts") or ():
        if isinstance(part, dict):
            if isinstance(part.get("text"), str):
                out.append(part["text"])
            for key in ("functionCall", "functionResponse"):
                if key in part:
                    out.extend(text_of(part[key]))
    return out


def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise TokenizerUnavailable("the 'tokenizers' package is not installed") from exc
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
    if path.endswith(".model"):
        return _sentencepiece(path)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerUnavailable(f"Gemini tokenizer {source}: cannot load: {exc}") from None
    log.info("loaded Gemini tokenizer from %s", source)
    return tokenizer


class _SentencePieceAdapter:
    """Gives a SentencePiece model the ``encode_batch`` shape of a HF tokenizer."""

    def __init__(self, processor: Any) -> None:
        self._sp = processor

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[Any]:
        class _Ids:
            def __init__(self, ids: list[int]) -> None:
                self.ids = ids

        return [_Ids(ids) for ids in self._sp.encode(texts)]


def _sentencepiece(path: str) -> Any:
    try:
        import sentencepiece  # type: ignore[import-not-found]
    except ImportError:
        raise TokenizerUnavailable(
            f"Gemini tokenizer {path}: a SentencePiece .model needs the 'sentencepiece' package"
        ) from None
    return _SentencePieceAdapter(sentencepiece.SentencePieceProcessor(model_file=path))

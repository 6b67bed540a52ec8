"""Claude token estimates. No public tokenizer exists for Claude 3 and later.

An estimate is ``round(text_tokens × factor) + fixed``, always flagged ``exact = False``:

- ``text_tokens``: o200k_base tokens of every text in the request (system, messages, tool schemas);
- ``factor``: Claude tokens per o200k token for the model family. It starts at DEFAULT_FACTOR and
  calibrates itself from the provider-reported ``input_tokens`` the tracker and proxy see: the
  median of the last WINDOW observed ratios (robust to outliers), bounded to FACTOR_BOUNDS;
- ``fixed``: Anthropic's documented tool-use system prompt for the model and ``tool_choice``, images
  as ``ceil(w/28)·ceil(h/28)`` after the documented downscaling, and per-message framing.

Exact counts are available through Anthropic's free ``count_tokens`` endpoint (opt-in, see the tracker).
"""

from __future__ import annotations

import math
import re
import statistics
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmtally.counters.base import ChatInput, ExactCountRequest, TokenCount, text_of
from llmtally.counters.bundled import tiktoken_encoding
from llmtally.counters.cache import TokenCache
from llmtally.counters.images import DEFAULT_SIZE, size_from_base64
from llmtally.record import Provider

#: Claude tokens per o200k_base token before any calibration. Claude's tokenizers produce more
#: tokens than OpenAI's for the same text (most for code and non-English text).
DEFAULT_FACTOR = 1.2
FACTOR_BOUNDS = (0.7, 2.5)
WINDOW = 200
MIN_SAMPLES = 5
#: Ratios from prompts shorter than this are too noisy to learn from.
MIN_TEXT_TOKENS = 50
PER_MESSAGE = 3

#: Tool-use system prompt tokens (Anthropic's pricing docs): (auto/none, any/tool), by family prefix.
_TOOL_PROMPT: tuple[tuple[str, tuple[int, int]], ...] = (
    ("claude-3-opus", (530, 281)),
    ("claude-3-sonnet", (159, 235)),
    ("claude-3-haiku", (264, 340)),
    ("claude-3-5-haiku", (264, 340)),
    ("claude-3-5-sonnet", (346, 313)),
    ("claude-3-7-sonnet", (346, 313)),
)
#: Claude 4 and later families all document 346 / 313.
_TOOL_PROMPT_DEFAULT = (346, 313)
#: Images are downscaled to a long edge of 1568 px and about 1.15 megapixels.
IMAGE_MAX_EDGE = 1568
IMAGE_MAX_PIXELS = 1_150_000
_DATED = re.compile(r"(?:-\d{8}|@\d{8}|-latest|-v\d+(?::\d+)?)$")


def model_family(model: str) -> str:
    """``claude-sonnet-4-5-20250929`` → ``claude-sonnet-4-5``; Bedrock/Vertex prefixes dropped."""
    name = model.strip().lower().removeprefix("anthropic.").removeprefix("anthropic/")
    while (stripped := _DATED.sub("", name)) != name:  # Bedrock: -20240620-v1:0
        name = stripped
    return name


def tool_prompt_tokens(model: str, tool_choice: Any) -> int:
    family = model_family(model)
    auto, forced = next((v for prefix, v in _TOOL_PROMPT if family.startswith(prefix)), _TOOL_PROMPT_DEFAULT)
    kind = tool_choice.get("type") if isinstance(tool_choice, Mapping) else tool_choice
    return forced if kind in ("any", "tool") else auto


def image_tokens(width: int, height: int) -> int:
    scale = min(1.0, IMAGE_MAX_EDGE / max(width, height), math.sqrt(IMAGE_MAX_PIXELS / (width * height)))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return math.ceil(w / 28) * math.ceil(h / 28)


@dataclass(frozen=True, slots=True)
class Calibration:
    """The current factor for a model family and how well it predicted recent calls."""

    family: str
    factor: float
    samples: int
    #: 10th and 90th percentile of (observed ratio / factor - 1): the estimate's recent error band.
    error_low: float | None
    error_high: float | None


class FactorCalibrator:
    """Per-family factor: median of recent reported/local ratios, bounded."""

    def __init__(self, default: float = DEFAULT_FACTOR) -> None:
        self.default = default
        self._ratios: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def observe(self, family: str, text_tokens: int, reported_text_tokens: int) -> None:
        if text_tokens < MIN_TEXT_TOKENS or reported_text_tokens <= 0:
            return
        ratio = reported_text_tokens / text_tokens
        if not FACTOR_BOUNDS[0] / 2 <= ratio <= FACTOR_BOUNDS[1] * 2:
            return  # an outlier beyond any plausible tokenizer difference (e.g. a mismatched request)
        with self._lock:
            self._ratios.setdefault(family, deque(maxlen=WINDOW)).append(ratio)

    def factor(self, family: str) -> float:
        with self._lock:
            ratios = list(self._ratios.get(family, ()))
        if len(ratios) < MIN_SAMPLES:
            return self.default
        low, high = FACTOR_BOUNDS
        return min(max(statistics.median(ratios), low), high)

    def calibration(self, family: str) -> Calibration:
        with self._lock:
            ratios = list(self._ratios.get(family, ()))
        factor = self.factor(family)
        if len(ratios) < MIN_SAMPLES:
            return Calibration(family, factor, len(ratios), None, None)
        errors = sorted(r / factor - 1 for r in ratios)
        deciles = statistics.quantiles(errors, n=10, method="inclusive")
        return Calibration(family, factor, len(ratios), deciles[0], deciles[-1])


class AnthropicCounter:
    provider: Provider = "anthropic"

    def __init__(self, cache: TokenCache | None = None, calibrator: FactorCalibrator | None = None) -> None:
        self._cache = cache if cache is not None else TokenCache()
        self.calibrator = calibrator if calibrator is not None else FactorCalibrator()

    def ready(self, model: str) -> bool:
        return True

    def known_model(self, model: str) -> bool:
        return model_family(model).startswith("claude")

    def _text_tokens(self, texts: Sequence[str]) -> int:
        enc = tiktoken_encoding("o200k_base")

        def o200k_len(text: str) -> int:
            return len(enc.encode_ordinary(text))

        return sum(self._cache.count("o200k_base", t, o200k_len) for t in texts)

    def _estimate(self, model: str, texts: Sequence[str], fixed: int, note: str | None = None) -> TokenCount:
        text_tokens = self._text_tokens(texts)
        factor = self.calibrator.factor(model_family(model))
        return TokenCount(
            input_tokens=round(text_tokens * factor) + fixed,
            exact=False,
            tokenizer=f"o200k_base*{factor:.3f}",
            text_tokens=text_tokens,
            fixed_tokens=fixed,
            note=note,
        )

    def count_text(self, model: str, texts: Sequence[str]) -> TokenCount:
        return self._estimate(model, texts, 0)

    def count_chat(self, model: str, chat: ChatInput) -> TokenCount:
        texts: list[str] = []
        fixed = 0
        note = None
        if chat.system is not None:
            texts.extend(_texts(chat.system))
        for message in _list(chat.messages):
            if not isinstance(message, Mapping):
                continue
            fixed += PER_MESSAGE
            content = message.get("content")
            texts.extend(_texts(content))
            for block in content if isinstance(content, list) else ():
                if isinstance(block, Mapping) and block.get("type") == "image":
                    size = _image_size(block)
                    if size is None:
                        size, note = DEFAULT_SIZE, "image size unknown: 1024x1024 assumed"
                    fixed += image_tokens(*size)
                elif isinstance(block, Mapping) and block.get("type") == "document":
                    note = "documents are not counted locally"
        if _list(chat.tools):
            texts.extend(text_of([_tool_text(t) for t in _list(chat.tools)]))
            fixed += tool_prompt_tokens(model, chat.tool_choice)
        return self._estimate(model, texts, fixed, note)

    def count_request(self, model: str, endpoint: str, payload: dict[str, Any]) -> TokenCount:
        return self.count_chat(
            model,
            ChatInput(
                messages=payload.get("messages") or (),
                tools=payload.get("tools"),
                tool_choice=payload.get("tool_choice"),
                system=payload.get("system"),
            ),
        )

    def exact_request(self, model: str, chat: ChatInput) -> ExactCountRequest:
        """``POST /v1/messages/count_tokens`` (free, rate-limited)."""
        body: dict[str, Any] = {"model": model, "messages": list(chat.messages)}
        if chat.system is not None:
            body["system"] = chat.system
        if chat.tools:
            body["tools"] = list(chat.tools)
        if chat.tool_choice is not None:
            body["tool_choice"] = chat.tool_choice
        return ExactCountRequest(
            "/v1/messages/count_tokens", body, "x-api-key", headers={"anthropic-version": "2023-06-01"}
        )

    def exact_result(self, answer: Any) -> int:
        return int(answer["input_tokens"])

    def observe(self, model: str, estimate: TokenCount, reported_input_tokens: int) -> None:
        """Learn the family factor from a reported ``input_tokens`` (cache reads and writes included)."""
        if estimate.text_tokens is None:
            return
        self.calibrator.observe(
            model_family(model), estimate.text_tokens, reported_input_tokens - estimate.fixed_tokens
        )

    def calibration(self, model: str) -> Calibration:
        """The current factor for ``model``'s family and its recent error band."""
        return self.calibrator.calibration(model_family(model))


def _list(value: Any) -> list[Any]:
    """A list field of a request, or nothing when it is not a list (bad input is not our failure)."""
    return list(value) if isinstance(value, list | tuple) else []


def _texts(content: Any) -> list[str]:
    """Text of a system/content value: strings and text/thinking/tool blocks, not media payloads."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    for block in content if isinstance(content, list) else ():
        if isinstance(block, str):
            out.append(block)
        elif isinstance(block, Mapping):
            kind = block.get("type")
            if kind in ("image", "document"):
                continue
            for key in ("text", "thinking", "name"):
                if isinstance(block.get(key), str):
                    out.append(block[key])
            if "input" in block:
                out.extend(text_of(block["input"]))
            if "content" in block:  # tool_result
                out.extend(_texts(block["content"]))
    return out


def _tool_text(tool: Any) -> Any:
    if not isinstance(tool, Mapping):
        return None
    return {k: tool[k] for k in ("name", "description", "input_schema") if k in tool}


def _image_size(block: Mapping[str, Any]) -> tuple[int, int] | None:
    source = block.get("source")
    if isinstance(source, Mapping) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        return size_from_base64(source["data"])
    return None

"""Claude estimates: fixed parts from Anthropic's docs, and a factor that calibrates itself."""

from __future__ import annotations

import random

from llmtally.counters import ChatInput
from llmtally.counters.anthropic import (
    DEFAULT_FACTOR,
    AnthropicCounter,
    image_tokens,
    model_family,
    tool_prompt_tokens,
)

TOOLS = [
    {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}
]


def test_families() -> None:
    assert model_family("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert model_family("anthropic.claude-3-5-sonnet-20240620-v1:0") == "claude-3-5-sonnet"
    assert model_family("claude-3-5-sonnet@20240620") == "claude-3-5-sonnet"


def test_tool_use_system_prompt_per_model_and_tool_choice() -> None:
    assert tool_prompt_tokens("claude-sonnet-5", None) == 346
    assert tool_prompt_tokens("claude-sonnet-5", {"type": "any"}) == 313
    assert tool_prompt_tokens("claude-3-opus-20240229", {"type": "auto"}) == 530
    assert tool_prompt_tokens("claude-3-haiku-20240307", {"type": "tool", "name": "x"}) == 340


def test_image_tokens_within_documented_caps() -> None:
    assert image_tokens(1092, 1092) == 39 * 39  # within the caps: ceil(w/28)·ceil(h/28)
    assert image_tokens(4000, 3000) <= 1600  # downscaled to ~1.15 MP
    assert image_tokens(200, 200) == 64


def test_estimate_is_flagged_and_includes_the_fixed_parts() -> None:
    counter = AnthropicCounter()
    chat = ChatInput(messages=[{"role": "user", "content": "Hello"}], tools=TOOLS)
    count = counter.count_chat("claude-sonnet-5", chat)
    assert not count.exact
    assert count.fixed_tokens == 3 + 346
    assert count.input_tokens == round(count.text_tokens * DEFAULT_FACTOR) + count.fixed_tokens  # type: ignore[operator]


def test_factor_calibrates_to_reported_usage_robustly() -> None:
    counter = AnthropicCounter()
    rng = random.Random(7)
    true_factor = 1.31
    text = "The quick brown fox jumps over the lazy dog. " * 20
    for i in range(120):
        estimate = counter.count_chat(
            "claude-haiku-4-5", ChatInput(messages=[{"role": "user", "content": text}])
        )
        assert estimate.text_tokens is not None
        reported = round(estimate.text_tokens * true_factor * rng.uniform(0.97, 1.03)) + estimate.fixed_tokens
        if i % 15 == 0:
            reported *= 40  # an outlier (e.g. a huge cached prefix the request did not show)
        counter.observe("claude-haiku-4-5-20251001", estimate, reported)
    calibration = counter.calibration("claude-haiku-4-5")
    assert abs(calibration.factor - true_factor) < 0.02
    assert calibration.error_low is not None and calibration.error_high is not None
    assert -0.05 < calibration.error_low < 0 < calibration.error_high < 0.05
    # Other families keep the default until they see their own usage.
    assert counter.calibration("claude-opus-4-8").factor == DEFAULT_FACTOR

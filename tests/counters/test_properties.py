"""Arbitrary Unicode never makes a counter raise."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtally.counters import AnthropicCounter, ChatInput, GeminiCounter, OpenAICounter

OPENAI = OpenAICounter()
ANTHROPIC = AnthropicCounter()
GEMINI = GeminiCounter()
GEMINI.load()

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT)
def test_text_never_raises(text: str) -> None:
    for model, counter in (("gpt-4o", OPENAI), ("claude-sonnet-5", ANTHROPIC), ("gemini-2.5-flash", GEMINI)):
        assert counter.count_text(model, [text]).input_tokens >= 0


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(TEXT, JSONISH, max_size=5), max_size=5), JSONISH)
def test_any_message_shapes_never_raise(messages: list[dict[str, object]], tools: object) -> None:
    chat = ChatInput(messages=messages, tools=tools if isinstance(tools, list) else None)
    for model, counter in (("gpt-4o", OPENAI), ("claude-sonnet-5", ANTHROPIC), ("gemini-2.5-flash", GEMINI)):
        assert counter.count_chat(model, chat).input_tokens >= 0
    payload = {"messages": messages, "contents": messages, "input": tools, "tools": tools}
    for endpoint in ("chat.completions", "responses", "completions", "embeddings"):
        OPENAI.count_request("gpt-4o", endpoint, payload)
    ANTHROPIC.count_request("claude-sonnet-5", "messages", payload)
    for endpoint in ("generateContent", "embedContent", "batchEmbedContents"):
        GEMINI.count_request("gemini-2.5-flash", endpoint, payload)

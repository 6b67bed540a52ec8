"""The content cache: bounded in bytes, and a growing conversation recounts only new text."""

from __future__ import annotations

from llmtally.counters import ChatInput, OpenAICounter, TokenCache


def test_bounded_in_bytes() -> None:
    cache = TokenCache(max_bytes=10_000)
    for i in range(200):
        cache.count("enc", f"{i:04d}" + "x" * 96, len)
    assert cache.size_bytes <= 10_000
    assert len(cache) == 100


def test_conversation_recounts_only_new_messages() -> None:
    cache = TokenCache()
    counter = OpenAICounter(cache)
    messages = [{"role": "user", "content": f"message {i} " + "lorem ipsum " * 20} for i in range(100)]
    first = counter.count_chat("gpt-4o", ChatInput(messages=messages))
    assert cache.misses == 100
    messages.append({"role": "assistant", "content": "a new reply " * 20})
    second = counter.count_chat("gpt-4o", ChatInput(messages=messages))
    assert cache.misses == 101 and cache.hits == 100
    assert second.input_tokens > first.input_tokens

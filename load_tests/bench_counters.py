"""Token counting speed: llmtally's counters against raw tiktoken, and what the content cache buys.

Run: .venv/bin/python load_tests/bench_counters.py   (prints a table; nothing is asserted)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmtally.counters import AnthropicCounter, ChatInput, GeminiCounter, OpenAICounter, TokenCache
from llmtally.counters.bundled import tiktoken_encoding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.counters.corpus
from tests.counters.corpus import TEXTS


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    texts = [TEXTS[name] for name in sorted(TEXTS)]
    size_mb = sum(len(t.encode()) for t in texts) / 1e6
    enc = tiktoken_encoding("o200k_base")
    rows: list[tuple[str, float]] = []

    raw = best_of(lambda: [enc.encode_ordinary(t) for t in texts])
    rows.append(("tiktoken o200k_base encode_ordinary (raw)", size_mb / raw))
    cold = OpenAICounter(TokenCache(max_bytes=0))  # no caching: pure counting cost
    rows.append(
        (
            "llmtally OpenAICounter.count_text, no cache",
            size_mb / best_of(lambda: cold.count_text("gpt-4o", texts)),
        )
    )
    warm = OpenAICounter()
    warm.count_text("gpt-4o", texts)
    rows.append(
        (
            "llmtally OpenAICounter.count_text, warm cache",
            size_mb / best_of(lambda: warm.count_text("gpt-4o", texts)),
        )
    )
    claude = AnthropicCounter(TokenCache(max_bytes=0))
    rows.append(
        (
            "llmtally AnthropicCounter (estimate), no cache",
            size_mb / best_of(lambda: claude.count_text("claude-sonnet-5", texts)),
        )
    )
    gemini = GeminiCounter(cache=TokenCache(max_bytes=0))
    start = time.perf_counter()
    gemini.load()
    load_s = time.perf_counter() - start
    rows.append(
        (
            "llmtally GeminiCounter (Gemma 3), no cache",
            size_mb / best_of(lambda: gemini.count_text("gemini-2.5-flash", texts), 3),
        )
    )

    print(f"corpus: {len(texts)} texts, {size_mb:.2f} MB; Gemma 3 tokenizer load {load_s:.2f} s")
    print(f"{'counter':52s} {'MB/s':>8s}")
    for name, mbps in rows:
        print(f"{name:52s} {mbps:8.2f}")

    # A 100-message conversation gets one new message: count it again.
    messages = [
        {"role": "user" if i % 2 else "assistant", "content": texts[i % len(texts)][:2000]}
        for i in range(100)
    ]
    new = [*messages, {"role": "user", "content": "One more question about all of the above?"}]
    samples_cold, samples_warm = [], []
    for _ in range(5):
        counter = OpenAICounter(TokenCache())
        start = time.perf_counter()
        counter.count_chat("gpt-4o", ChatInput(messages=new))
        samples_cold.append(time.perf_counter() - start)
        counter = OpenAICounter(TokenCache())
        counter.count_chat("gpt-4o", ChatInput(messages=messages))  # the conversation so far
        start = time.perf_counter()
        counter.count_chat("gpt-4o", ChatInput(messages=new))
        samples_warm.append(time.perf_counter() - start)
    cold_ms, warm_ms = statistics.median(samples_cold) * 1000, statistics.median(samples_warm) * 1000
    print(
        f"\n100-message conversation + 1 new message (gpt-4o): recount {cold_ms:.2f} ms without cache, "
        f"{warm_ms:.3f} ms with it ({cold_ms / warm_ms:.0f}x faster)"
    )


if __name__ == "__main__":
    sys.exit(main())

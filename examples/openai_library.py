"""The library without the proxy: count a request before sending it, track the response after.

From the repository:

    OPENAI_API_KEY=sk-... .venv/bin/python examples/openai_library.py

Without a key, against the fake upstream: start it with `.venv/bin/python -m llmtally.testing --port
9999` and add `OPENAI_BASE_URL=http://127.0.0.1:9999/v1` to the command.
"""

import os
import time

from openai import OpenAI

from llmtally import CallParams, TokenCountParams, TokenTracker

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
tracker = TokenTracker()

before = tracker.count_tokens(TokenCountParams(model=MODEL, messages=messages))
print(f"before sending: {before.input_tokens} input tokens (exact={before.exact}, {before.tokenizer})")

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
started = time.time()
reply = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]

metrics = tracker.track_usage(CallParams(model=MODEL, messages=messages, started_at=started), reply)
cost = metrics.price.total_cost if metrics.price else None
print(
    f"after: {metrics.input_tokens} in / {metrics.output_tokens} out ({metrics.usage_source}), cost ${cost}"
)

"""The library without the proxy, for Gemini: exact Gemma 3 count before sending, usage after.

From the repository:

    GEMINI_API_KEY=... .venv/bin/python examples/gemini_library.py

Without a key, against the fake upstream: start it with `.venv/bin/python -m llmtally.testing --port
9999` and add `GEMINI_BASE_URL=http://127.0.0.1:9999` to the command.
"""

import os
import time

from google import genai
from google.genai import types

from llmtally import CallParams, TokenCountParams, TokenTracker

MODEL = os.environ.get("GEMINI_MODEL", "gemini-2.5-flash")
contents = [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}]
tracker = TokenTracker()

before = tracker.count_tokens(TokenCountParams(model=MODEL, messages=contents))
print(f"before sending: {before.input_tokens} input tokens (exact={before.exact}, {before.tokenizer})")

base_url = os.environ.get("GEMINI_BASE_URL")  # unset: Google's endpoint
client = genai.Client(api_key=os.environ["GEMINI_API_KEY"], http_options=types.HttpOptions(base_url=base_url))
started = time.time()
response = client.models.generate_content(model=MODEL, contents=contents)  # type: ignore[arg-type]

metrics = tracker.track_usage(CallParams(model=MODEL, messages=contents, started_at=started), response)
cost = metrics.price.total_cost if metrics.price else None
print(
    f"after: {metrics.input_tokens} in / {metrics.output_tokens} out ({metrics.usage_source}), cost ${cost}"
)

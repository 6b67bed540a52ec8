"""The library without the proxy, for Claude: estimate before sending, exact usage after.

From the repository:

    ANTHROPIC_API_KEY=sk-ant-... .venv/bin/python examples/anthropic_library.py

Without a key, against the fake upstream: start it with `.venv/bin/python -m llmtally.testing --port
9999` and add `ANTHROPIC_BASE_URL=http://127.0.0.1:9999` to the command.
"""

import os
import time

from anthropic import Anthropic

from llmtally import CallParams, TokenCountParams, TokenTracker

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-haiku-4-5")
messages = [{"role": "user", "content": "What is the capital of France?"}]
tracker = TokenTracker()

before = tracker.count_tokens(TokenCountParams(model=MODEL, messages=messages, system="Be terse."))
print(f"before sending: ~{before.input_tokens} input tokens (exact={before.exact}, {before.tokenizer})")

client = Anthropic(base_url=os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com"))
started = time.time()
message = client.messages.create(model=MODEL, max_tokens=50, system="Be terse.", messages=messages)  # type: ignore[arg-type]

metrics = tracker.track_usage(
    CallParams(model=MODEL, messages=messages, system="Be terse.", started_at=started), message
)
cost = metrics.price.total_cost if metrics.price else None
print(
    f"after: {metrics.input_tokens} in / {metrics.output_tokens} out ({metrics.usage_source}), cost ${cost}"
)
calibration = tracker.calibration(MODEL)
print(f"Claude estimate factor now {calibration.factor:.3f} from {calibration.samples} samples")  # type: ignore[union-attr]

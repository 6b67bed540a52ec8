"""Anthropic (Claude) through llmtally: change only base_url. Each call becomes one usage record.

From the repository, once `make serve` or `make test` has made `.venv`, in one shell (add
`--fake-upstream` to `llmtally serve` to have llmtally's built-in fake answer every call: no key, no
network):

    .venv/bin/llmtally serve > records.jsonl &    # the proxy on :8787 in the background, records to a file
    ANTHROPIC_API_KEY=sk-ant-... .venv/bin/python examples/anthropic_proxy.py
    kill %1; wait                     # stop llmtally: it writes every record before it exits
    .venv/bin/llmtally report records.jsonl
"""

import os

from anthropic import Anthropic

LLMTALLY_URL = os.environ.get("LLMTALLY_URL", "http://127.0.0.1:8787")
MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-haiku-4-5")

client = Anthropic(base_url=f"{LLMTALLY_URL}/anthropic")

message = client.messages.create(
    model=MODEL,
    max_tokens=100,
    system="Be brief.",
    messages=[{"role": "user", "content": "Say hello in five words."}],
    extra_headers={"x-llmtally-tag-feature": "greeting"},
)
print("message:", message.content[0].text)  # type: ignore[union-attr]

with client.messages.stream(
    model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Count to three."}]
) as stream:
    print("stream:", "".join(stream.text_stream))

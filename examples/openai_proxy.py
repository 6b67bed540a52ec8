"""OpenAI through llmtally: change only base_url. Each call below becomes one usage record.

From the repository, once `make serve` or `make test` has made `.venv`, in one shell (add
`--fake-upstream` to `llmtally serve` to have llmtally's built-in fake answer every call: no key, no
network):

    .venv/bin/llmtally serve > records.jsonl &    # the proxy on :8787 in the background, records to a file
    OPENAI_API_KEY=sk-... .venv/bin/python examples/openai_proxy.py
    kill %1; wait                     # stop llmtally: it writes every record before it exits
    .venv/bin/llmtally report records.jsonl
"""

import os

from openai import OpenAI

LLMTALLY_URL = os.environ.get("LLMTALLY_URL", "http://127.0.0.1:8787")
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")

client = OpenAI(base_url=f"{LLMTALLY_URL}/openai/v1")  # the only change to an existing service

reply = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Say hello in five words."}],
    extra_headers={"x-llmtally-tag-feature": "greeting"},  # optional: attribute cost with tags
)
print("chat:", reply.choices[0].message.content)

# Streaming: llmtally asks OpenAI for the usage chunk and hides it, so this loop sees the same chunks.
stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Count to three."}], stream=True
)
print("stream:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))

response = client.responses.create(model=MODEL, input="Name a colour.")
print("responses:", response.output_text)

"""Gemini through llmtally: change only base_url. Each call becomes one usage record.

From the repository, once `make serve` or `make test` has made `.venv`, in one shell (add
`--fake-upstream` to `llmtally serve` to have llmtally's built-in fake answer every call: no key, no
network):

    .venv/bin/llmtally serve > records.jsonl &    # the proxy on :8787 in the background, records to a file
    GEMINI_API_KEY=... .venv/bin/python examples/gemini_proxy.py
    kill %1; wait                     # stop llmtally: it writes every record before it exits
    .venv/bin/llmtally report records.jsonl
"""

import os

from google import genai
from google.genai import types

LLMTALLY_URL = os.environ.get("LLMTALLY_URL", "http://127.0.0.1:8787")
MODEL = os.environ.get("GEMINI_MODEL", "gemini-2.5-flash")

client = genai.Client(
    api_key=os.environ["GEMINI_API_KEY"],
    http_options=types.HttpOptions(
        base_url=f"{LLMTALLY_URL}/gemini", headers={"x-llmtally-tag-feature": "greeting"}
    ),
)

response = client.models.generate_content(model=MODEL, contents="Say hello in five words.")
print("generate:", response.text)

print("stream:", "".join(chunk.text or "" for chunk in client.models.generate_content_stream(
    model=MODEL, contents="Count to three.")))  # fmt: skip

embedding = client.models.embed_content(model="gemini-embedding-001", contents=["hello"])
print("embed: dimensions", len(embedding.embeddings[0].values or []))  # type: ignore[index]

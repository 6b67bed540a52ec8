"""OpenAI counting: exact against the shared corpus and the OpenAI cookbook's published counts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmtally.counters.bundled import TokenizerUnavailable, read_verified, tiktoken_encoding
from llmtally.counters.openai import OpenAICounter, encoding_name
from tests.conftest import SHARED

REFS = json.loads((SHARED / "corpus" / "refs.json").read_text())


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base", "p50k_base"])
def test_corpus_reference_counts(encoding: str) -> None:
    enc = tiktoken_encoding(encoding)
    wrong = {}
    for name, ref in REFS.items():
        text = (SHARED / "corpus" / "texts" / name).read_bytes().decode("utf-8")  # bytes: keep \r and \r\n
        count = len(enc.encode_ordinary(text))
        if count != ref[encoding]:
            wrong[name] = (count, ref[encoding])
    assert not wrong
    assert len(REFS) == 126


# The cookbook's example (How_to_count_tokens_with_tiktoken): 129 tokens on gpt-4, 124 on gpt-4o.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
     "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
     "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
     "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
     "deliverable."},
]  # fmt: skip


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 129), ("gpt-4-0613", 129), ("gpt-4o", 124),
                                                  ("gpt-4o-mini", 124), ("gpt-3.5-turbo-0301", 127)])  # fmt: skip
def test_cookbook_message_counts(model: str, expected: int) -> None:
    assert OpenAICounter().count_messages(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o-2024-08-06", "o200k_base"), ("gpt-5.4-mini", "o200k_base"), ("o3-mini", "o200k_base"),
     ("gpt-4.1", "o200k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-35-turbo", "cl100k_base"),
     ("text-embedding-3-small", "cl100k_base"), ("text-davinci-003", "p50k_base"),
     ("ft:gpt-4o-mini-2024-07-18:org::x", "o200k_base")],
)  # fmt: skip
def test_encoding_per_model(model: str, encoding: str) -> None:
    assert encoding_name(model) == (encoding, True)


def test_tampered_tokenizer_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtally.counters import bundled

    monkeypatch.setattr(bundled, "bundled_hashes", lambda: {"p50k_base.tiktoken": "0" * 64})
    with pytest.raises(TokenizerUnavailable, match="does not match"):
        read_verified("p50k_base.tiktoken")

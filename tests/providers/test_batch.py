"""Reading batch results: the line splitter's bound, and each provider's result lines (pure functions)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llmtally.providers import ADAPTERS
from llmtally.providers.anthropic import batch_result as anthropic_result
from llmtally.providers.batch import JsonLines
from llmtally.providers.gemini import batch_file_result, batch_results
from llmtally.providers.openai import batch_result as openai_result
from llmtally.record import TokenUsage


def split(data: bytes, max_line: int, cut: int) -> tuple[list[bytes], int]:
    lines = JsonLines(max_line)
    out: list[bytes] = []
    for i in range(0, len(data), cut):
        out += lines.feed(data[i : i + cut])
    last = lines.finish()
    return out + ([last] if last is not None else []), lines.skipped


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8, 13, 1000])
def test_lines_come_out_whole_wherever_the_chunks_are_cut(cut: int) -> None:
    data = b'{"a":1}\n{"b":2}\r\n\n{"c":3}'
    assert split(data, 64, cut) == ([b'{"a":1}', b'{"b":2}\r', b"", b'{"c":3}'], 0)


@pytest.mark.parametrize("cut", [1, 4, 7, 10, 1000])
def test_a_line_over_the_limit_is_skipped_and_counted_never_held(cut: int) -> None:
    data = b"short\n" + b"x" * 25 + b"\nafter\n" + b"y" * 30
    lines, skipped = split(data, 10, cut)
    assert lines == [b"short", b"after"] and skipped == 2


def test_the_splitter_holds_no_more_than_its_limit() -> None:
    lines = JsonLines(1000)
    for _ in range(100):
        assert lines.feed(b"z" * 999) == []
        assert len(lines._held) <= 1000
    assert lines.feed(b"\nok\n") == [b"ok"] and lines.skipped == 1


def test_openai_lines_of_other_files_are_not_results() -> None:
    batch_input = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    fine_tune = {"messages": [{"role": "user", "content": "hi"}]}
    assert openai_result(batch_input) is None and openai_result(fine_tune) is None
    assert openai_result([1, 2]) is None


def test_openai_embeddings_and_responses_results() -> None:
    embedding = {"object": "list", "data": [], "model": "text-embedding-3-small",
                 "usage": {"prompt_tokens": 8, "total_tokens": 8}}  # fmt: skip
    line = {
        "id": "b1",
        "custom_id": "e1",
        "response": {"status_code": 200, "request_id": "r", "body": embedding},
    }
    result = openai_result(line)
    assert result is not None and result.endpoint == "embeddings"
    assert result.summary.usage == TokenUsage(input_tokens=8)
    response = {"object": "response", "model": "gpt-5", "output": [{"type": "web_search_call"}],
                "usage": {"input_tokens": 10, "output_tokens": 5,
                          "output_tokens_details": {"reasoning_tokens": 2}}}  # fmt: skip
    line = {"id": "b2", "custom_id": "r1", "response": {"status_code": 200, "body": response}}
    result = openai_result(line)
    assert result is not None and result.endpoint == "responses" and result.status == 200
    assert result.summary.usage == TokenUsage(input_tokens=10, output_tokens=5, reasoning_tokens=2)
    assert result.summary.line_items == {"web_search": 1}


def test_anthropic_canceled_and_unreadable_lines() -> None:
    canceled = anthropic_result({"custom_id": "c", "result": {"type": "canceled"}})
    assert canceled is not None and canceled.status is None
    assert canceled.summary.error == "batch request canceled: not billed" and canceled.summary.usage is None
    odd = anthropic_result({"custom_id": "x"})
    assert odd is not None and odd.summary.error == "not a batch result line"


def test_gemini_operation_still_running_has_no_results() -> None:
    running: dict[str, Any] = {"name": "batches/1", "metadata": {"state": "BATCH_STATE_RUNNING"}}
    assert batch_results(running) == []


def test_gemini_operation_results_from_response_when_metadata_has_none() -> None:
    reply = {"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}}
    operation = {"metadata": {"model": "models/gemini-2.5-pro"}, "done": True,
                 "response": {"inlinedResponses": {"inlinedResponses": [{"response": reply}]}}}  # fmt: skip
    (result,) = batch_results(operation)
    assert result.summary.model == "gemini-2.5-pro" and result.custom_id is None
    assert result.summary.usage == TokenUsage(input_tokens=4, output_tokens=2, reasoning_tokens=0)


def test_gemini_input_file_lines_are_not_results() -> None:
    assert batch_file_result({"key": "k", "request": {"contents": []}}) is None
    assert batch_file_result(orjson.loads(b'{"response": {}}')) is None


@pytest.mark.parametrize(
    ("provider", "path", "batch_id"),
    [
        ("openai", "v1/files/file-abc/content", "file-abc"),
        ("anthropic", "v1/messages/batches/msgbatch_1/results", "msgbatch_1"),
        ("gemini", "v1beta/batches/b123", "batches/b123"),
        ("gemini", "download/v1beta/files/f9:download", "files/f9"),
        ("gemini", "v1beta/files/f9:download", "files/f9"),
    ],
)
def test_batch_routes(provider: str, path: str, batch_id: str) -> None:
    batch = ADAPTERS[provider].batch_route(path)  # type: ignore[index]
    assert batch is not None and batch.batch_id == batch_id and batch.endpoint.name == "batch"


@pytest.mark.parametrize(
    ("provider", "path"),
    [("openai", "v1/files/file-abc"), ("openai", "v1/batches/b1"), ("anthropic", "v1/messages"),
     ("gemini", "v1beta/batches/b1:cancel"), ("gemini", "v1beta/files/f9")],
)  # fmt: skip
def test_other_paths_are_not_batch_results(provider: str, path: str) -> None:
    batch = ADAPTERS[provider].batch_route(path)  # type: ignore[index]
    assert batch is None

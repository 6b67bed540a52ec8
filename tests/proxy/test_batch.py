"""Batch results downloaded through the proxy with the official SDKs: one record per result, at batch prices.

The upstream here serves batch results as the providers do (OpenAI output and error files, Anthropic's
results JSONL behind a ``results_url``, a Gemini batch operation with inlined responses and a results
file), in chunks cut mid-line; the client gets the exact bytes, and each result its record.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import genai_prices
import openai
import orjson
import pytest
from aiohttp import web
from genai_prices.types import Usage
from google import genai
from google.genai import types

from llmtally.config import BudgetRule, BudgetsConfig, Config
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY
from tests.proxy.helpers import money
from tests.proxy.test_server import serving, stop_serve

BATCH = {"processing": "batch"}


def openai_line(
    n: int, model: str = "gpt-4o-2024-08-06", status: int = 200, text: str = ""
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1711652795, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Hello {n}.{text}"},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000 + n, "completion_tokens": 200 + n, "total_tokens": 1200 + 2 * n,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_50cad350e4",
    }  # fmt: skip
    if status != 200:
        body = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    return {
        "id": f"batch_req_{n}",
        "custom_id": f"request-{n}",
        "response": {"status_code": status, "request_id": f"req_{n}", "body": body},
        "error": None,
    }


def anthropic_line(n: int, model: str = "claude-sonnet-4-5-20250929") -> dict[str, Any]:
    return {
        "custom_id": f"req-{n}",
        "result": {
            "type": "succeeded",
            "message": {
                "id": f"msg_{n}", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Hello again!"}], "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 500 + n, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 1000, "output_tokens": 100 + n, "service_tier": "batch"},
            },
        },
    }  # fmt: skip


def gemini_response(n: int) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": [{"text": f"Hi {n}"}], "role": "model"},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 800 + n, "candidatesTokenCount": 50 + n, "thoughtsTokenCount": 10,
                          "totalTokenCount": 860 + 2 * n,
                          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 800 + n}]},
        "modelVersion": "gemini-2.5-flash", "responseId": f"resp-{n}",
    }  # fmt: skip


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


ANTHROPIC_RESULTS = jsonl(
    [
        anthropic_line(1),
        {"custom_id": "req-bad", "result": {"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error", "message": "max_tokens: Field required"}}}},
        anthropic_line(2),
        {"custom_id": "req-late", "result": {"type": "expired"}},
    ]
)  # fmt: skip
OPENAI_OUTPUT = jsonl([openai_line(1), openai_line(2), openai_line(3, status=400)])
OPENAI_ERRORS = jsonl(
    [{"id": "batch_req_9", "custom_id": "request-9", "response": None,
      "error": {"code": "batch_expired", "message": "This request could not be executed before the batch expired."}}]
)  # fmt: skip
#: A batch's input file: downloaded through the same path, and not results.
OPENAI_INPUT = jsonl(
    [{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}}]
)  # fmt: skip
GEMINI_FILE = jsonl(
    [{"key": "row-1", "response": gemini_response(1)}, {"key": "row-2", "response": gemini_response(2)}]
)


def gemini_operation() -> dict[str, Any]:
    inlined = {
        "inlinedResponses": [
            {"response": gemini_response(1), "metadata": {"key": "first"}},
            {
                "error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"},
                "metadata": {"key": "bad"},
            },
            {"response": gemini_response(2), "metadata": {"key": "second"}},
        ]
    }
    return {
        "name": "batches/abc123",
        "metadata": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": "models/gemini-2.5-flash", "displayName": "nightly", "state": "BATCH_STATE_SUCCEEDED",
            "createTime": "2026-12-07T01:00:00Z", "endTime": "2026-12-07T01:20:00Z",
            "updateTime": "2026-12-07T01:20:00Z", "name": "batches/abc123",
            "batchStats": {"requestCount": "3", "successfulRequestCount": "2", "failedRequestCount": "1"},
            "output": {"inlinedResponses": inlined},
        },
        "done": True,
        "response": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
            "inlinedResponses": inlined,
        },
    }  # fmt: skip


#: A long completion (~4 kB a line, as long answers make them).
BIG_TEXT = " lorem ipsum" * 330


class BatchUpstream:
    """A loopback upstream with each provider's batch result routes, answering in 7-byte chunks (cut
    mid-line) unless ``whole``; ``big_lines`` lines of OpenAI output are generated on the fly."""

    def __init__(self) -> None:
        self.url = ""
        self.gzip = False
        self.big_lines = 0
        self.big_digest = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> BatchUpstream:
        app = web.Application()
        app.router.add_get("/v1/files/{id}/content", self._openai_file)
        app.router.add_get("/openai/files/{id}/content", self._openai_file)  # Azure, classic
        app.router.add_get("/openai/v1/files/{id}/content", self._openai_file)  # Azure, v1
        app.router.add_get("/v1/messages/batches", self._anthropic_batches)
        app.router.add_get("/v1/messages/batches/{id}", self._anthropic_batch)
        app.router.add_get("/v1/messages/batches/{id}/results", self._anthropic_results)
        app.router.add_get("/{version}/batches/{id}", self._gemini_batch)
        app.router.add_get("/{version}/files/{name}", self._gemini_file)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _send(self, request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "request-id": "req_dl_1"})
        if self.gzip:
            body = gzip.compress(body)
            response.headers["Content-Encoding"] = "gzip"
        await response.prepare(request)
        for i in range(0, len(body), 7):
            await response.write(body[i : i + 7])
        await response.write_eof()
        return response

    async def _openai_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["id"]
        if file_id == "file-big":
            return await self._big(request)
        body = {"file-out": OPENAI_OUTPUT, "file-err": OPENAI_ERRORS, "file-in": OPENAI_INPUT}[file_id]
        return await self._send(request, body, "application/octet-stream")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        digest = hashlib.sha256()
        block = b""
        for n in range(self.big_lines):
            block += orjson.dumps(openai_line(n, text=BIG_TEXT)) + b"\n"
            if len(block) > 256 * 1024 or n == self.big_lines - 1:
                digest.update(block)
                await response.write(block)
                block = b""
        self.big_digest = digest.hexdigest()
        await response.write_eof()
        return response

    async def _anthropic_batches(self, request: web.Request) -> web.Response:
        batches = [self._batch_info(i) for i in ("msgbatch_01", "msgbatch_02")]
        return web.json_response({"data": batches, "has_more": False, "first_id": "msgbatch_01",
                                  "last_id": "msgbatch_02"})  # fmt: skip

    async def _anthropic_batch(self, request: web.Request) -> web.Response:
        return web.json_response(self._batch_info(request.match_info["id"]))

    def _batch_info(self, batch_id: str) -> dict[str, Any]:
        return (
            {
                "id": batch_id, "type": "message_batch", "processing_status": "ended",
                "request_counts": {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 1},
                "ended_at": "2026-12-07T01:20:00Z", "created_at": "2026-12-07T01:00:00Z",
                "expires_at": "2026-12-08T01:00:00Z", "cancel_initiated_at": None, "archived_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{batch_id}/results",
            }
        )  # fmt: skip

    async def _anthropic_results(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, ANTHROPIC_RESULTS, "application/binary")

    async def _gemini_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, orjson.dumps(gemini_operation()), "application/json; charset=UTF-8")

    async def _gemini_file(self, request: web.Request) -> web.StreamResponse:
        assert request.match_info["name"] == "batch-out:download" and request.query["alt"] == "media"
        return await self._send(request, GEMINI_FILE, "application/octet-stream")


@pytest.fixture
async def batch_upstream() -> AsyncIterator[BatchUpstream]:
    async with BatchUpstream() as upstream:
        yield upstream


@pytest.fixture
async def proxy(batch_upstream: BatchUpstream) -> AsyncIterator[RunningProxy]:
    running = await start_proxy(config_for_upstream(batch_upstream.url))
    yield running
    await running.stop()


async def records_of(proxy: RunningProxy) -> list[dict[str, Any]]:
    records = list(await proxy.flush())
    proxy.records.clear()
    return records


def batch_cost(model: str, provider: str, **tokens: int) -> Decimal:
    """genai-prices' own batch price for the usage (the expected ``total_cost``)."""
    price = genai_prices.calc_price(
        Usage(**tokens),  # type: ignore[arg-type]
        model,
        provider_id=provider,
        genai_request_timestamp=datetime.now(UTC),
        price_context=BATCH,  # type: ignore[arg-type]
    )
    return price.total_price


async def raw_get(url: str) -> bytes:
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


async def test_openai_output_file_one_record_per_line_at_batch_prices(
    proxy: RunningProxy, batch_upstream: BatchUpstream
) -> None:
    async with openai.AsyncOpenAI(
        api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0
    ) as client:
        content = await client.files.content("file-out")
    assert content.content == OPENAI_OUTPUT  # the client gets the file exactly
    records = sorted(await records_of(proxy), key=lambda r: str(r["custom_id"]))
    assert [r["custom_id"] for r in records] == ["request-1", "request-2", "request-3"]
    # No client can look a result up by its request id: they take no room from the calls that can.
    assert len(proxy.meter.recent) == 0
    for n, record in enumerate(records[:2], start=1):
        expected = batch_cost("gpt-4o-2024-08-06", "openai", input_tokens=1000 + n, output_tokens=200 + n)
        assert record["endpoint"] == "batch" and record["service_tier"] == "batch"
        assert record["provider"] == "openai" and record["platform"] == "direct"
        assert record["batch_id"] == "file-out"
        assert record["upstream_request_id"] == f"req_{n}"
        assert record["model"] == "gpt-4o-2024-08-06" and record["status"] == 200
        assert (record["input_tokens"], record["output_tokens"]) == (1000 + n, 200 + n)
        assert record["usage_source"] == "provider" and record["pricing_note"] is None
        assert money(record["total_cost"]) == expected
        # Half the standard price: the batch discount.
        assert expected == (Decimal(1000 + n) * Decimal("2.5") + Decimal(200 + n) * 10) / 2 / 10**6
        assert record["stream"] is False and record["error"] is None
    failed = records[2]  # a request the batch ran and the API refused: no usage, no cost
    assert failed["status"] == 400 and failed["usage_source"] == "none" and failed["total_cost"] is None
    assert failed["error"] == "upstream error: invalid_request_error"


async def test_openai_error_file_and_other_files(proxy: RunningProxy) -> None:
    async with openai.AsyncOpenAI(
        api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0
    ) as client:
        assert (await client.files.content("file-err")).content == OPENAI_ERRORS
        (expired,) = await records_of(proxy)
        # A batch's input file (or any other file) passes unchanged and writes nothing.
        assert (await client.files.content("file-in")).content == OPENAI_INPUT
    assert expired["custom_id"] == "request-9" and expired["batch_id"] == "file-err"
    assert expired["error"] == "batch request failed: batch_expired" and expired["total_cost"] is None
    assert expired["status"] is None and expired["usage_source"] == "none"
    assert await records_of(proxy) == []


async def test_anthropic_results_through_the_relinked_results_url(
    proxy: RunningProxy, batch_upstream: BatchUpstream
) -> None:
    async with anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0
    ) as client:
        batch = await client.messages.batches.retrieve("msgbatch_01")
        listed = [b async for b in client.messages.batches.list()]
        results = [r async for r in await client.messages.batches.results("msgbatch_01")]
    # The upstream names itself in results_url; the SDK would fetch the results from there, around the
    # proxy: the link is pointed back through it.
    assert batch.results_url == f"{proxy.url}/anthropic/v1/messages/batches/msgbatch_01/results"
    assert [b.results_url for b in listed] == [
        f"{proxy.url}/anthropic/v1/messages/batches/{i}/results" for i in ("msgbatch_01", "msgbatch_02")
    ]
    assert [r.custom_id for r in results] == ["req-1", "req-bad", "req-2", "req-late"]
    assert (
        await raw_get(f"{proxy.url}/anthropic/v1/messages/batches/msgbatch_01/results") == ANTHROPIC_RESULTS
    )
    records = await records_of(proxy)
    assert len(records) == 8  # two downloads, four results each
    by_id = {r["custom_id"]: r for r in records[:4]}
    for n in (1, 2):
        record = by_id[f"req-{n}"]
        expected = batch_cost(
            "claude-sonnet-4-5-20250929", "anthropic", input_tokens=1500 + n, cache_read_tokens=1000,
            output_tokens=100 + n,
        )  # fmt: skip
        assert record["endpoint"] == "batch" and record["service_tier"] == "batch"
        assert record["batch_id"] == "msgbatch_01" and record["model"] == "claude-sonnet-4-5-20250929"
        assert record["input_tokens"] == 1500 + n and record["cache_read_tokens"] == 1000
        assert money(record["total_cost"]) == expected and record["pricing_note"] is None
    errored, expired = by_id["req-bad"], by_id["req-late"]
    assert errored["status"] == 400 and errored["error"] == "batch request errored: invalid_request_error"
    assert expired["status"] is None and expired["error"] == "batch request expired: not billed"
    assert errored["total_cost"] is None and expired["total_cost"] is None


async def test_gemini_inlined_responses_and_results_file(proxy: RunningProxy) -> None:
    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=f"{proxy.url}/gemini"))
    try:
        job = await client.aio.batches.get(name="batches/abc123")
        data = await client.aio.files.download(file="files/batch-out")
    finally:
        await client.aio.aclose()
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest is not None and job.dest.inlined_responses is not None
    assert len(job.dest.inlined_responses) == 3
    records = await records_of(proxy)
    assert [r["custom_id"] for r in records[:3]] == ["first", "bad", "second"]
    for n, record in ((1, records[0]), (2, records[2])):
        expected = batch_cost("gemini-2.5-flash", "google", input_tokens=800 + n, output_tokens=60 + n)
        assert record["endpoint"] == "batch" and record["service_tier"] == "batch"
        assert record["provider"] == "gemini" and record["batch_id"] == "batches/abc123"
        assert record["output_tokens"] == 60 + n and record["reasoning_tokens"] == 10
        assert record["upstream_request_id"] == f"resp-{n}"
        assert money(record["total_cost"]) == expected and record["pricing_note"] is None
    assert records[1]["status"] == 400 and records[1]["error"] == "batch request failed: INVALID_ARGUMENT"
    assert data == GEMINI_FILE
    assert [(r["custom_id"], r["batch_id"]) for r in records[3:]] == [
        ("row-1", "files/batch-out"),
        ("row-2", "files/batch-out"),
    ]


async def test_gzip_download_reaches_the_client_compressed_and_is_metered(
    proxy: RunningProxy, batch_upstream: BatchUpstream
) -> None:
    batch_upstream.gzip = True
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        url = f"{proxy.url}/openai/v1/files/file-out/content"
        async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await response.read()) == OPENAI_OUTPUT
    assert len(await records_of(proxy)) == 3


async def test_a_model_without_batch_prices_costs_half_its_standard_price(
    batch_upstream: BatchUpstream,
) -> None:
    global ANTHROPIC_RESULTS
    kept = ANTHROPIC_RESULTS
    ANTHROPIC_RESULTS = jsonl([anthropic_line(1, model="claude-3-5-haiku-20241022")])
    running = await start_proxy(config_for_upstream(batch_upstream.url))
    try:
        await raw_get(f"{running.url}/anthropic/v1/messages/batches/msgbatch_02/results")
        (record,) = await records_of(running)
    finally:
        ANTHROPIC_RESULTS = kept
        await running.stop()
    # claude-3-5-haiku: $0.80 input, $0.08 cache read, $4 output per 1M; genai-prices has no batch rates.
    standard = Decimal(501) * Decimal("0.8") + 1000 * Decimal("0.08") + 101 * 4
    assert money(record["total_cost"]) == standard / 2 / 10**6
    assert record["pricing_note"] == (
        "no batch price data for claude-3-5-haiku-latest: 50 % of the standard rates (every provider's "
        "batch discount)"
    )


async def test_a_line_over_the_limit_is_skipped_and_recorded(batch_upstream: BatchUpstream) -> None:
    global ANTHROPIC_RESULTS
    kept = ANTHROPIC_RESULTS
    huge = anthropic_line(7)
    huge["result"]["message"]["content"][0]["text"] = "x" * (1024 * 1024 + 10)
    ANTHROPIC_RESULTS = jsonl([anthropic_line(1), huge, anthropic_line(2)])
    config = config_for_upstream(batch_upstream.url)
    running = await start_proxy(replace(config, metering=replace(config.metering, max_batch_line_mb=1)))
    try:
        body = await raw_get(f"{running.url}/anthropic/v1/messages/batches/msgbatch_03/results")
        assert body == ANTHROPIC_RESULTS  # forwarded whole all the same
        records = await records_of(running)
    finally:
        ANTHROPIC_RESULTS = kept
        await running.stop()
    assert sorted(str(r["custom_id"]) for r in records) == ["None", "req-1", "req-2"]
    (skipped,) = [r for r in records if r["custom_id"] is None]
    assert skipped["error"] == "batch result line longer than [metering] max_batch_line_mb: not metered"
    assert skipped["batch_id"] == "msgbatch_03" and skipped["total_cost"] is None


async def test_a_50_mb_result_file_streams_through_in_bounded_memory(
    batch_upstream: BatchUpstream,
) -> None:
    batch_upstream.big_lines = 50 * 1024 * 1024 // len(orjson.dumps(openai_line(10, text=BIG_TEXT)) + b"\n")
    config = Config()
    config = replace(config, pipeline=replace(config.pipeline, sink_queue=100_000))  # no spill: count all
    running = await start_proxy(config_for_upstream(batch_upstream.url, config))
    try:
        digest, size, count = hashlib.sha256(), 0, 0
        tracemalloc.start()
        try:
            async with aiohttp.ClientSession() as session:
                url = f"{running.url}/openai/v1/files/file-big/content"
                async with session.get(url) as response:
                    async for chunk in response.content.iter_any():
                        digest.update(chunk)
                        size += len(chunk)
                        count += len(running.records)  # the test's sink keeps records: count them
                        running.records.clear()
            count += len(await running.flush())
            running.records.clear()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await running.stop()
    assert size >= 50 * 1024 * 1024 - 2048 and digest.hexdigest() == batch_upstream.big_digest
    assert count == batch_upstream.big_lines
    # Everything traced (upstream, proxy, client, records) stays far below the file's size.
    assert peak < 24 * 1024 * 1024, peak  # 12 MB measured


async def test_under_llmtally_serve_the_records_come_from_the_record_process(
    tmp_path: Path, batch_upstream: BatchUpstream
) -> None:
    # Worker processes forward; each result's exchange crosses the link to the record process.
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nanthropic = "{batch_upstream.url}"\nopenai = "{batch_upstream.url}"\n')
    async with serving(config, {}, "--workers", "2") as (process, url):
        client = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=f"{url}/anthropic", max_retries=0)
        results = [r async for r in await client.messages.batches.results("msgbatch_01")]
        await client.close()
        assert len(results) == 4
        assert await raw_get(f"{url}/openai/v1/files/file-out/content") == OPENAI_OUTPUT
        stdout, _ = await stop_serve(process)
    records = [orjson.loads(line) for line in stdout.splitlines()]
    assert sorted((r["batch_id"], r["custom_id"]) for r in records) == [
        ("file-out", "request-1"), ("file-out", "request-2"), ("file-out", "request-3"),
        ("msgbatch_01", "req-1"), ("msgbatch_01", "req-2"), ("msgbatch_01", "req-bad"),
        ("msgbatch_01", "req-late"),
    ]  # fmt: skip
    assert {r["endpoint"] for r in records} == {"batch"} and {r["service_tier"] for r in records} == {"batch"}
    priced = [r for r in records if r["total_cost"] is not None]
    assert len(priced) == 4 and all(r["price_source"] == "genai-prices" for r in priced)


async def test_a_client_that_leaves_part_way_gets_records_for_what_it_was_sent(
    proxy: RunningProxy, batch_upstream: BatchUpstream
) -> None:
    batch_upstream.big_lines = 5_000
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/openai/v1/files/file-big/content") as response:
            got = await response.content.readexactly(3 * 1024 * 1024)
        assert got  # and the connection is dropped, the rest unread
    for _ in range(50):  # the proxy notices at its next write
        await asyncio.sleep(0.1)
        records = list(await proxy.flush())
        if records and len(records) == len(await proxy.flush()):
            break
    sent_lines = got.count(b"\n")
    assert sent_lines <= len(records) < batch_upstream.big_lines
    assert all(r["error"] is None and r["total_cost"] is not None for r in records)


async def test_azure_openai_batch_output_through_both_url_layouts(proxy: RunningProxy) -> None:
    classic = openai.AsyncAzureOpenAI(
        api_key=API_KEY, azure_endpoint=f"{proxy.url}/azure-openai", api_version="2024-10-21", max_retries=0
    )
    v1 = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/azure-openai/openai/v1/", max_retries=0)
    async with classic, v1:
        assert (await classic.files.content("file-out")).content == OPENAI_OUTPUT
        assert (await v1.files.content("file-out")).content == OPENAI_OUTPUT
    records = await records_of(proxy)
    assert len(records) == 6
    assert {(r["platform"], r["provider"], r["endpoint"], r["service_tier"]) for r in records} == {
        ("azure", "openai", "batch", "batch")
    }
    first = next(r for r in records if r["custom_id"] == "request-1")
    assert first["batch_id"] == "file-out" and first["model"] == "gpt-4o-2024-08-06"
    # genai-prices' Azure data (Global deployments bill OpenAI's list prices, and so OpenAI's batch
    # rates): half of Azure's standard price, as Azure's Global Batch bills.
    standard = genai_prices.calc_price(
        Usage(input_tokens=1001, output_tokens=201), "gpt-4o-2024-08-06", provider_id="azure"
    ).total_price
    assert money(first["total_cost"]) == standard / 2 == Decimal("0.00225625")
    assert first["price_source"] == "genai-prices" and first["pricing_note"] is None


async def test_the_results_link_follows_the_address_the_client_used(proxy: RunningProxy) -> None:
    host = proxy.url.removeprefix("http://")
    async with aiohttp.ClientSession() as session:
        headers = {"X-Forwarded-Proto": "https", "Host": "llm.internal:8443"}
        async with session.get(
            f"{proxy.url}/anthropic/v1/messages/batches/msgbatch_09", headers=headers
        ) as got:
            body = await got.read()
            assert got.headers["Content-Length"] == str(len(body))  # recounted for the new link
            relinked = orjson.loads(body)
        async with session.get(f"{proxy.url}/anthropic/v1/messages/batches/msgbatch_09") as got:
            plain = await got.json()
    assert (
        relinked["results_url"]
        == "https://llm.internal:8443/anthropic/v1/messages/batches/msgbatch_09/results"
    )
    assert plain["results_url"] == f"http://{host}/anthropic/v1/messages/batches/msgbatch_09/results"
    assert {k: v for k, v in relinked.items() if k != "results_url"} == {
        k: v for k, v in plain.items() if k != "results_url"
    }  # nothing else is touched
    assert await records_of(proxy) == []  # a batch's info is not a result


async def test_batch_results_count_against_spend_limits(batch_upstream: BatchUpstream) -> None:
    rule = BudgetRule("per-tenant", {"tag": "tenant"}, Decimal("100"), "month", "block")  # type: ignore[arg-type]
    config = config_for_upstream(
        batch_upstream.url, Config(budgets=BudgetsConfig(store="memory", rules=[rule]))
    )
    running = await start_proxy(config)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{running.url}/anthropic/v1/messages/batches/msgbatch_01/results"
            async with session.get(url, headers={"x-llmtally-tag-tenant": "acme"}) as response:
                assert await response.read() == ANTHROPIC_RESULTS
        records = list(await running.flush())
        budgets = running.meter.budgets
        assert budgets is not None
        for _ in range(250):
            if budgets.stats.settled >= len(records):
                break
            await asyncio.sleep(0.02)
        report = await budgets.report()
    finally:
        await running.stop()
    assert len(records) == 4 and {r["tags"]["tenant"] for r in records} == {"acme"}
    spent = sum((money(r["total_cost"]) or Decimal(0) for r in records), Decimal(0))
    assert spent > 0
    ((budget),) = report["budgets"]
    assert (budget["key"], Decimal(budget["spent_usd"]), budget["reserved_usd"]) == (
        "tenant=acme",
        spent,
        "0",
    )

"""Transport behaviour: routing, errors, headers, streaming, encodings, disconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import logging
import socket
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from llmtally.config import Config
from llmtally.proxy.app import STATE_KEY
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import LEFTOVERS, RawUpstream, first_record, only_record, serve_post

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
STREAM_CHAT = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    # encoded=True: send the path exactly as written (no client-side normalisation).
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(URL(url, encoded=True), data=body, headers=headers or AUTH) as response,
    ):
        return response.status, response.headers, await response.read()


async def test_unknown_path_is_404_json(proxy: RunningProxy) -> None:
    status, headers, body = await post(proxy.url + "/v1/chat/completions", CHAT)
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body)["error"]["type"] == "not_found"


async def test_health_and_readiness(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/healthz") as response:
            assert response.status == 200
        async with session.get(proxy.url + "/readyz") as response:
            assert (response.status, await response.json()) == (200, {"status": "ready"})
    await proxy.app.shutdown()  # what SIGTERM does first: readiness fails while draining
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/readyz") as response:
        assert response.status == 503


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_upstream_is_502_with_record() -> None:
    proxy = await start_proxy(config_for_upstream(f"http://127.0.0.1:{_closed_port()}"))
    try:
        status, _, body = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
        assert status == 502
        assert orjson.loads(body)["error"]["type"] == "upstream_unreachable"
        record = await only_record(proxy)
        assert record["status"] == 502
        assert record["error"].startswith("upstream_unreachable")
        assert record["usage_source"] == "none"
        assert record["estimated_input_tokens"] is None  # nothing was used: nothing counted (records.md)
        assert record["request_model"] == "gpt-4o"
    finally:
        await proxy.stop()


async def test_upstream_timeout_is_504_with_record(upstream: FakeUpstream) -> None:
    config = config_for_upstream(upstream.url)
    config = dataclasses.replace(
        config, upstreams=dataclasses.replace(config.upstreams, first_byte_timeout_s=0.3)
    )
    proxy = await start_proxy(config)
    try:
        body = b'{"model":"fake-hang","messages":[]}'
        status, _, payload = await post(proxy.url + "/openai/v1/chat/completions", body)
        assert status == 504
        assert orjson.loads(payload)["error"]["type"] == "upstream_timeout"
        record = await only_record(proxy)
        assert (record["status"], record["error"].split(":")[0]) == (504, "upstream_timeout")
    finally:
        await proxy.stop()


async def test_headers_query_and_body_forwarded_unchanged(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    headers = {
        **AUTH,
        "X-Custom": "kept",
        "OpenAI-Organization": "org-1",
        "x-llmtally-tag-tenant": "acme",
        "X-LLMTally-Tag-Team": "search",
        "x-llmtally-debug": "never forwarded",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "hop-by-hop by Connection",
    }
    body = b'{ "model" : "gpt-4o",\n "messages": [{"role":"user","content":"hi"}] }'
    status, response_headers, _ = await post(
        proxy.url + "/openai/v1/chat/completions?api-version=1&x=%2F", body, headers
    )
    assert status == 200
    seen = upstream.seen
    assert seen.path_qs == "/v1/chat/completions?api-version=1&x=%2F"
    assert seen.body == body  # not re-encoded
    assert seen.headers["X-Custom"] == "kept"
    assert seen.headers["OpenAI-Organization"] == "org-1"
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert not any(k.lower().startswith("x-llmtally") for k in seen.headers)
    assert "X-Hop" not in seen.headers
    # The provider's response headers come back, plus the documented overhead header.
    assert response_headers["x-request-id"] == "req_fake_openai_0001"
    assert float(response_headers["x-llmtally-overhead-ms"]) >= 0
    record = await only_record(proxy)
    assert record["tags"] == {"tenant": "acme", "team": "search"}


async def test_overhead_header_can_be_turned_off(upstream: FakeUpstream) -> None:
    config = config_for_upstream(upstream.url)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, overhead_header=False))
    proxy = await start_proxy(config)
    try:
        _, headers, _ = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
        assert "x-llmtally-overhead-ms" not in headers
    finally:
        await proxy.stop()


async def test_path_cannot_reach_another_host(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    for path in ("/openai//evil.example/v1/x", "/openai/@evil.example/v1/x", "/openai/..%2F..%2Fv1/models"):
        async with (
            aiohttp.ClientSession() as session,
            session.get(proxy.url + path, headers=AUTH) as response,
        ):
            assert response.status in (400, 404)
        assert "evil" not in upstream.seen.headers.get("Host", "")


async def test_upstream_paths_are_remembered_but_never_with_a_query(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    gemini = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    body = b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'
    for suffix in ("", "?key=AIza-in-the-query"):
        for _ in range(2):  # the second call takes the remembered path
            headers = {"Content-Type": "application/json", "x-goog-api-key": API_KEY}
            status, _, _ = await post(proxy.url + gemini + suffix, body, headers)
            assert status == 200
            assert upstream.seen.path_qs == gemini.removeprefix("/gemini") + suffix
    remembered = proxy.app[STATE_KEY].upstream_paths
    assert remembered == {gemini: gemini.removeprefix("/gemini")}  # a key in a query is not kept


async def test_stream_is_forwarded_chunk_by_chunk(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.config.chunk_interval_s = 0.2
    upstream.config.chunks = 8
    proxy = await make_proxy()
    body = b'{"model":"claude-sonnet-5","max_tokens":10,"stream":true,"messages":[]}'
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        async with session.post(
            proxy.url + "/anthropic/v1/messages", data=body, headers={"x-api-key": API_KEY}
        ) as response:
            async for _ in response.content.iter_any():
                arrivals.append(time.perf_counter() - start)
    # The first bytes arrive long before the upstream finishes (8 pieces 0.2 s apart).
    assert arrivals[0] < 0.5
    assert arrivals[-1] > 1.0
    assert len(arrivals) >= 5
    assert (await only_record(proxy))["output_tokens"] == 400


async def _gzip_upstream() -> tuple[web.AppRunner, str]:
    payload = {
        "id": "chatcmpl-gz",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }

    async def handler(request: web.Request) -> web.Response:
        assert "gzip" in request.headers.get("Accept-Encoding", "")
        return web.Response(
            body=gzip.compress(orjson.dumps(payload)),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    return await serve_post("/v1/chat/completions", handler)


async def test_compressed_response_passes_through_and_is_metered() -> None:
    runner, url = await _gzip_upstream()
    proxy = await start_proxy(config_for_upstream(url))
    try:
        headers = {**AUTH, "Accept-Encoding": "gzip, br, zstd"}
        status, response_headers, body = await post(proxy.url + "/openai/v1/chat/completions", CHAT, headers)
        assert status == 200
        assert response_headers["Content-Encoding"] == "gzip"
        assert orjson.loads(gzip.decompress(body))["id"] == "chatcmpl-gz"  # the client's exact bytes
        record = await only_record(proxy)
        assert (record["input_tokens"], record["output_tokens"], record["usage_source"]) == (
            10,
            5,
            "provider",
        )
    finally:
        await proxy.stop()
        await runner.cleanup()


async def _read_first_chunk_then_leave(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
    path = "/" + url.split("/", 3)[3]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
    )
    await writer.drain()
    first = await reader.readuntil(b"\r\n\r\n")  # response head
    first += await reader.read(100)  # some body
    writer.close()
    return first


async def test_client_disconnect_cancels_upstream(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.config.chunk_interval_s = 0.2
    upstream.config.chunks = 10
    proxy = await make_proxy()
    head = await _read_first_chunk_then_leave(proxy.url + "/openai/v1/chat/completions", STREAM_CHAT, AUTH)
    assert head.startswith(b"HTTP/1.1 200")
    record = await first_record(proxy)
    assert record["client_disconnected"] is True
    assert record["usage_source"] == "estimated"
    assert record["input_tokens"] == record["estimated_input_tokens"] > 0
    await asyncio.sleep(0.3)
    assert upstream.cancelled_streams == 1  # the upstream call was closed, not read to the end


async def test_client_leaving_a_silent_stream_cancels_it_at_once(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # A model "thinking": nothing after the first event for a minute. The upstream call must be closed
    # when the client goes, not when the upstream next sends (tokens would be billed meanwhile).
    upstream.config.chunk_interval_s = 60
    proxy = await make_proxy()
    left = time.monotonic()
    await _read_first_chunk_then_leave(proxy.url + "/openai/v1/chat/completions", STREAM_CHAT, AUTH)
    record = await first_record(proxy)
    assert record["client_disconnected"] is True
    assert record["error"] is None
    assert time.monotonic() - left < 5
    for _ in range(50):
        if upstream.cancelled_streams:
            break
        await asyncio.sleep(0.1)
    assert upstream.cancelled_streams == 1


async def test_client_leaving_before_the_upstream_answers_is_recorded(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.config.latency_s = 60
    proxy = await make_proxy()
    writer = await _call_then_wait(proxy)
    writer.close()
    record = await first_record(proxy)
    assert record["client_disconnected"] is True
    assert record["status"] is None
    assert record["usage_source"] == "estimated"


async def _call_then_wait(proxy: RunningProxy) -> asyncio.StreamWriter:
    """A metered call on a raw connection, left with the upstream for 0.3 s; its writer, to leave."""
    port = int(proxy.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in AUTH.items())
    writer.write(
        f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(CHAT)}\r\n"
        f"{head}\r\n".encode()
        + CHAT
    )
    await writer.drain()
    await asyncio.sleep(0.3)  # the call is with the upstream now
    return writer


async def test_calls_cut_off_at_shutdown_still_get_their_records(upstream: FakeUpstream) -> None:
    upstream.config.chunk_interval_s = 60
    base = Config()
    config = dataclasses.replace(base, server=dataclasses.replace(base.server, shutdown_grace_s=0.3))
    proxy = await start_proxy(config_for_upstream(upstream.url, config))
    body = b'{"model":"claude-sonnet-5","max_tokens":10,"stream":true,"messages":[]}'
    async with aiohttp.ClientSession() as session:
        responses = [
            await session.post(
                proxy.url + "/anthropic/v1/messages", data=body, headers={"x-api-key": API_KEY}
            )
            for _ in range(5)
        ]
        for response in responses:
            assert (await response.content.readany()).startswith(b"event: message_start")
        await proxy.stop()  # the grace ends with the streams still open
        for response in responses:
            response.close()
    assert len(proxy.records) == 5
    for record in proxy.records:
        assert record["error"] == "cut off at shutdown: still running when shutdown_grace_s ended"
        assert record["client_disconnected"] is False
        assert record["input_tokens"] == 12050  # message_start's usage was read before the cut


async def test_concurrent_streams_are_not_capped_by_default(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # Streams hold their upstream connection for minutes; a default cap turned the 257th into a 504.
    upstream.config.chunk_interval_s = 60
    proxy = await make_proxy()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        responses = await asyncio.gather(
            *(
                session.post(proxy.url + "/openai/v1/chat/completions", data=STREAM_CHAT, headers=AUTH)
                for _ in range(300)
            )
        )
        firsts = await asyncio.gather(*(r.content.readany() for r in responses))
        assert [r.status for r in responses] == [200] * 300
        assert all(first.startswith(b"data: ") for first in firsts)
        for response in responses:
            response.close()


async def test_max_connections_caps_calls_in_flight_with_a_clear_504(upstream: FakeUpstream) -> None:
    upstream.config.chunk_interval_s = 60
    base = Config()
    upstreams = dataclasses.replace(base.upstreams, max_connections=1, connect_timeout_s=0.3)
    proxy = await start_proxy(
        config_for_upstream(upstream.url, dataclasses.replace(base, upstreams=upstreams))
    )
    try:
        async with aiohttp.ClientSession() as session:
            holding = await session.post(
                proxy.url + "/openai/v1/chat/completions", data=STREAM_CHAT, headers=AUTH
            )
            assert holding.status == 200
            status, _, payload = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
            holding.close()
        assert status == 504
        assert "max_connections" in orjson.loads(payload)["error"]["message"]
    finally:
        await proxy.stop()


async def test_client_disconnect_drain_gets_exact_usage(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.config.chunk_interval_s = 0.1
    upstream.config.chunks = 6
    proxy = await make_proxy(on_client_disconnect="drain")
    body = b'{"model":"claude-sonnet-5","max_tokens":10,"stream":true,"messages":[]}'
    await _read_first_chunk_then_leave(proxy.url + "/anthropic/v1/messages", body, {"x-api-key": API_KEY})
    record = await first_record(proxy)
    assert record["client_disconnected"] is True
    assert record["usage_source"] == "provider"
    assert (record["input_tokens"], record["output_tokens"]) == (12050, 400)
    assert upstream.cancelled_streams == 0


async def test_large_unmetered_upload_is_streamed_through(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    data = b"x" * (5 * 1024 * 1024)
    status, headers, body = await post(
        proxy.url + "/openai/echo/upload", data, {"Content-Type": "application/octet-stream"}
    )
    assert status == 200
    assert headers["x-echo-length"] == str(len(data))
    assert body == data
    await proxy.flush()
    assert proxy.records == []


async def test_get_on_a_metered_path_is_not_metered(proxy: RunningProxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/openai/v1/chat/completions", headers=AUTH) as response,
    ):
        assert response.status == 405  # the fake has no GET there; the proxy forwarded it
    await proxy.flush()
    assert proxy.records == []


async def test_bad_request_body_is_forwarded_and_recorded(proxy: RunningProxy) -> None:
    status, _, _ = await post(proxy.url + "/openai/v1/chat/completions", b"{not json")
    assert status == 400  # the provider's answer, not ours
    record = await only_record(proxy)
    assert record["status"] == 400
    assert "request body is not JSON" in record["error"]


async def test_unknown_model_is_recorded_with_null_costs(proxy: RunningProxy) -> None:
    body = b'{"model":"my-private-model","messages":[]}'
    status, _, _ = await post(proxy.url + "/openai/v1/chat/completions", body)
    assert status == 200
    record = await only_record(proxy)
    assert record["price_source"] == "unknown_model"
    assert record["input_tokens"] == 1200
    assert (record["input_cost"], record["output_cost"], record["total_cost"]) == (None, None, None)


async def test_config_price_override_wins(upstream: FakeUpstream) -> None:
    from decimal import Decimal

    from llmtally.config import ModelPrice, PricingConfig

    pricing = PricingConfig(models={"gpt-4o": ModelPrice(input=Decimal("1"), output=Decimal("2"))})
    proxy = await start_proxy(config_for_upstream(upstream.url, Config(pricing=pricing)))
    try:
        await post(proxy.url + "/openai/v1/chat/completions", CHAT)
        record = await only_record(proxy)
        assert record["price_source"] == "config:base_model"  # the response names gpt-4o-2024-08-06
        # No cache_read rate configured: cached tokens are priced at the input rate.
        assert (record["input_cost"], record["output_cost"]) == (Decimal("0.0012"), Decimal("0.0006"))
    finally:
        await proxy.stop()


async def test_upstream_dying_mid_stream_cuts_the_client_and_is_recorded() -> None:
    async def dying(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = b'data: {"id":"x","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
        await response.write(chunk)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # the upstream dies mid-body
        return response

    runner, base = await serve_post("/v1/chat/completions", dying)
    proxy = await start_proxy(config_for_upstream(base))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + "/openai/v1/chat/completions", data=STREAM_CHAT, headers=AUTH
            ) as response,
        ):
            assert response.status == 200
            received = b""
            try:
                async for chunk in response.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError:
                pass  # the client sees a cut stream, as it would from the provider
        assert received.startswith(b"data: ") and b"Hel" in received
        record = await only_record(proxy)
        assert record["status"] == 200 and record["stream"] is True
        assert record["usage_source"] == "estimated"  # no usage arrived: counted, and flagged
        assert record["output_tokens"] >= 1
        assert "during the response body" in (record["error"] or "")
    finally:
        await proxy.stop()
        await runner.cleanup()


async def test_a_body_too_large_to_meter_is_still_forwarded_whole(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(max_response_body_mb=0)  # every body is "too large" to keep
    status, _, body = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
    assert status == 200
    assert orjson.loads(body)["usage"]["prompt_tokens"] == 1200  # the client got all of it
    record = await only_record(proxy)
    assert record["error"] == "response body larger than metering.max_response_body_mb: not parsed"


# On a pooled upstream connection a call runs on callbacks, without a task (proxy.app.MeteredCall):
# every way such a call can end still answers the client as before and records the call.


def _pooled(proxy: RunningProxy) -> int:
    """Idle upstream connections the next metered call can take at once (the callback path)."""
    pool = proxy.app[STATE_KEY].pool
    assert pool is not None
    return sum(len(conns) for conns in pool._idle.values())


async def _warm(proxy: RunningProxy) -> None:
    status, _, _ = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
    assert status == 200
    assert _pooled(proxy) == 1


async def test_on_a_pooled_connection_a_silent_upstream_is_504_and_the_next_call_works(
    upstream: FakeUpstream,
) -> None:
    config = config_for_upstream(upstream.url)
    config = dataclasses.replace(
        config, upstreams=dataclasses.replace(config.upstreams, first_byte_timeout_s=0.3)
    )
    proxy = await start_proxy(config)
    try:
        await _warm(proxy)
        status, _, payload = await post(proxy.url + "/openai/v1/chat/completions", b'{"model":"fake-hang"}')
        assert status == 504
        assert orjson.loads(payload)["error"]["type"] == "upstream_timeout"
        assert _pooled(proxy) == 0  # the silent connection was closed, not put back
        status, _, _ = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
        assert status == 200
        for _ in range(50):
            if len(proxy.records) == 3:
                break
            await asyncio.sleep(0.05)
        assert [(r["status"], (r["error"] or "").split(":")[0]) for r in proxy.records] == [
            (200, ""),
            (504, "upstream_timeout"),
            (200, ""),
        ]
    finally:
        await proxy.stop()


async def test_on_a_pooled_connection_a_client_leaving_before_the_head_is_recorded(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    await _warm(proxy)
    upstream.config.latency_s = 60
    writer = await _call_then_wait(proxy)
    assert _pooled(proxy) == 0
    writer.close()
    for _ in range(50):
        if len(proxy.records) == 2:
            break
        await asyncio.sleep(0.05)
    record = proxy.records[1]
    assert record["client_disconnected"] is True
    assert record["status"] is None
    assert record["usage_source"] == "estimated"
    assert proxy.app[STATE_KEY].in_flight == 0


async def test_on_a_pooled_connection_an_upstream_closing_before_the_head_is_502() -> None:
    calls = 0

    async def closes_the_second_call(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 2:
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.1)
        return web.json_response({"usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    runner, base = await serve_post("/v1/chat/completions", closes_the_second_call)
    proxy = await start_proxy(config_for_upstream(base))
    try:
        await _warm(proxy)
        status, _, payload = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
        assert status == 502
        assert orjson.loads(payload)["error"]["type"] == "upstream_unreachable"
        for _ in range(50):
            if len(proxy.records) == 2:
                break
            await asyncio.sleep(0.05)
        records = proxy.records
        assert records[1]["status"] == 502
        assert "UpstreamDisconnected" in records[1]["error"]
    finally:
        await proxy.stop()
        await runner.cleanup()


async def test_calls_waiting_on_pooled_connections_at_shutdown_are_cut_off_and_recorded(
    upstream: FakeUpstream,
) -> None:
    base = Config()
    config = dataclasses.replace(base, server=dataclasses.replace(base.server, shutdown_grace_s=0.3))
    proxy = await start_proxy(config_for_upstream(upstream.url, config))
    async with aiohttp.ClientSession() as session:
        calls = [
            asyncio.ensure_future(
                session.post(proxy.url + "/openai/v1/chat/completions", data=CHAT, headers=AUTH)
            )
            for _ in range(3)
        ]
        for response in await asyncio.gather(*calls):
            assert response.status == 200
            response.release()
        assert _pooled(proxy) == 3
        upstream.config.latency_s = 60
        waiting = [
            asyncio.ensure_future(
                session.post(proxy.url + "/openai/v1/chat/completions", data=CHAT, headers=AUTH)
            )
            for _ in range(3)
        ]
        await asyncio.sleep(0.3)
        assert _pooled(proxy) == 0  # all three are with the upstream
        await proxy.stop()
        for outcome in await asyncio.gather(*waiting, return_exceptions=True):
            assert isinstance(outcome, aiohttp.ClientError)  # cut off without an answer, as before
    assert len(proxy.records) == 6
    for record in proxy.records[3:]:
        assert record["error"] == "cut off at shutdown: still running when shutdown_grace_s ended"
        assert record["client_disconnected"] is False


# Upstreams that misbehave: every client answered, never with another exchange's bytes -------------

_USAGE_BODY = b'{"id":"c1","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}'
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(_USAGE_BODY),
    _USAGE_BODY,
)
_RIGHT = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def _raw_config(url: str, fast: bool = True) -> Config:
    config = config_for_upstream(url)
    return dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, fast_path=fast),
        upstreams=dataclasses.replace(config.upstreams, first_byte_timeout_s=5, read_timeout_s=5),
    )


@pytest.mark.parametrize("later", [False, True], ids=["same read", "later read"])
@pytest.mark.parametrize("extra", list(LEFTOVERS.values()), ids=list(LEFTOVERS))
@pytest.mark.parametrize(
    "path", ["/openai/v1/chat/completions", "/openai/v1/models"], ids=["metered", "passthrough"]
)
async def test_what_an_upstream_sends_past_its_answer_never_reaches_the_next_client(
    path: str, extra: bytes, later: bool
) -> None:
    def answer(request: bytes) -> list[bytes | float]:
        if b"first" in request:
            return [_OK, 0.05, extra] if later else [_OK + extra]
        return [_RIGHT]

    async with RawUpstream(answer) as raw:
        proxy = await start_proxy(_raw_config(raw.url))
        try:
            method = "POST" if "chat" in path else "GET"
            async with aiohttp.ClientSession() as client:  # one client after the other, on one pool
                for which in ("first", "second"):
                    async with client.request(
                        method, proxy.url + path, data=CHAT if method == "POST" else None,
                        headers={**AUTH, "X-Which": which},
                    ) as response:  # fmt: skip
                        body = await response.read()
                    if which == "first" and status_of_first(response.status, body, extra, later):
                        continue
                    if which == "second":
                        assert (response.status, body) == (200, b"{}")
                    await asyncio.sleep(0.15)
        finally:
            await proxy.stop()
    assert raw.connections == 2  # the first connection was never reused


def status_of_first(status: int, body: bytes, extra: bytes, later: bool) -> bool:
    """The first client gets its answer, or (aiohttp's stricter verdict on junk after it) a 502."""
    if status == 502:
        assert b"LEAK" not in body  # says what failed, never quotes the upstream's bytes
        return True
    assert (status, body) == (200, _USAGE_BODY)
    return False


async def test_a_body_broken_in_the_read_of_its_head_is_a_502_with_the_upstreams_status_recorded() -> None:
    broken = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    async with RawUpstream(lambda request: [broken, 30.0]) as raw:
        proxy = await start_proxy(_raw_config(raw.url))
        try:
            started = time.perf_counter()
            status, _, body = await post(proxy.url + "/openai/v1/chat/completions", CHAT)
            assert time.perf_counter() - started < 5  # answered, not left to hang
            assert status == 502 and b"upstream_protocol_error" in body
            record = await only_record(proxy)
        finally:
            await proxy.stop()
    assert record["status"] == 200 and "chunk size" in record["error"].lower()
    assert record["client_disconnected"] is False


@pytest.mark.parametrize(
    "answer_bytes",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(3000))
        + b"Content-Length: 2\r\n\r\n{}",
    ],
    ids=["101", "a 1 MiB header", "3,000 headers"],
)
@pytest.mark.parametrize(
    "path", ["/openai/v1/chat/completions", "/openai/v1/models"], ids=["metered", "passthrough"]
)
async def test_an_upstream_head_that_cannot_be_forwarded_is_a_502_without_a_traceback(
    answer_bytes: bytes, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with RawUpstream(lambda request: [answer_bytes, 30.0]) as raw:
        proxy = await start_proxy(_raw_config(raw.url))
        try:
            method = "POST" if "chat" in path else "GET"
            async with (
                aiohttp.ClientSession() as client,
                client.request(
                    method, proxy.url + path, data=CHAT if method == "POST" else None, headers=AUTH
                ) as response,
            ):
                body = await response.read()
        finally:
            await proxy.stop()
    assert response.status == 502, body[:300]
    assert b"aaaa" not in body and b"X-H1" not in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

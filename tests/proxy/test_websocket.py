"""OpenAI Realtime through the proxy (llmtally.proxy.websocket): the openai SDK's
``client.realtime.connect`` against a fake upstream speaking the real event schema, compared with a
direct session; records per ``response.done``; cut-off sessions; the transport's RFC 6455 duties."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from openai import AsyncOpenAI

from llmtally.config import Config, RealtimeConfig
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY
from tests.proxy.helpers import money
from tests.proxy.realtime_upstream import MODEL, RealtimeUpstream, usage


@contextlib.asynccontextmanager
async def realtime(
    respond: str = "done", config: Config | None = None, preamble: list[str] | None = None
) -> AsyncIterator[tuple[RealtimeUpstream, RunningProxy]]:
    fake = RealtimeUpstream(respond, preamble=preamble or [])
    url = await fake.start()
    proxy = await start_proxy(config_for_upstream(url, config))
    try:
        yield fake, proxy
    finally:
        await proxy.stop()
        await fake.stop()


async def _sdk_session(base_url: str, turns: int, **headers: str) -> list[bytes]:
    """A session through the openai SDK: a session.update, then ``turns`` responses; every raw
    server message it received, in order."""
    client = AsyncOpenAI(api_key=API_KEY, base_url=base_url, max_retries=0)
    frames: list[bytes] = []
    async with client.realtime.connect(model=MODEL, extra_headers=headers) as conn:
        frames.append(await conn.recv_bytes())  # session.created
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
        frames.append(await conn.recv_bytes())  # session.updated
        for _ in range(turns):
            await conn.response.create()
            while True:
                frame = await conn.recv_bytes()
                frames.append(frame)
                if orjson.loads(frame)["type"] == "response.done":
                    break
    return frames


async def _records(proxy: RunningProxy, count: int) -> list[dict[str, Any]]:
    for _ in range(50):
        if len(await proxy.flush()) >= count:
            break
        await asyncio.sleep(0.1)
    return list(proxy.records)


def _genai_cost(turn: int) -> tuple[Decimal, Decimal]:
    u = usage(turn)
    details, out = u["input_token_details"], u["output_token_details"]
    price = calc_price(
        GenaiUsage(
            input_tokens=u["input_tokens"],
            output_tokens=u["output_tokens"],
            cache_read_tokens=details["cached_tokens"],
            input_audio_tokens=details["audio_tokens"],
            cache_audio_read_tokens=details["cached_tokens_details"]["audio_tokens"],
            output_audio_tokens=out["audio_tokens"],
        ),
        model_ref=MODEL,
        provider_id="openai",
    )
    return price.input_price, price.output_price


async def test_the_sdk_session_is_frame_for_frame_the_direct_one_and_each_response_is_a_record() -> None:
    async with realtime() as (fake, proxy):
        direct = await _sdk_session(f"{fake.url}/v1", 2)
        proxied = await _sdk_session(f"{proxy.url}/openai/v1", 2, **{"x-llmtally-tag-team": "voice"})
        records = await _records(proxy, 2)
    # What the client got, and what the upstream got, are the direct session's, byte for byte.
    # (The fake numbers its sessions: the direct one is sess_0000, the proxied one sess_0001.)
    assert proxied == [frame.replace(b"sess_0000", b"sess_0001") for frame in direct]
    assert len(direct) == 2 + 2 * 7 and proxied == [data.encode() for _, data in fake.sent[1]]
    assert fake.received[1] == fake.received[0]
    assert [m for m, _ in fake.received[1]] == [WSMsgType.TEXT] * 3 + [WSMsgType.CLOSE]
    assert fake.received[1][-1][1] == 1000  # the SDK's close, passed on
    # The handshake's headers went upstream (the key with them), llmtally's own did not.
    assert fake.headers[1]["Authorization"] == f"Bearer {API_KEY}"
    assert not any(name.lower().startswith("x-llmtally") for name in fake.headers[1])
    assert fake.compressed == [False, False]  # the SDK offers no permessage-deflate: none upstream
    assert len(records) == 2
    first, second = records
    assert first["session_id"] == second["session_id"] and len(first["session_id"]) == 32
    assert first["request_id"] != second["request_id"]
    for turn, record in enumerate(records, start=1):
        u = usage(turn)
        details = u["input_token_details"]
        assert (
            record["endpoint"] == "realtime" and record["provider"] == "openai" and record["stream"] is True
        )
        assert record["status"] == 101 and record["usage_source"] == "provider" and record["error"] is None
        assert (record["request_model"], record["model"]) == (MODEL, MODEL)
        assert record["upstream_request_id"] == f"resp_sess_0001_{turn}"
        assert record["input_tokens"] == u["input_tokens"] and record["output_tokens"] == 200
        assert record["cache_read_tokens"] == details["cached_tokens"]
        assert record["input_audio_tokens"] == details["audio_tokens"]
        assert record["cache_read_audio_tokens"] == details["cached_tokens_details"]["audio_tokens"]
        assert record["output_audio_tokens"] == 150
        assert (money(record["input_cost"]), money(record["output_cost"])) == _genai_cost(turn)
        assert record["price_source"] == "genai-prices" and record["tags"] == {"team": "voice"}
        assert record["ttfb_ms"] is not None and record["latency_ms"] >= record["ttfb_ms"]
    assert API_KEY not in repr(records)


async def test_a_session_the_upstream_drops_mid_response_records_what_was_generated() -> None:
    async with realtime("cut") as (_, proxy):
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"{proxy.url}/openai/v1/realtime?model={MODEL}",
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as ws,
        ):
            await ws.receive()  # session.created
            await ws.send_str('{"type":"response.create"}')
            kinds = []
            while True:
                msg = await ws.receive()
                if msg.type is not WSMsgType.TEXT:
                    break
                kinds.append(orjson.loads(msg.data)["type"])
            assert kinds[-1] == "response.output_audio.delta"  # all the upstream sent, then gone
            assert msg.type is WSMsgType.CLOSE and msg.data == 1011
        (record,) = await _records(proxy, 1)
    assert record["usage_source"] == "estimated" and record["client_disconnected"] is False
    assert record["output_tokens"] > 0 and record["input_tokens"] == 0  # the transcript, counted
    assert "before response.done" in record["error"] and record["session_id"] is not None
    assert record["upstream_request_id"] == "resp_sess_0000_1"


async def test_a_client_that_leaves_mid_response_gets_a_record_flagged_disconnected() -> None:
    async with realtime("hang") as (_, proxy):
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(
                f"{proxy.url}/openai/v1/realtime?model={MODEL}",
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            await ws.receive()
            await ws.send_str('{"type":"response.create"}')
            for _ in range(5):  # response.created, three transcript deltas, the audio delta
                await ws.receive()
            assert ws._response is not None
            ws._response.connection.transport.abort()  # type: ignore[union-attr]  # gone, no close
        (record,) = await _records(proxy, 1)
    assert record["usage_source"] == "estimated" and record["client_disconnected"] is True
    assert record["output_tokens"] > 0


async def test_binary_ping_and_close_pass_end_to_end_and_deflate_is_mirrored() -> None:
    async with realtime() as (fake, proxy):
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"{proxy.url}/openai/v1/realtime?model={MODEL}",
                headers={"Authorization": f"Bearer {API_KEY}"},
                protocols=("realtime", "other"),
                compress=15,
                autoping=False,
            ) as ws,
        ):
            assert ws.protocol == "realtime" and ws.compress == 15  # what the upstream agreed
            await ws.receive()
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive()).data == b"\x02\x01\x00"
            await ws.ping(b"are you there")
            pong = await ws.receive()
            assert pong.type is WSMsgType.PONG and pong.data == b"are you there"  # the upstream's
            await ws.close(code=4000, message=b"bye")
        await asyncio.sleep(0.1)
    assert fake.compressed == [True] and fake.protocols == ["realtime"]
    kinds = [kind for kind, _ in fake.received[0]]
    assert kinds == [WSMsgType.BINARY, WSMsgType.PING, WSMsgType.CLOSE]
    assert fake.received[0][-1][1] == 4000  # the client's close code, passed on


async def test_a_malformed_event_is_forwarded_counted_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with realtime(preamble=["{not json", '"a string"']) as (_, proxy):
        frames = await _sdk_session_raw(proxy.url)
        records = await _records(proxy, 1)
    assert frames[1:3] == [b"{not json", b'"a string"']
    assert len(records) == 1 and records[0]["usage_source"] == "provider"
    assert "2 messages were not JSON events" in caplog.text


async def _sdk_session_raw(url: str) -> list[bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{url}/openai/v1/realtime?model={MODEL}", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as ws,
    ):
        frames = [(await ws.receive()).data.encode() for _ in range(3)]
        await ws.send_str('{"type":"response.create"}')
        while True:
            data = (await ws.receive()).data
            if orjson.loads(data)["type"] == "response.done":
                return frames


async def test_limits_refuse_past_max_sessions_and_close_idle_sessions() -> None:
    config = dataclasses.replace(Config(), realtime=RealtimeConfig(max_sessions=1, idle_timeout_s=0.5))
    async with realtime(config=config) as (_, proxy), aiohttp.ClientSession() as session:
        url = f"{proxy.url}/openai/v1/realtime?model={MODEL}"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with session.ws_connect(url, headers=headers) as ws:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers=headers)
            assert refused.value.status == 503
            await ws.receive()  # session.created, then silence both ways
            closed = await asyncio.wait_for(ws.receive(), 5)
            assert closed.type is WSMsgType.CLOSE and closed.data == 1001
        async with session.ws_connect(url, headers=headers) as again:  # the slot is free again
            assert (await again.receive()).type is WSMsgType.TEXT


async def test_an_upstream_refusing_the_upgrade_is_answered_with_its_status() -> None:
    async with realtime() as (_, proxy):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{proxy.url}/openai/v1/realtime?model={MODEL}")  # no key
        assert refused.value.status == 401
        assert await proxy.flush() == []

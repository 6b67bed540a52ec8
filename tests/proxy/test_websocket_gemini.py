"""Gemini Live through the proxy's TLS listener: google-genai's ``client.aio.live.connect`` (which
always opens ``wss://``) against a fake upstream, compared with a direct session; one record per
turn with its usage by modality."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from google import genai
from google.genai import types

from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY
from tests.proxy.helpers import money
from tests.proxy.live_upstream import MODEL, LiveUpstream, live_usage


@contextlib.asynccontextmanager
async def live(
    ca: trustme.CA, respond: str = "done"
) -> AsyncIterator[tuple[LiveUpstream, RunningProxy, str, str]]:
    """The fake (plain), the proxy in front of it, and the proxy's and the fake's TLS origins."""
    fake = LiveUpstream(respond)
    await fake.start()
    proxy = await start_proxy(config_for_upstream(fake.url))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    site = web.TCPSite(proxy.runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    # A TLS front for the fake too, so the direct session is wss:// as well.
    assert fake._runner is not None
    fake_site = web.TCPSite(fake._runner, "127.0.0.1", 0, ssl_context=context)
    await fake_site.start()
    ports = [s.getsockname()[1] for s in (site._server.sockets or ())]  # type: ignore[union-attr]
    fake_ports = [s.getsockname()[1] for s in (fake_site._server.sockets or ())]  # type: ignore[union-attr]
    try:
        yield fake, proxy, f"https://localhost:{ports[0]}/gemini", f"https://localhost:{fake_ports[0]}"
    finally:
        await proxy.stop()
        await fake.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))  # how docs/deploy.md tells google-genai


async def _session(base_url: str, turns: int) -> list[Any]:
    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=base_url))
    seen: list[Any] = []
    config = types.LiveConnectConfig(response_modalities=[types.Modality.TEXT])
    async with client.aio.live.connect(model=MODEL, config=config) as session:
        for _ in range(turns):
            await session.send_client_content(
                turns=types.Content(role="user", parts=[types.Part(text="Hi")]), turn_complete=True
            )
            async for message in session.receive():  # ends with the turn
                seen.append(message.model_dump(exclude_none=True))
    return seen


async def _records(proxy: RunningProxy, count: int) -> list[dict[str, Any]]:
    for _ in range(50):
        if len(await proxy.flush()) >= count:
            break
        await asyncio.sleep(0.1)
    return list(proxy.records)


@pytest.mark.usefixtures("trusted")
async def test_the_sdk_live_session_over_wss_is_the_direct_one_and_each_turn_is_a_record(
    ca: trustme.CA,
) -> None:
    async with live(ca) as (fake, proxy, url, direct_url):
        direct = await _session(direct_url, 2)
        proxied = await _session(url, 2)
        records = await _records(proxy, 2)
    assert proxied == direct and len(direct) == 2 * 5
    assert fake.sent[1] == fake.sent[0] and fake.received[1] == fake.received[0]
    assert (
        fake.paths[1] == "/ws/google.ai.generativelanguage.v1.GenerativeService.BidiGenerateContent"
    )  # the SDK's default
    assert fake.headers[1]["x-goog-api-key"] == API_KEY
    assert fake.compressed == [True, True]  # google-genai offers permessage-deflate: negotiated end to end
    assert len(records) == 2 and records[0]["session_id"] == records[1]["session_id"]
    for turn, record in enumerate(records, start=1):
        u = live_usage(turn)
        assert record["endpoint"] == "live" and record["provider"] == "gemini" and record["model"] == MODEL
        assert record["usage_source"] == "provider" and record["status"] == 101
        assert record["input_tokens"] == u["promptTokenCount"] + 10 and record["output_tokens"] == 150
        assert record["cache_read_tokens"] == 100 * turn and record["reasoning_tokens"] == 30
        assert (record["input_audio_tokens"], record["output_audio_tokens"]) == (400 * turn, 100)
        price = calc_price(
            GenaiUsage(input_tokens=record["input_tokens"], output_tokens=150, cache_read_tokens=100 * turn,
                       input_audio_tokens=400 * turn, cache_audio_read_tokens=0, output_audio_tokens=100),
            model_ref=MODEL, provider_id="google",
        )  # fmt: skip
        assert (money(record["input_cost"]), money(record["output_cost"])) == (
            price.input_price,
            price.output_price,
        )


@pytest.mark.usefixtures("trusted")
async def test_a_turn_cut_off_by_the_upstream_is_recorded_from_its_text(ca: trustme.CA) -> None:
    async with live(ca, "cut") as (_, proxy, url, _direct):
        with contextlib.suppress(Exception):  # the SDK sees the connection drop
            await _session(url, 1)
        (record,) = await _records(proxy, 1)
    assert record["usage_source"] == "estimated" and record["output_tokens"] > 0
    assert record["endpoint"] == "live" and "before the turn's usage" in record["error"]

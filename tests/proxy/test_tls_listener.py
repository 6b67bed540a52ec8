"""The proxy's own TLS listener (``[server] tls_cert_file``): ``llmtally serve`` in both forms (one
process, supervised workers) serving HTTPS beside plain HTTP, trusted by the official SDK through
``SSL_CERT_FILE`` or an explicit verify context, with a private CA (trustme)."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

import httpx2
import openai
import orjson
import pytest
import trustme
from openai import AsyncOpenAI

from llmtally.testing import FakeUpstream
from tests.conftest import API_KEY
from tests.proxy.realtime_upstream import MODEL as REALTIME_MODEL
from tests.proxy.realtime_upstream import RealtimeUpstream, usage
from tests.proxy.test_server import serving, stop_serve

PROMPT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _tls_files(ca: trustme.CA, tmp_path: Path, *names: str) -> tuple[str, str, str]:
    """(CA bundle, certificate chain, key) files for a server certificate issued for ``names``."""
    cert = ca.issue_cert(*(names or ("localhost", "127.0.0.1")))
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    paths[1].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(paths[0]), str(paths[1]), str(paths[2])


def _config(tmp_path: Path, upstream: FakeUpstream, cert: str, key: str, tls_port: int) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstreams]\nopenai = "{upstream.url}"\n'
        f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\ntls_port = {tls_port}\n'
    )
    return config


async def _chat(client: AsyncOpenAI) -> str:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)  # type: ignore[arg-type]
    assert completion.usage is not None
    return completion.id


@pytest.mark.parametrize("workers", ["0", "2"])
async def test_the_sdk_trusting_ssl_cert_file_calls_through_the_tls_port_and_is_metered(
    ca: trustme.CA,
    tmp_path: Path,
    upstream: FakeUpstream,
    unused_tcp_port: int,
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    ca_file, cert, key = _tls_files(ca, tmp_path)
    config = _config(tmp_path, upstream, cert, key, unused_tcp_port)
    async with serving(config, {}, "--workers", workers) as (process, url):
        # SSL_CERT_FILE is how docs/deploy.md tells the openai SDK (httpx) to trust the CA.
        monkeypatch.setenv("SSL_CERT_FILE", ca_file)
        tls_url = f"https://localhost:{unused_tcp_port}/openai/v1"
        async with AsyncOpenAI(api_key=API_KEY, base_url=tls_url, max_retries=0) as client:
            await _chat(client)
            await _chat(client)  # a second call on the same (kept-alive) TLS connection
        # The plain port keeps serving beside it.
        async with AsyncOpenAI(api_key=API_KEY, base_url=url + "/openai/v1", max_retries=0) as client:
            await _chat(client)
        stdout, stderr = await stop_serve(process)
    assert f"listening on https://127.0.0.1:{unused_tcp_port} (TLS)".encode() in stderr
    records = [orjson.loads(line) for line in stdout.splitlines()]
    assert len(records) == 3
    assert all(
        r["usage_source"] == "provider" and r["status"] == 200 and r["total_cost"] > 0 for r in records
    )
    assert API_KEY.encode() not in stdout + stderr


async def test_an_explicit_verify_context_works_and_an_untrusting_client_is_refused(
    ca: trustme.CA, tmp_path: Path, upstream: FakeUpstream, unused_tcp_port: int
) -> None:
    ca_file, cert, key = _tls_files(ca, tmp_path)
    config = _config(tmp_path, upstream, cert, key, unused_tcp_port)
    tls_url = f"https://127.0.0.1:{unused_tcp_port}/openai/v1"
    async with serving(config, {}, "--workers", "0") as (process, _):
        trusting = httpx2.AsyncClient(verify=ssl.create_default_context(cafile=ca_file))
        async with AsyncOpenAI(
            api_key=API_KEY, base_url=tls_url, http_client=trusting, max_retries=0
        ) as client:
            await _chat(client)
            # A passthrough call: its connection is handed to aiohttp's protocol, TLS and all.
            assert (await client.models.list()).data is not None
        async with AsyncOpenAI(api_key=API_KEY, base_url=tls_url, max_retries=0) as client:
            # The system roots do not know the private CA: the handshake fails, nothing is sent.
            with pytest.raises(openai.APIConnectionError):
                await _chat(client)
        stdout, _ = await stop_serve(process)
    assert len(stdout.splitlines()) == 1  # only the trusted call reached the upstream


async def _failed_serve(config: Path, *args: str) -> tuple[int | None, str]:
    """``llmtally serve`` that must not start: its exit status and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, stderr.decode()


async def test_a_certificate_that_does_not_load_stops_serve_at_start(
    ca: trustme.CA, tmp_path: Path, upstream: FakeUpstream, unused_tcp_port: int
) -> None:
    _, cert, _ = _tls_files(ca, tmp_path)
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("elsewhere").private_key_pem.write_to_path(str(other_key))
    config = _config(tmp_path, upstream, cert, str(other_key), unused_tcp_port)
    for workers in ("0", "1"):
        code, stderr = await _failed_serve(config, "--workers", workers)
        assert code == 1 and "not a usable certificate and key" in stderr, stderr


async def test_a_missing_certificate_file_is_refused_when_the_config_loads(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstreams]\nopenai = "{upstream.url}"\n[server]\ntls_cert_file = "{tmp_path}/none.pem"\n'
    )
    code, stderr = await _failed_serve(config)
    assert code != 0 and "tls_cert_file: no such file" in stderr, stderr


async def test_a_realtime_session_over_wss_on_the_tls_port_is_metered(
    ca: trustme.CA, tmp_path: Path, unused_tcp_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The openai SDK's Realtime client (the websockets library) through the TLS listener: wss://."""
    fake = RealtimeUpstream()
    await fake.start()
    try:
        ca_file, cert, key = _tls_files(ca, tmp_path)
        config = tmp_path / "config.toml"
        config.write_text(
            f'[upstreams]\nopenai = "{fake.url}"\n'
            f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\ntls_port = {unused_tcp_port}\n'
        )
        async with serving(config, {}, "--workers", "1") as (process, _):
            monkeypatch.setenv("SSL_CERT_FILE", ca_file)  # OpenSSL's default paths read it
            client = AsyncOpenAI(api_key=API_KEY, base_url=f"https://localhost:{unused_tcp_port}/openai/v1")
            async with client.realtime.connect(model=REALTIME_MODEL) as conn:
                await conn.response.create()
                async for event in conn:
                    if event.type == "response.done":
                        break
            stdout, _ = await stop_serve(process)
    finally:
        await fake.stop()
    (record,) = [orjson.loads(line) for line in stdout.splitlines()]
    assert record["endpoint"] == "realtime" and record["usage_source"] == "provider"
    assert record["input_tokens"] == usage(1)["input_tokens"] and record["session_id"]

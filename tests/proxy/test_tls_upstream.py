"""TLS to the upstream, for metered calls (the lean client) and passthrough calls (aiohttp's) alike:
the fake upstream serves behind TLS with a private CA (trustme), and the proxy must verify it."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from openai import AsyncOpenAI

from llmtally.config import Config, ConfigError, UpstreamsConfig, load_config
from llmtally.testing import FakeUpstream, FakeUpstreamConfig
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY
from tests.proxy.helpers import only_record
from tests.proxy.test_server import serving, stop_serve

CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
#: The two clients: a metered call (lean llhttp client) and a passthrough GET (aiohttp's client).
PATHS = {
    "metered": ("POST", "/openai/v1/chat/completions"),
    "passthrough": ("GET", "/openai/v1/models"),
}


@dataclass
class TlsUpstream:
    fake: FakeUpstream
    port: int
    #: The server name each TLS handshake asked for (None: no SNI).
    server_names: list[str | None] = field(default_factory=list)

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"


@contextlib.asynccontextmanager
async def tls_upstream(ca: trustme.CA, *names: str) -> AsyncIterator[TlsUpstream]:
    """The fake upstream on 127.0.0.1 behind TLS, with a certificate ``ca`` issued for ``names``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost", "127.0.0.1"))).configure_cert(context)
    fake = FakeUpstream(FakeUpstreamConfig())
    upstream = TlsUpstream(fake, 0)

    def note_server_name(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        upstream.server_names.append(name)

    context.sni_callback = note_server_name
    await fake.start(ssl_context=context)
    assert fake.url.startswith("https://127.0.0.1:")
    upstream.port = int(fake.url.rsplit(":", 1)[1])
    try:
        yield upstream
    finally:
        await fake.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def tls_config(url: str, ca_file: str = "") -> Config:
    return config_for_upstream(url, Config(upstreams=UpstreamsConfig(ca_file=ca_file)))


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[RunningProxy]:
    proxy = await start_proxy(config)
    try:
        yield proxy
    finally:
        await proxy.stop()


async def call(base_url: str, kind: str) -> tuple[int, dict[str, Any]]:
    method, path = PATHS[kind]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        data = CHAT if method == "POST" else None
        async with session.request(method, base_url + path, data=data, headers=headers) as response:
            return response.status, orjson.loads(await response.read())


@contextlib.contextmanager
def no_traceback_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    ours = [r for r in caplog.records if r.name.startswith(("llmtally", "aiohttp"))]
    assert not [r for r in ours if r.exc_info], [r.getMessage() for r in ours]
    assert "Traceback" not in caplog.text


async def assert_refused(proxy: RunningProxy, kind: str, why: str) -> None:
    """A 502 whose message says the upstream's certificate failed verification, and why."""
    status, body = await call(proxy.url, kind)
    assert status == 502, body
    message = body["error"]["message"]
    assert body["error"]["type"] == "upstream_unreachable"
    assert "TLS certificate verification failed" in message and why in message, message
    if kind == "metered":
        record = await only_record(proxy)
        assert record["status"] == 502
        assert "TLS certificate verification failed" in record["error"] and why in record["error"]
    else:
        assert await proxy.flush() == []


@pytest.mark.parametrize("kind", PATHS)
async def test_a_configured_ca_file_is_trusted_and_sni_names_the_upstream(
    ca: trustme.CA, ca_file: str, kind: str
) -> None:
    async with tls_upstream(ca) as upstream, running(tls_config(upstream.url(), ca_file)) as proxy:
        status, body = await call(proxy.url, kind)
        assert status == 200, body
        assert upstream.fake.seen.headers["Host"] == f"localhost:{upstream.port}"
        if kind == "metered":
            record = await only_record(proxy)
            assert (record["status"], record["error"]) == (200, None) and record["total_tokens"] > 0
        else:
            assert body["object"] == "list"
        assert upstream.server_names == ["localhost"]


async def test_the_openai_sdk_works_through_a_verified_tls_upstream(ca: trustme.CA, ca_file: str) -> None:
    async with tls_upstream(ca) as upstream, running(tls_config(upstream.url(), ca_file)) as proxy:
        client = AsyncOpenAI(api_key=API_KEY, base_url=proxy.url + "/openai/v1", max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        models = await client.models.list()
        await client.close()
        assert text and [m.id for m in models.data]
        record = await only_record(proxy)
        assert (record["stream"], record["status"], record["error"]) == (True, 200, None)
        assert record["output_tokens"] > 0
        # One handshake per client (keep-alive), each naming the upstream's host.
        assert upstream.server_names == ["localhost", "localhost"]


@pytest.mark.parametrize("kind", PATHS)
async def test_an_untrusted_ca_is_refused_with_a_clear_error(
    ca: trustme.CA, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # No ca_file: the system store, which does not know the test CA.
    async with tls_upstream(ca) as upstream, running(tls_config(upstream.url())) as proxy:
        with no_traceback_logged(caplog):
            await assert_refused(proxy, kind, "unable to get local issuer certificate")
        assert upstream.fake.requests == 0


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("localhost", "Hostname mismatch, certificate is not valid for 'localhost'"),
        ("127.0.0.1", "IP address mismatch, certificate is not valid for '127.0.0.1'"),
    ],
)
async def test_a_certificate_for_another_name_is_refused(
    ca: trustme.CA, ca_file: str, kind: str, host: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_upstream(ca, "other.test") as upstream:
        async with running(tls_config(upstream.url(host), ca_file)) as proxy:
            with no_traceback_logged(caplog):
                await assert_refused(proxy, kind, why)
        assert upstream.fake.requests == 0


async def test_ssl_cert_file_is_honoured_by_llmtally_serve(
    ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    """The default store is OpenSSL's, which reads SSL_CERT_FILE: no ca_file needed for a private CA."""
    async with tls_upstream(ca) as upstream:
        config = tmp_path / "config.toml"
        config.write_text(f'[upstreams]\nopenai = "{upstream.url()}"\n')
        async with serving(config, {"SSL_CERT_FILE": ca_file}) as (process, url):
            for kind in PATHS:
                status, body = await call(url, kind)
                assert status == 200, (kind, body)
            stdout, _ = await stop_serve(process)
        records = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
        assert [(r["status"], r["error"]) for r in records] == [(200, None)]
        assert upstream.server_names == ["localhost", "localhost"]


def test_ca_file_is_read_from_the_file_and_the_environment(ca_file: str, tmp_path: Path) -> None:
    assert load_config(env={}).upstreams.ca_file == ""
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nca_file = "{ca_file}"\n')
    assert load_config(config, env={}).upstreams.ca_file == ca_file
    other = tmp_path / "other.pem"
    other.write_bytes(Path(ca_file).read_bytes())
    assert load_config(config, env={"LLMTALLY_UPSTREAMS_CA_FILE": str(other)}).upstreams.ca_file == str(other)
    with pytest.raises(ConfigError, match=r"LLMTALLY_UPSTREAMS_CA_FILE: no such file: '/nowhere/ca.pem'"):
        load_config(env={"LLMTALLY_UPSTREAMS_CA_FILE": "/nowhere/ca.pem"})
    # Refused when the configuration is read, with the line, not when the first call needs it.
    other.write_text("not a certificate\n")
    config.write_text(f'[upstreams]\nopenai = "https://localhost:1"\nca_file = "{other}"\n')
    with pytest.raises(
        ConfigError, match=r"config.toml:3: \[upstreams\] ca_file: not a PEM file of CA certificates"
    ):
        load_config(config, env={})


async def test_a_ca_file_trusts_only_its_own_authority(ca: trustme.CA, ca_file: str) -> None:
    """ca_file replaces the system store for upstreams: a certificate from another CA is refused."""
    other_ca = trustme.CA()
    async with tls_upstream(other_ca) as upstream, running(tls_config(upstream.url(), ca_file)) as proxy:
        for kind in PATHS:
            await assert_refused(proxy, kind, "unable to get local issuer certificate")

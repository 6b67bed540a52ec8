"""Egress through a corporate proxy (HTTPS_PROXY / HTTP_PROXY / NO_PROXY), for metered calls (the lean
client) and passthrough calls (aiohttp's) alike, against a forward proxy written here on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme
from yarl import URL

from llmtally.config import Config, UpstreamsConfig
from llmtally.proxy.egress import Egress
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream
from tests.conftest import API_KEY
from tests.proxy import test_tls_upstream
from tests.proxy.helpers import only_record
from tests.proxy.test_server import serving, stop_serve
from tests.proxy.test_tls_upstream import PATHS, call, no_traceback_logged, running, tls_config, tls_upstream

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")
#: Percent-encoded in the proxy URL: user "us@er", password "p:ss w0rd".
USER, PASSWORD = "us%40er", "p%3Ass%20w0rd"
BASIC = "Basic " + base64.b64encode(b"us@er:p:ss w0rd").decode()
REQUEST_LINE = re.compile(rb"(?:^|\r\n)([A-Z]+ \S+ HTTP/1\.1)\r\n")
#: The TLS tests' fixtures: the test CA and its PEM file.
ca = test_tls_upstream.ca
ca_file = test_tls_upstream.ca_file


def _loopback(host: str) -> str:
    assert host in ("localhost", "127.0.0.1"), host  # the test proxy never leaves the machine
    return "127.0.0.1"


@dataclass
class ForwardProxy:
    """An HTTP forward proxy: CONNECT tunnels and absolute-form requests, piped byte for byte."""

    #: ``Proxy-Authorization`` it demands (407 otherwise); None: none.
    demand: str | None = None
    #: Answer CONNECT with this status line instead of tunnelling (b"403 Forbidden").
    refuse_with: bytes | None = None
    #: Close the connection after reading the request head, without answering.
    hang_up: bool = False
    #: Read the request head and never answer.
    silent: bool = False
    connections: int = 0
    connect_targets: list[str] = field(default_factory=list)
    #: Request lines of non-CONNECT requests (absolute-form), including keep-alive follow-ups.
    forwarded: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        line, *rest = head[:-4].decode("latin-1").split("\r\n")
        headers = dict(h.split(": ", 1) for h in rest)
        authorization = next((v for k, v in headers.items() if k.lower() == "proxy-authorization"), None)
        self.authorizations.append(authorization)
        method, target, _ = line.split(" ")
        answer = None
        if self.hang_up:
            writer.close()
            return
        if self.silent:
            await reader.read()  # until the client gives up and closes
            return
        if self.demand is not None and authorization != self.demand:
            answer = b'407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"'
        elif self.refuse_with is not None:
            answer = self.refuse_with
        if answer is not None:
            writer.write(b"HTTP/1.1 " + answer + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        if method == "CONNECT":
            self.connect_targets.append(target)
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(_loopback(host), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            sniff = None
        else:
            url = URL(target)
            assert url.is_absolute(), line
            up_reader, up_writer = await asyncio.open_connection(_loopback(url.host or ""), url.port)
            up_writer.write(head)
            self.forwarded.append(line)
            sniff = self._sniff
        self.writers.append(up_writer)
        await asyncio.gather(_pipe(reader, up_writer, sniff), _pipe(up_reader, writer, None))

    def _sniff(self, data: bytes) -> None:
        self.forwarded.extend(m.decode("latin-1") for m in REQUEST_LINE.findall(data))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sniff: object) -> None:
    try:
        while data := await reader.read(65536):
            if callable(sniff):
                sniff(data)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def forward_proxy(**options: object) -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy(**options)  # type: ignore[arg-type]
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for writer in proxy.writers:
            writer.close()
        await server.wait_closed()


@pytest.fixture(autouse=True)
def clean_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def free_port() -> int:
    """A loopback port nothing listens on (it was just closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def no_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with no_traceback_logged(caplog):
        yield
    for secret in ("w0rd", PASSWORD, BASIC.split()[1]):
        assert secret not in caplog.text


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
async def test_https_upstreams_are_reached_only_through_the_proxy_tunnel(
    ca: trustme.CA, ca_file: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy() as egress:
        monkeypatch.setenv(variable, egress.url)
        async with running(tls_config(upstream.url(), ca_file)) as proxy:
            for kind in (*PATHS, "metered", "passthrough"):  # the second round reuses the tunnels
                status, body = await call(proxy.url, kind)
                assert status == 200, (kind, body)
            records = await proxy.flush()
        target = f"localhost:{upstream.port}"
        assert egress.connect_targets == [target, target]  # one tunnel per client, kept alive
        # Every TLS session the upstream saw came through a tunnel, and named the upstream (SNI).
        assert upstream.server_names == ["localhost", "localhost"]
        assert [(r["status"], r["error"]) for r in records] == [(200, None), (200, None)]
        assert all(r["total_tokens"] > 0 for r in records)


@pytest.mark.parametrize(
    "no_proxy",
    ["localhost", "example.com, .localhost", "*", "LOCALHOST:{port}", "other.test,localhost:{port}"],
)
async def test_no_proxy_hosts_are_reached_directly(
    ca: trustme.CA, ca_file: str, no_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy() as egress:
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        monkeypatch.setenv("NO_PROXY", no_proxy.format(port=upstream.port))
        async with running(tls_config(upstream.url(), ca_file)) as proxy:
            for kind in PATHS:
                status, body = await call(proxy.url, kind)
                assert status == 200, (kind, body)
        assert egress.connections == 0
        assert upstream.server_names == ["localhost", "localhost"]


async def test_no_proxy_for_another_port_does_not_bypass(
    ca: trustme.CA, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy() as egress:
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        monkeypatch.setenv("NO_PROXY", f"localhost:{upstream.port + 1},example.com")
        async with running(tls_config(upstream.url(), ca_file)) as proxy:
            for kind in PATHS:
                assert (await call(proxy.url, kind))[0] == 200
        assert egress.connect_targets == [f"localhost:{upstream.port}"] * 2


async def test_http_upstreams_get_absolute_form_requests_with_proxy_credentials(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with forward_proxy(demand=BASIC) as egress:
        monkeypatch.setenv("HTTP_PROXY", f"http://{USER}:{PASSWORD}@127.0.0.1:{egress.port}")
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # https only: never used here
        with no_secret_logged(caplog):
            async with running(config_for_upstream(upstream.url)) as proxy:
                for kind in (*PATHS, "metered"):
                    status, body = await call(proxy.url, kind)
                    assert status == 200, (kind, body)
                records = await proxy.flush()
        origin = upstream.url
        assert sorted(egress.forwarded) == sorted(
            [
                f"POST {origin}/v1/chat/completions HTTP/1.1",
                f"GET {origin}/v1/models HTTP/1.1",
                f"POST {origin}/v1/chat/completions HTTP/1.1",  # the kept-alive connection, again
            ]
        )
        assert egress.connections == 2 and egress.authorizations == [BASIC, BASIC]
        assert [(r["status"], r["error"]) for r in records] == [(200, None), (200, None)]
        # The test proxy passes the request on as it came: the upstream saw it forwarded.
        assert upstream.seen.headers["Proxy-Authorization"] == BASIC


async def test_proxy_credentials_are_sent_on_connect_and_never_logged(
    ca: trustme.CA, ca_file: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy(demand=BASIC) as egress:
        monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{PASSWORD}@127.0.0.1:{egress.port}")
        with no_secret_logged(caplog):
            async with running(tls_config(upstream.url(), ca_file)) as proxy:
                for kind in PATHS:
                    status, body = await call(proxy.url, kind)
                    assert status == 200, (kind, body)
                await proxy.flush()
        assert egress.authorizations == [BASIC, BASIC]
        assert "Proxy-Authorization" not in upstream.fake.seen.headers  # it stays at the proxy


async def failure(upstream_url: str, ca_file: str, kind: str) -> str:
    """The 502 message a call gets (and, for a metered call, the same in the record's error)."""
    async with running(tls_config(upstream_url, ca_file)) as proxy:
        status, body = await call(proxy.url, kind)
        assert status == 502, body
        assert body["error"]["type"] == "upstream_unreachable"
        message: str = body["error"]["message"]
        if kind == "metered":
            assert (await only_record(proxy))["error"] == f"upstream_unreachable: {message}"
        return message


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize(
    ("options", "why"),
    [
        (
            {"demand": "Basic bm9ib2R5Om5vcGU="},
            "answered CONNECT localhost:{port} with 407 Proxy Authentication",
        ),
        ({"refuse_with": b"403 Forbidden"}, "answered CONNECT localhost:{port} with 403 Forbidden"),
        ({"refuse_with": b"502 Bad Gateway"}, "answered CONNECT localhost:{port} with 502 Bad Gateway"),
        ({"hang_up": True}, "closed the tunnel"),
    ],
)
async def test_a_failing_proxy_is_a_502_naming_it(
    ca: trustme.CA,
    ca_file: str,
    kind: str,
    options: dict[str, object],
    why: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy(**options) as egress:
        monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{PASSWORD}@127.0.0.1:{egress.port}")
        with no_secret_logged(caplog):
            message = await failure(upstream.url(), ca_file, kind)
        assert message.startswith(
            f"cannot reach the upstream: UpstreamConnectError: cannot connect to localhost:{upstream.port} "
            f"through egress proxy http://127.0.0.1:{egress.port} (HTTPS_PROXY): "
        ), message
        assert why.format(port=upstream.port) in message, message
        assert upstream.fake.requests == 0 and upstream.server_names == []


@pytest.mark.parametrize("kind", PATHS)
async def test_a_proxy_that_never_answers_connect_is_a_504_within_connect_timeout(
    ca: trustme.CA, ca_file: str, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy(silent=True) as egress:
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        up = UpstreamsConfig(connect_timeout_s=0.3, ca_file=ca_file)
        config = config_for_upstream(upstream.url(), Config(upstreams=up))
        with no_traceback_logged(caplog):
            async with running(config) as proxy:
                status, body = await call(proxy.url, kind)
                assert (status, body["error"]["type"]) == (504, "upstream_timeout"), body
                if kind == "metered":
                    assert (await only_record(proxy))["status"] == 504
        assert egress.connections == 1 and upstream.fake.requests == 0


@pytest.mark.parametrize("kind", PATHS)
async def test_an_unreachable_proxy_is_a_502_naming_it(
    ca: trustme.CA, ca_file: str, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    async with tls_upstream(ca) as upstream:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        with no_traceback_logged(caplog):
            message = await failure(upstream.url(), ca_file, kind)
        assert (
            f"through egress proxy http://127.0.0.1:{port} (HTTPS_PROXY): the proxy is unreachable" in message
        )
        assert "ConnectionRefusedError" in message
        assert upstream.fake.requests == 0


@pytest.mark.parametrize("kind", PATHS)
async def test_an_unsupported_proxy_scheme_fails_calls_and_is_never_bypassed(
    ca: trustme.CA, ca_file: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_upstream(ca) as upstream:
        monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
        message = await failure(upstream.url(), ca_file, kind)
        assert "only http://host:port egress proxies are supported, HTTPS_PROXY is socks5://" in message
        assert upstream.fake.requests == 0


async def test_a_tunnel_serves_only_the_origin_it_was_opened_for(
    ca: trustme.CA, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two upstream origins behind one proxy: a tunnel per origin, kept alive, never shared; an origin
    in NO_PROXY goes direct while the other is tunnelled."""
    async with tls_upstream(ca) as upstream, forward_proxy() as egress:
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        monkeypatch.setenv("NO_PROXY", "example.com")
        up = UpstreamsConfig(
            openai=upstream.url("localhost"), anthropic=upstream.url("127.0.0.1"), ca_file=ca_file
        )
        config = Config(upstreams=up)
        message = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []})
        async with running(config) as proxy, aiohttp.ClientSession() as session:
            for _ in range(2):
                status, _body = await call(proxy.url, "metered")
                assert status == 200
                async with session.post(
                    proxy.url + "/anthropic/v1/messages", data=message, headers={"x-api-key": API_KEY}
                ) as response:
                    assert response.status == 200, await response.read()
            records = await proxy.flush()
        assert egress.connect_targets == [f"localhost:{upstream.port}", f"127.0.0.1:{upstream.port}"]
        assert [r["provider"] for r in records] == ["openai", "anthropic"] * 2
        assert all(r["error"] is None for r in records)
        # SNI for the host name; none for the IP address (Python sends none for IP literals).
        assert upstream.server_names == ["localhost", None]


async def test_llmtally_serve_reads_the_proxy_environment(
    ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    async with tls_upstream(ca) as upstream, forward_proxy() as egress:
        config = tmp_path / "config.toml"
        config.write_text(f'[upstreams]\nopenai = "{upstream.url()}"\nca_file = "{ca_file}"\n')
        async with serving(config, {"HTTPS_PROXY": egress.url}) as (process, url):
            for kind in PATHS:
                status, body = await call(url, kind)
                assert status == 200, (kind, body)
            stdout, _ = await stop_serve(process)
        assert egress.connect_targets == [f"localhost:{upstream.port}"] * 2
        records = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
        assert [(r["status"], r["error"]) for r in records] == [(200, None)]


def test_the_environment_is_read_as_the_standard_library_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://upper.test:1")
    monkeypatch.setenv("https_proxy", "http://user:secret@lower.test:3128/")
    monkeypatch.setenv("HTTP_PROXY", "proxy.test:8080")  # no scheme: http, as curl reads it
    monkeypatch.setenv("no_proxy", ".internal.test, api.example.com:8443")
    egress = Egress.from_environment()
    https = egress.proxy_for("https", "api.openai.com", 443)
    assert https is not None
    assert (str(https.url), https.source) == ("http://lower.test:3128", "https_proxy")  # lowercase wins
    assert https.authorization == "Basic " + base64.b64encode(b"user:secret").decode()
    assert "secret" not in repr(https) and "secret" not in str(https)
    http = egress.proxy_for("http", "upstream.test", 80)
    assert http is not None and (str(http.url), http.source) == ("http://proxy.test:8080", "HTTP_PROXY")
    assert egress.proxy_for("https", "a.internal.test", 443) is None
    assert egress.proxy_for("https", "api.example.com", 8443) is None
    assert egress.proxy_for("https", "api.example.com", 443) is not None
    # Read once: later changes to the environment do not move an existing Egress.
    monkeypatch.setenv("no_proxy", "*")
    assert egress.proxy_for("https", "api.example.com", 443) is not None
    assert Egress.from_environment().proxy_for("https", "api.example.com", 443) is None


@pytest.mark.parametrize(
    "value", ["http://[not-a-host", "socks5://127.0.0.1:1080", "https://proxy.test:3128"]
)
def test_a_proxy_that_cannot_be_used_is_named_and_never_bypassed(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", value)
    proxy = Egress.from_environment().proxy_for("https", "api.openai.com", 443)
    assert proxy is not None and proxy.unusable is not None
    assert str(proxy).startswith("egress proxy ") and "(HTTPS_PROXY)" in str(proxy)

"""How upstream connections leave: direct or through the environment's egress proxy, verified TLS.

Both upstream clients — the lean one of metered calls (:mod:`llmtally.proxy.upstream`) and aiohttp's
of passthrough calls — take their route and their TLS context from here, so they behave alike:

- ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (and the lowercase forms) are read once, at startup,
  with the standard library's ``getproxies_environment``; ``NO_PROXY`` is applied with its
  ``proxy_bypass_environment`` (``*``, domain suffixes, ``host:port``). An https upstream behind a
  proxy is reached through a ``CONNECT host:port`` tunnel with TLS (SNI, verification) for the
  upstream's host inside; an http upstream gets absolute-form request targets sent to the proxy.
- Credentials in the proxy URL become ``Proxy-Authorization: Basic``; the URL shown in logs and
  errors never carries them.
- One TLS context, the system's default store (which honours ``SSL_CERT_FILE``) or ``[upstreams]
  ca_file``, verification always on.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from llmtally.config import ConfigError

#: Longest answer head a proxy may send to CONNECT.
MAX_CONNECT_ANSWER = 64 * 1024

Proto = TypeVar("Proto", bound=asyncio.BaseProtocol)


class EgressProxyError(ConnectionError):
    """The egress proxy refused, failed or closed the tunnel; the message says how (no credentials)."""


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """One proxy from the environment."""

    #: Without credentials: safe to show.
    url: URL
    #: The variable it came from (``HTTPS_PROXY``, ``http_proxy``…).
    source: str
    #: ``Proxy-Authorization`` value from the URL's ``user:password``, or None.
    authorization: str | None = field(default=None, repr=False)
    #: Why it cannot be used (an unsupported scheme); every call through it fails with this.
    unusable: str | None = None

    def __str__(self) -> str:
        return f"egress proxy {self.url or '?'} ({self.source})"


@dataclass(slots=True)
class Egress:
    """The environment's proxies, read once; which one (if any) each upstream origin goes through."""

    #: ``getproxies_environment()`` as it was at startup: scheme → proxy URL, ``no`` → NO_PROXY.
    proxies: Mapping[str, str] = field(default_factory=dict)
    #: Where each scheme's proxy came from (the variable's name as set).
    sources: Mapping[str, str] = field(default_factory=dict)
    _routes: dict[tuple[str, str, int], EgressProxy | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environment(cls) -> Egress:
        """The proxies the process environment names, read as curl, requests and aiohttp read them."""
        proxies = urllib.request.getproxies_environment()
        sources = {}
        for scheme in proxies:
            lower = f"{scheme}_proxy"
            sources[scheme] = lower if os.environ.get(lower) else lower.upper()
        return cls(proxies, sources)

    def proxy_for(self, scheme: str, host: str, port: int) -> EgressProxy | None:
        """The proxy a connection to ``scheme://host:port`` goes through; None: direct."""
        key = (scheme, host, port)
        try:
            return self._routes[key]
        except KeyError:
            pass
        route = None
        raw = self.proxies.get(scheme)
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # not in typeshed
        if raw and not bypass(f"{host}:{port}", self.proxies):
            route = _parse_proxy(raw, self.sources.get(scheme, f"{scheme.upper()}_PROXY"))
        self._routes[key] = route
        return route

    def proxy_for_url(self, url: URL) -> EgressProxy | None:
        assert url.host is not None and url.port is not None
        return self.proxy_for(url.scheme, url.host, url.port)


def _parse_proxy(raw: str, source: str) -> EgressProxy:
    try:
        url = URL(raw if "://" in raw else f"http://{raw}")
        host, port = url.host, url.port
    except ValueError:
        return EgressProxy(URL(), source, unusable=f"{source} is not a URL")
    authorization = None
    if url.user is not None:
        token = f"{url.user}:{url.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(token).decode("ascii")
    shown = url.with_user(None).with_path("").with_query(None).with_fragment(None)
    unusable = None
    if url.scheme != "http" or not host or port is None:
        unusable = f"only http://host:port egress proxies are supported, {source} is {shown.scheme}://"
    return EgressProxy(shown, source, authorization, unusable)


def upstream_ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """Verification on, host names checked: the system store (``SSL_CERT_FILE`` and ``SSL_CERT_DIR``
    are honoured by OpenSSL) or, when given, only the CA certificates in ``ca_file``."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[upstreams] ca_file: cannot load {ca_file!r}: {exc}") from None


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_failure(host: str, port: int, proxy: EgressProxy | None, exc: BaseException) -> str:
    """Why a connection to ``host:port`` failed, worded once for both clients."""
    where = f"cannot connect to {authority(host, port)}"
    if proxy is not None:
        where += f" through {proxy}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason
        return f"{where}: TLS certificate verification failed: {why} (SSLCertVerificationError)"
    if isinstance(exc, ssl.SSLError):
        return f"{where}: TLS handshake failed: {exc.reason or exc} ({type(exc).__name__})"
    if isinstance(exc, EgressProxyError):
        return f"{where}: {exc}"
    return f"{where}: {type(exc).__name__}: {exc}"


# The fast client's tunnel -----------------------------------------------------------------------


class _ConnectAnswer(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; then the transport is handed to TLS."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            if end + 4 < len(self.buffer):  # TLS starts with the client: nothing may come before
                self.head.set_exception(EgressProxyError("the proxy sent bytes after its answer to CONNECT"))
            else:
                self.head.set_result(bytes(self.buffer[:end]))
        elif len(self.buffer) > MAX_CONNECT_ANSWER:
            self.head.set_exception(EgressProxyError("the proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(EgressProxyError("the proxy closed the tunnel before answering CONNECT"))


async def _open_proxy_connection(
    loop: asyncio.AbstractEventLoop, proxy: EgressProxy, factory: Callable[[], Proto]
) -> tuple[asyncio.BaseTransport, Proto]:
    if proxy.unusable is not None:
        raise EgressProxyError(proxy.unusable)
    assert proxy.url.host is not None and proxy.url.port is not None
    try:
        return await loop.create_connection(factory, proxy.url.host, proxy.url.port)
    except OSError as exc:
        raise EgressProxyError(f"the proxy is unreachable: {type(exc).__name__}: {exc}") from exc


async def connect_through(
    loop: asyncio.AbstractEventLoop,
    proxy: EgressProxy,
    host: str,
    port: int,
    factory: Callable[[], Proto],
    ssl_context: ssl.SSLContext | None,
) -> tuple[asyncio.BaseTransport, Proto]:
    """A connection to ``host:port`` through ``proxy``: with ``ssl_context``, a CONNECT tunnel and TLS
    for ``host`` inside it; without, a plain connection to the proxy (absolute-form targets are the
    protocol's business). Raises :class:`EgressProxyError`, ``OSError`` or ``ssl.SSLError``."""
    if ssl_context is None:
        return await _open_proxy_connection(loop, proxy, factory)
    transport, answer = await _open_proxy_connection(loop, proxy, lambda: _ConnectAnswer(loop))
    try:
        target = authority(host, port)
        lines = [f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"]
        if proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {proxy.authorization}\r\n")
        lines.append("\r\n")
        cast_transport(transport).write("".join(lines).encode("latin-1"))
        head = await answer.head
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise EgressProxyError(f"the proxy's answer to CONNECT is not HTTP: {status_line[:80]!r}")
        status = int(parts[1])
        if not 200 <= status < 300:
            raise _connect_refused(target, status, parts[2] if len(parts) > 2 else "")
    except BaseException:
        answer.head.cancel()  # a timeout or a refusal: nobody waits for the answer any more
        transport.close()
        raise
    protocol = factory()
    # The upstream's protocol gets the decrypted bytes; start_tls does not call its connection_made.
    tls = await loop.start_tls(cast_transport(transport), protocol, ssl_context, server_hostname=host)
    if tls is None:  # pragma: no cover - only when the transport closed under it
        raise EgressProxyError("the proxy closed the tunnel during the TLS handshake")
    protocol.connection_made(tls)
    return tls, protocol


def cast_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    return transport  # type: ignore[return-value]  # uvloop's transports are not asyncio.Transport


# aiohttp's side ---------------------------------------------------------------------------------


class PassthroughConnectError(aiohttp.ClientConnectionError):
    """aiohttp's connect failure, worded as the fast client's (:func:`connect_failure`)."""


async def passthrough_request(
    session: aiohttp.ClientSession, egress: Egress, method: str, url: URL, **kwargs: Any
) -> aiohttp.ClientResponse:
    """``session.request`` through ``url``'s egress proxy, if any; a failure to connect raises
    :class:`PassthroughConnectError`, worded as the fast client's."""
    proxy = egress.proxy_for_url(url)
    try:
        if proxy is None:
            return await session.request(method, url, **kwargs)
        if proxy.unusable is not None:
            raise PassthroughConnectError(
                connect_failure(url.host or "", url.port or 0, proxy, EgressProxyError(proxy.unusable))
            )
        if proxy.authorization is not None:
            if url.scheme == "https":  # on the CONNECT only: the upstream never sees it
                kwargs["proxy_headers"] = {"Proxy-Authorization": proxy.authorization}
            else:  # every request goes to the proxy itself (aiohttp's proxy_headers would not)
                headers = CIMultiDict(kwargs.pop("headers", None) or {})
                headers["Proxy-Authorization"] = proxy.authorization
                kwargs["headers"] = headers
        return await session.request(method, url, proxy=proxy.url, **kwargs)
    except PassthroughConnectError:
        raise
    except aiohttp.ClientError as exc:
        raise aiohttp_connect_failure(exc, url, proxy) from exc


def _connect_refused(target: str, status: int, reason: str) -> EgressProxyError:
    hint = " (proxy credentials missing or refused)" if status == 407 else ""
    return EgressProxyError(f"the proxy answered CONNECT {target} with {status} {reason}".rstrip() + hint)


def aiohttp_connect_failure(
    exc: aiohttp.ClientError, url: URL, proxy: EgressProxy | None
) -> aiohttp.ClientError:
    """``exc`` as a :class:`PassthroughConnectError` when it is a failure to connect, else ``exc``."""
    inner: BaseException
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        inner = EgressProxyError(f"the proxy is unreachable: {type(exc.os_error).__name__}: {exc.os_error}")
    elif isinstance(exc, aiohttp.ClientHttpProxyError):
        inner = _connect_refused(authority(url.host or "", url.port or 0), exc.status, exc.message)
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        inner = exc.certificate_error
    elif isinstance(exc, aiohttp.ClientConnectorError):
        inner = exc.os_error
    elif proxy is not None and isinstance(exc, aiohttp.ServerDisconnectedError):
        inner = EgressProxyError(f"the proxy closed the tunnel: {type(exc).__name__}: {exc}")
    else:
        return exc
    return PassthroughConnectError(connect_failure(url.host or "", url.port or 0, proxy, inner))

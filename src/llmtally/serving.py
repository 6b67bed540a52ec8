"""``llmtally serve``: check the port is free, start the fake upstream if asked, run one of the two forms.

The proxy's workers share their port through SO_REUSEPORT, which would let a second llmtally (any
process of the same user setting it) join the port and silently take half of the calls. So before
anything starts, ``llmtally serve`` claims the port (:func:`claim_port`): if another process listens
there, or another llmtally holds it, it exits 2 saying so. The supervisor's own workers still share it.

With ``[upstreams] fake = true`` (``--fake-upstream``) the built-in fake upstream runs in this process
and every upstream points at it: a newcomer can try the proxy with their own SDK code, no key and no
network. It says so on stderr at start, and every record carries ``"fake_upstream": true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from llmtally.config import Config, ServerConfig, configure_logging

log = logging.getLogger("llmtally.server")


class PortInUse(OSError):
    """Another process serves (or holds) the port this llmtally was asked to listen on."""


def _taken(what: str, port: int, host: str) -> PortInUse:
    return PortInUse(
        errno.EADDRINUSE,
        f"{what} {port} on {host or '*'} is already served by another process "
        "(another llmtally?); stop it or choose another port",
    )


def claim_port(host: str, port: int, what: str = "proxy port") -> socket.socket | None:
    """Claim ``host:port`` for this llmtally; the returned socket holds the claim while it is open.

    Two checks, because a starting llmtally binds its port (SO_REUSEPORT) a moment before its workers
    listen: a lock that every llmtally takes, an abstract Unix socket named after the port (Linux;
    the kernel drops it with the process, so a crash leaves nothing stale), and a probe that listens
    for an instant without SO_REUSEPORT, which fails while any other process listens on the port.
    Raises :class:`PortInUse`; port 0 (any free port) needs no claim.
    """
    if port == 0:
        return None
    lock = None
    if sys.platform.startswith("linux"):
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0llmtally-port:{host}:{port}")
        except OSError as exc:
            lock.close()
            if exc.errno == errno.EADDRINUSE:
                raise _taken(what, port, host) from None
            raise
    try:
        _probe(host, port, what)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


def _probe(host: str, port: int, what: str) -> None:
    """Listen on ``host:port`` for an instant without SO_REUSEPORT (SO_REUSEADDR: the last run's
    TIME_WAIT connections do not count); Linux refuses that while another socket listens there."""
    for family, kind, proto, _, address in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                probe.listen(1)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise _taken(what, port, host) from None
        return  # the first address is the one the proxy binds


def with_fake_upstream(config: Config, url: str) -> Config:
    """``config`` with every provider's upstream at ``url`` and the record flag on (Bedrock re-signed
    with the fake's own AWS identity)."""
    import importlib.util

    from llmtally.testing.fake_bedrock import REGION

    bedrock = url if importlib.util.find_spec("botocore") is not None else ""  # the `bedrock` extra
    upstreams = replace(
        config.upstreams,
        openai=url, anthropic=url, gemini=url, azure_openai=url, vertex=url, bedrock=bedrock, fake=True,
    )  # fmt: skip
    return replace(config, upstreams=upstreams, bedrock=replace(config.bedrock, region=REGION))


def _announce_fake(url: str) -> None:
    bar = "=" * 78
    sys.stderr.write(
        f"{bar}\n"
        f"llmtally: FAKE UPSTREAM at {url}: every provider (OpenAI, Anthropic, Gemini) and\n"
        "platform (Azure OpenAI, Vertex AI, Bedrock) is answered by llmtally's built-in fake; no\n"
        "call leaves this machine, no key is needed, the answers and\n"
        'their usage are made up, and every record carries "fake_upstream": true.\n'
        f"{bar}\n"
    )
    sys.stderr.flush()


async def serve_configured(config: Config, config_path: str | None = None) -> None:
    """The single-process form when ``[server] workers`` is 0, else the supervised workers; with the
    fake upstream started first when ``[upstreams] fake`` is set."""
    from llmtally.platforms import PlatformConfigError, build_platforms
    from llmtally.proxy.server import serve
    from llmtally.supervisor import StartupError, supervise

    try:  # here, once: not in each worker, which would die and be restarted for ever
        build_platforms(config)
    except PlatformConfigError as exc:
        raise StartupError(str(exc)) from None
    from llmtally.proxy.tls import TlsConfigError, server_tls_context

    try:
        server_tls_context(config.server)
    except TlsConfigError as exc:
        raise StartupError(str(exc)) from None
    main = supervise if config.server.workers else serve
    if not config.upstreams.fake:
        await main(config, config_path=config_path)
        return
    from llmtally.testing import FakeUpstream

    fake = FakeUpstream()
    url = await fake.start()
    _announce_fake(url)
    try:
        await main(with_fake_upstream(config, url), config_path=config_path)
    finally:
        await fake.stop()


def run(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    config_path: str | None = None,
    workers: int | None = None,
    fake_upstream: bool = False,
) -> int:
    """Blocking entry point for ``llmtally serve``; the exit status (2: the port is taken)."""
    server = replace(
        config.server,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
        workers=workers if workers is not None else config.server.workers,
    )
    upstreams = replace(config.upstreams, fake=config.upstreams.fake or fake_upstream)
    config = replace(config, server=server, upstreams=upstreams)
    configure_logging(config.logging.level)
    with contextlib.ExitStack() as claims:
        try:
            for claim_host, claim_port_number, what in _ports_of(server):
                lock = claim_port(claim_host, claim_port_number, what)
                if lock is not None:
                    claims.enter_context(lock)
        except PortInUse as exc:
            print(f"llmtally serve: {exc.strerror}", file=sys.stderr)
            return 2
        return _run_loop(serve_configured(config, config_path))


def _ports_of(server: ServerConfig) -> list[tuple[str, int, str]]:
    ports = [(server.host, server.port, "proxy port")]
    if server.admin_port:
        ports.append((server.admin_host, server.admin_port, "admin port"))
    if server.tls_cert_file:
        ports.append((server.host, server.tls_port, "TLS port"))
    return ports


def _run_loop(main: Coroutine[Any, Any, None]) -> int:
    from llmtally.supervisor import StartupError

    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on some platforms
        runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(main)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # taken between the claim and the bind
            print(f"llmtally serve: {exc}", file=sys.stderr)
            return 2
        log.error("cannot serve: %s", exc)
        return 1
    except StartupError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0

"""What a server core costs per proxied call on this machine: the experiment behind proxy/fastpath.py.

Each candidate forwards ``POST /openai/...`` to the lean fake upstream with llmtally's upstream client
(``proxy/upstream.py``) and answers with the upstream's body; nothing is metered. Only the server core
differs: aiohttp's ``web.Application`` and its low-level ``web.Server``, uvicorn (httptools, a raw ASGI
app) and granian (RSGI, one worker, one runtime thread) when they are installed, llmtally's own proxy
app (its records dropped) with and without ``[server] fast_path``, and ``floor.py`` (a bare uvloop +
llhttp forwarder). Closed-loop clients as in ``make load``; CPU is every process of the candidate.

    .venv/bin/python load_tests/server_cores.py [--clients 16] [--latency-ms 50] [--duration 4]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from lean import build_request, closed_loop
from run import free_port, pct, wait_for_port

HERE = Path(__file__).parent
CANDIDATES = [
    "floor",
    "aiohttp-app",
    "aiohttp-server",
    "uvicorn",
    "granian",
    "llmtally-fastpath",
    "llmtally-aiohttp",
]


def _forwarder(upstream_port: int) -> Any:
    """The handler body every candidate shares: llmtally's upstream client, the answer passed back."""
    from yarl import URL

    from llmtally.config import UpstreamsConfig
    from llmtally.proxy.upstream import UpstreamPool

    base = f"http://127.0.0.1:{upstream_port}"
    pools: list[UpstreamPool] = []

    async def forward(
        raw_path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if not pools:
            pools.append(UpstreamPool(UpstreamsConfig()))
        url = URL(base + raw_path.removeprefix("/openai"), encoded=True)
        sent = [(k, v) for k, v in headers if k.lower() not in ("host", "content-length")]
        answer = await pools[0].post(url, sent, body)
        data = answer.body_if_complete() or b""
        skip = ("content-length", "connection", "transfer-encoding")
        return answer.status, [(k, v) for k, v in answer.headers.items() if k.lower() not in skip], data

    return forward


def serve(kind: str, port: int, upstream_port: int) -> None:
    forward = _forwarder(upstream_port)
    if kind == "uvicorn":
        import uvicorn

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            status, out, data = await forward(scope["raw_path"].decode(), headers, body)
            encoded = [(k.encode(), v.encode()) for k, v in out] + [(b"content-length", b"%d" % len(data))]
            await send({"type": "http.response.start", "status": status, "headers": encoded})
            await send({"type": "http.response.body", "body": data})

        uvicorn.run(asgi, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
                    log_level="warning", lifespan="off", server_header=False, date_header=False)  # fmt: skip
        return
    uvloop.run(_serve_aiohttp(kind, port, upstream_port, forward))


async def _serve_aiohttp(kind: str, port: int, upstream_port: int, forward: Any) -> None:
    from aiohttp import web

    if kind.startswith("llmtally"):
        from llmtally.config import Config
        from llmtally.proxy.app import create_app
        from llmtally.proxy.fastpath import proxy_runner

        class DropRecords:
            def submit(self, exchange: object) -> None:
                pass

            async def metrics(self) -> bytes | None:
                return None

        config = Config()
        base = f"http://127.0.0.1:{upstream_port}"
        config = dataclasses.replace(
            config,
            upstreams=dataclasses.replace(config.upstreams, openai=base),
            server=dataclasses.replace(config.server, fast_path=kind == "llmtally-fastpath"),
        )
        runner: web.BaseRunner = proxy_runner(create_app(config, DropRecords()))  # type: ignore[arg-type]
    else:

        async def handler(request: web.Request) -> web.Response:
            body = await request.read()
            status, out, data = await forward(request.raw_path, list(request.headers.items()), body)
            return web.Response(body=data, status=status, headers=out)

        if kind == "aiohttp-app":
            app = web.Application()
            app.router.add_route("*", "/openai/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        else:
            server = web.Server(handler, access_log=None, handler_cancellation=True)
            runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def command(kind: str, port: int, upstream_port: int) -> list[str] | None:
    py = sys.executable
    if kind == "floor":
        return [py, str(HERE / "floor.py"), "--port", str(port), "--upstream-port", str(upstream_port)]
    if kind == "granian":
        granian = shutil.which("granian", path=str(Path(py).parent))
        if granian is None:
            return None
        return [granian, "--interface", "rsgi", "--workers", "1", "--runtime-threads", "1",
                "--loop", "uvloop", "--no-ws", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--working-dir", str(HERE), "server_cores:rsgi_app"]  # fmt: skip
    if kind == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        return None
    return [py, __file__, "serve", kind, "--port", str(port), "--upstream-port", str(upstream_port)]


_RSGI_FORWARD: list[Any] = []


async def rsgi_app(scope: Any, protocol: Any) -> None:
    """granian's RSGI entry point (it imports this module; the upstream port comes from the environment)."""
    if not _RSGI_FORWARD:
        _RSGI_FORWARD.append(_forwarder(int(os.environ["SERVER_CORES_UPSTREAM"])))
    body = await protocol()
    path = scope.path + (f"?{scope.query_string}" if scope.query_string else "")
    status, out, data = await _RSGI_FORWARD[0](path, list(scope.headers.items()), body)
    protocol.response_bytes(status, out, data)


def _cpu_s(pid: int) -> float:
    total = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            for child in children.read().split():
                total += _cpu_s(int(child))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return total + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace) -> None:
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "lean.py"), "upstream", "--port", str(upstream_port), "--latency-ms",
         str(args.latency_ms), "--chunks", "20", "--chunk-interval-ms", "5"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(upstream_port, 10)
    print(f"{args.clients} clients, {args.latency_ms} ms upstream, {args.duration} s per candidate")
    try:
        for kind in args.candidates.split(","):
            port = free_port()
            argv = command(kind, port, upstream_port)
            if argv is None:
                print(f"{kind:18s} not installed")
                continue
            env = dict(os.environ, SERVER_CORES_UPSTREAM=str(upstream_port))
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for_port(port, 20)
                uvloop.run(_drive(kind, port, proc.pid, args))
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
    finally:
        upstream.terminate()
        upstream.wait(10)


async def _drive(kind: str, port: int, pid: int, args: argparse.Namespace) -> None:
    request = build_request("127.0.0.1", port, "/openai", "openai", False)
    await closed_loop("127.0.0.1", port, request, args.clients, 1.0, 0.0)  # warm-up
    await asyncio.sleep(0.5)
    cpu0 = _cpu_s(pid)
    samples = await closed_loop("127.0.0.1", port, request, args.clients, args.duration, 0.0)
    cpu = _cpu_s(pid) - cpu0
    n = len(samples.latency_ms)
    p50, p99 = pct(samples.latency_ms, 0.5), pct(samples.latency_ms, 0.99)
    assert p50 is not None and p99 is not None
    print(f"{kind:18s} {n:6d} calls  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  CPU {cpu / n * 1e6:5.0f} µs/call")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd")
    one = sub.add_parser("serve")
    one.add_argument("kind")
    one.add_argument("--port", type=int, required=True)
    one.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.kind, args.port, args.upstream_port)
    else:
        measure(args)


if __name__ == "__main__":
    main()

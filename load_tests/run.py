"""Proxy overhead, measured side by side: direct calls, llmtally, and nginx, against one fake upstream.

    .venv/bin/python load_tests/run.py [--duration 5] [--concurrency 1,16,64] [--latency-ms 50]

Starts the fake upstream, llmtally (`llmtally serve`) and, when installed, nginx (`proxy_pass`, buffering
off, upstream keep-alive) as separate processes; drives each with persistent-connection async clients at
fixed concurrency, non-streamed and streamed (OpenAI chat format), after a warm-up; prints a table and
writes load_tests/results/<date>.json. Added latency is each proxy's percentile minus the direct call's.

Not yet here (see docs/performance.md): the LiteLLM proxy, fixed offered rates, the other providers'
formats, and the chart. It also holds --open-streams streams open at once and reports llmtally's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}]}'
STREAM_BODY = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
HEADERS = {"Authorization": "Bearer sk-load-test", "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Result:
    target: str
    mode: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    ttfb_p50_ms: float | None = None
    chunk_gap_p50_ms: float | None = None
    proxy_cpu_s: float | None = None
    proxy_peak_rss_mb: float | None = None
    added: dict[str, float] = field(default_factory=dict)


class Proc:
    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, ready: bytes | None = None
    ) -> None:
        self.popen = subprocess.Popen(
            args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if ready is not None:
            assert self.popen.stderr is not None
            while ready not in (line := self.popen.stderr.readline()):
                if not line:
                    raise RuntimeError(f"{args[0]} exited: {self.popen.wait()}")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


async def drive(
    url: str, stream: bool, concurrency: int, duration: float, warmup: float
) -> dict[str, list[float]]:
    latencies: list[float] = []
    ttfbs: list[float] = []
    gaps: list[float] = []
    errors = 0
    body = STREAM_BODY if stream else BODY
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration

        async def worker() -> None:
            nonlocal errors
            while (now := time.perf_counter()) < stop_at:
                first = last = None
                local_gaps = []
                try:
                    async with session.post(url, data=body, headers=HEADERS) as response:
                        async for _ in response.content.iter_any():
                            t = time.perf_counter()
                            if first is None:
                                first = t
                            elif last is not None:
                                local_gaps.append(t - last)
                            last = t
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                end = time.perf_counter()
                if now < measure_from:
                    continue  # warm-up
                if not ok:
                    errors += 1
                    continue
                latencies.append((end - now) * 1000)
                if stream and first is not None:
                    ttfbs.append((first - now) * 1000)
                    gaps.extend(g * 1000 for g in local_gaps)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latency": latencies, "ttfb": ttfbs, "gaps": gaps, "errors": [float(errors)]}


async def open_streams(url: str, count: int, proc: Proc) -> dict[str, float]:
    """Hold ``count`` streams open at once (the upstream sends slowly); the proxy's RSS meanwhile."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        responses = []

        async def start() -> None:
            response = await session.post(url, data=STREAM_BODY, headers=HEADERS)
            await response.content.readany()  # the stream is open and flowing
            responses.append(response)

        before = proc.peak_rss_mb()
        await asyncio.gather(*(start() for _ in range(count)))
        rss_now = proc.rss_mb()
        opened = len(responses)
        for response in responses:
            response.close()
    return {"streams": opened, "rss_mb": rss_now, "peak_rss_before_mb": before}


NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location /openai/ {{
      proxy_pass http://fake/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="fake upstream delay before headers")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-interval-ms", type=float, default=5.0)
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--open-streams", type=int, default=1000, help="streams held open at once (0: skip)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="llmtally-load-"))

    upstream_port, llmtally_port, nginx_port = free_port(), free_port(), free_port()
    upstream = Proc(
        [
            sys.executable,
            "-m",
            "llmtally.testing",
            "--port",
            str(upstream_port),
            "--latency-ms",
            str(args.latency_ms),
            "--chunks",
            str(args.chunks),
            "--chunk-interval-ms",
            str(args.chunk_interval_ms),
        ],
    )
    time.sleep(1.5)
    records = work / "records.jsonl"
    llmtally = Proc(
        [sys.executable, "-m", "llmtally", "serve", "--port", str(llmtally_port)],
        env={
            "LLMTALLY_UPSTREAMS_OPENAI": f"http://127.0.0.1:{upstream_port}",
            "LLMTALLY_CONFIG": str(HERE.parent / "config.toml"),
            "LLMTALLY_LOGGING_DESTINATION": str(records),
            "LLMTALLY_PIPELINE_SPILL_DIR": str(work / "spill"),
        },
        ready=b"listening on",
    )
    targets = {
        "direct": (f"http://127.0.0.1:{upstream_port}/v1/chat/completions", None),
        "llmtally": (f"http://127.0.0.1:{llmtally_port}/openai/v1/chat/completions", llmtally),
    }
    nginx = None
    nginx_bin = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx_bin and not args.no_nginx:
        (work / "nginx.conf").write_text(
            NGINX_CONF.format(dir=work, upstream_port=upstream_port, port=nginx_port)
        )
        nginx = Proc([nginx_bin, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
        time.sleep(1)
        targets["nginx"] = (f"http://127.0.0.1:{nginx_port}/openai/v1/chat/completions", nginx)
    results: list[Result] = []
    open_streams_result: dict[str, float] = {}
    try:
        for mode in ("json", "stream"):
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                baseline = None
                for name, (url, proc) in targets.items():
                    cpu0 = proc.cpu_s() if proc else None
                    data = asyncio.run(drive(url, mode == "stream", concurrency, args.duration, args.warmup))
                    lat = data["latency"]
                    result = Result(
                        name,
                        mode,
                        concurrency,
                        requests=len(lat),
                        errors=int(data["errors"][0]),
                        rps=len(lat) / args.duration,
                        p50_ms=pct(lat, 0.5),
                        p95_ms=pct(lat, 0.95),
                        p99_ms=pct(lat, 0.99),
                    )
                    if mode == "stream":
                        result.ttfb_p50_ms = pct(data["ttfb"], 0.5)
                        result.chunk_gap_p50_ms = pct(data["gaps"], 0.5)
                    if proc is not None and cpu0 is not None:
                        result.proxy_cpu_s = proc.cpu_s() - cpu0
                        result.proxy_peak_rss_mb = proc.peak_rss_mb()
                    if name == "direct":
                        baseline = result
                    elif baseline is not None:
                        result.added = {
                            "p50_ms": result.p50_ms - baseline.p50_ms,
                            "p95_ms": result.p95_ms - baseline.p95_ms,
                            "p99_ms": result.p99_ms - baseline.p99_ms,
                            "rps_ratio": result.rps / baseline.rps if baseline.rps else float("nan"),
                        }
                        if (
                            mode == "stream"
                            and baseline.ttfb_p50_ms is not None
                            and result.ttfb_p50_ms is not None
                        ):
                            result.added["ttfb_p50_ms"] = result.ttfb_p50_ms - baseline.ttfb_p50_ms
                            result.added["chunk_gap_p50_ms"] = (result.chunk_gap_p50_ms or 0) - (
                                baseline.chunk_gap_p50_ms or 0
                            )
                    results.append(result)
                    print(_row(result), flush=True)
        if args.open_streams:
            # A second slow upstream: each stream stays open for the whole test.
            slow_port = free_port()
            slow = Proc([sys.executable, "-m", "llmtally.testing", "--port", str(slow_port), "--chunks", "2",
                         "--chunk-interval-ms", "20000"])  # fmt: skip
            time.sleep(1.5)
            slow_proxy = Proc(
                [sys.executable, "-m", "llmtally", "serve", "--port", str(free_port())],
                env={"LLMTALLY_UPSTREAMS_OPENAI": f"http://127.0.0.1:{slow_port}",
                     "LLMTALLY_LOGGING_DESTINATION": str(work / "slow-records.jsonl"),
                     "LLMTALLY_PIPELINE_SPILL_DIR": str(work / "slow-spill")},
                ready=b"listening on",
            )  # fmt: skip
            port = slow_proxy.popen.args[5]  # type: ignore[index]
            try:
                held = asyncio.run(open_streams(f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                                                args.open_streams, slow_proxy))  # fmt: skip
            finally:
                slow_proxy.stop()
                slow.stop()
            print(
                f"\n{held['streams']:.0f} streams open at once: llmtally RSS {held['rss_mb']:.0f} MB",
                flush=True,
            )
            open_streams_result = held
    finally:
        for proc in (nginx, llmtally, upstream):
            if proc is not None:
                proc.stop()
    delivered = sum(1 for _ in records.open()) if records.exists() else 0
    sent = sum(r.requests + r.errors for r in results if r.target == "llmtally")
    print(f"\nllmtally records written: {delivered} (measured llmtally requests: {sent}, plus warm-up)")
    out = HERE / "results" / f"{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args),
                "records_written": delivered,
                "open_streams": open_streams_result,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"results: {out}")


def _row(r: Result) -> str:
    extra = ""
    if r.added:
        a = r.added
        extra = f"  added p50 {a['p50_ms']:+6.2f} p99 {a['p99_ms']:+7.2f} ms  rps x{a['rps_ratio']:.2f}"
        if "ttfb_p50_ms" in r.added:
            extra += f"  ttfb {r.added['ttfb_p50_ms']:+.2f} gap {r.added['chunk_gap_p50_ms']:+.2f} ms"
    cpu = f" cpu {r.proxy_cpu_s:.1f}s rss {r.proxy_peak_rss_mb:.0f}MB" if r.proxy_cpu_s is not None else ""
    return (
        f"{r.mode:6s} c={r.concurrency:<3d} {r.target:9s} {r.rps:8.0f} rps  p50 {r.p50_ms:7.2f} "
        f"p99 {r.p99_ms:7.2f} ms  err {r.errors}{cpu}{extra}"
    )


if __name__ == "__main__":
    main()

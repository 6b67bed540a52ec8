"""Soak: mixed traffic of all three providers for a long time, watching every llmtally process for
growth (issue 26).

Starts ``llmtally serve --fake-upstream`` (the repo's config.toml, a free loopback port, records to a
file) and drives it with the official SDKs (openai, anthropic, google-genai; async clients, streamed
and not, chosen at random per call) from ``--clients`` closed-loop clients held to ``--rate`` calls/s
in all. Every ``--interval`` seconds it samples the RSS and open file descriptors of every process
of the proxy's tree (from /proc) and prints a table row. At the end it stops the proxy with SIGTERM
and counts the records it wrote.

Exit 1 when, between the first sample after ``--warmup`` and the last one, any process's RSS grew
by more than ``--max-rss-growth-mb`` MiB (default 16) or its open fds by more than
``--max-fd-growth`` (default 8); when a call failed; when the proxy did not exit 0; or when the
records written are not one per call. Exit 0 otherwise.

    .venv/bin/python load_tests/soak.py [--duration 600] [--interval 30] [--warmup 60] [--rate 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from anthropic import AsyncAnthropic
from google import genai
from google.genai import types
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):  # it exited meanwhile
                todo += [int(child) for child in (task / "children").read_text().split()]
    return found


@dataclass(frozen=True)
class ProcSample:
    pid: int
    name: str
    rss_bytes: int
    fds: int


def sample(pid: int) -> ProcSample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None  # it exited between the listing and the read
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    name = Path(cmdline[0].decode(errors="replace")).name
    if len(cmdline) > 2 and cmdline[1].endswith(b"llmtally"):
        name = "llmtally " + cmdline[2].decode(errors="replace")
    elif len(cmdline) > 2 and cmdline[1] == b"-c" and cmdline[2].startswith(b"from "):
        name = cmdline[2].split()[1].decode(errors="replace")  # a child: "from llmtally.proxy.worker import"
    return ProcSample(pid, name, rss, fds)


@dataclass
class Traffic:
    calls: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)

    def failed(self, kind: str, exc: BaseException) -> None:
        key = f"{kind}: {type(exc).__name__}"
        self.failures[key] = self.failures.get(key, 0) + 1


Call = Callable[[], Awaitable[None]]


def calls_for(base: str) -> dict[str, Call]:
    """One call of each kind, through each official SDK (fake key: the fake upstream needs none)."""
    openai = AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="sk-soak-no-key", max_retries=0)
    claude = AsyncAnthropic(base_url=f"{base}/anthropic", api_key="sk-ant-soak-no-key", max_retries=0)
    gemini = genai.Client(api_key="soak-no-key", http_options=types.HttpOptions(base_url=f"{base}/gemini"))
    hello = [{"role": "user", "content": "Hello, how long is a piece of string?"}]

    async def openai_json() -> None:
        await openai.chat.completions.create(model="gpt-4o", messages=hello)  # type: ignore[arg-type]

    async def openai_stream() -> None:
        stream = await openai.chat.completions.create(model="gpt-4o", messages=hello, stream=True)  # type: ignore[arg-type]
        async for _ in stream:
            pass

    async def openai_responses() -> None:
        await openai.responses.create(model="gpt-4o", input="Hello")

    async def anthropic_json() -> None:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=hello)  # type: ignore[arg-type]

    async def anthropic_stream() -> None:
        async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=hello) as stream:  # type: ignore[arg-type]
            async for _ in stream:
                pass

    async def gemini_json() -> None:
        await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents="Hello")

    async def gemini_stream() -> None:
        async for _ in await gemini.aio.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Hello"
        ):
            pass

    return {
        "openai": openai_json, "openai-stream": openai_stream, "openai-responses": openai_responses,
        "anthropic": anthropic_json, "anthropic-stream": anthropic_stream,
        "gemini": gemini_json, "gemini-stream": gemini_stream,
    }  # fmt: skip


async def client(calls: dict[str, Call], traffic: Traffic, interval_s: float, until: float) -> None:
    kinds = list(calls)
    rng = random.Random()
    next_at = time.monotonic()
    while time.monotonic() < until:
        kind = rng.choice(kinds)
        try:
            await calls[kind]()
            traffic.by_kind[kind] = traffic.by_kind.get(kind, 0) + 1
        except Exception as exc:  # counted and reported: a soak call must not fail
            traffic.failed(kind, exc)
        traffic.calls += 1
        next_at += interval_s
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def print_row(elapsed: float, traffic: Traffic, procs: list[ProcSample], header: bool) -> None:
    if header:
        cols = "".join(f"{p.name[:22] + ' ' + str(p.pid):>34}" for p in procs)
        print(f"{'t (s)':>6} {'calls':>7} {'fail':>5}{cols}", flush=True)
        print(f"{'':>20}" + "".join(f"{'RSS MiB   fds':>34}" for _ in procs), flush=True)
    cells = "".join(f"{p.rss_bytes / MIB:>27.1f} {p.fds:>6}" for p in procs)
    print(f"{elapsed:>6.0f} {traffic.calls:>7} {sum(traffic.failures.values()):>5}{cells}", flush=True)


async def soak(
    args: argparse.Namespace, base: str, pid: int
) -> tuple[Traffic, list[list[ProcSample]], list[float]]:
    calls = calls_for(base)
    traffic = Traffic()
    start = time.monotonic()
    until = start + args.duration
    per_client_s = args.clients / args.rate
    clients = [asyncio.create_task(client(calls, traffic, per_client_s, until)) for _ in range(args.clients)]
    samples: list[list[ProcSample]] = []
    times: list[float] = []
    next_sample = start
    while True:
        procs = [s for s in (sample(p) for p in tree(pid)) if s is not None]
        samples.append(procs)
        times.append(time.monotonic() - start)
        print_row(times[-1], traffic, procs, header=len(samples) == 1)
        if time.monotonic() >= until:
            break
        next_sample += args.interval
        await asyncio.sleep(max(0.0, min(next_sample, until) - time.monotonic()))
    await asyncio.gather(*clients)
    return traffic, samples, times


def growth(samples: list[list[ProcSample]], times: list[float], warmup: float) -> list[tuple[str, int, int]]:
    """(process, RSS growth in bytes, fd growth) from the first sample after ``warmup`` to the last."""
    after = [i for i, t in enumerate(times) if t >= warmup]
    if len(after) < 2:
        raise SystemExit("soak: too short to judge growth (need two samples after the warm-up)")
    first = {p.pid: p for p in samples[after[0]]}
    last = {p.pid: p for p in samples[-1]}
    return [
        (f"{p.name} {pid}", p.rss_bytes - first[pid].rss_bytes, p.fds - first[pid].fds)
        for pid, p in last.items()
        if pid in first
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--warmup", type=float, default=60.0, help="growth is judged after this (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop SDK clients (default 8)")
    parser.add_argument("--rate", type=float, default=40.0, help="calls per second in all (default 40)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=16.0, help="per process (default 16)")
    parser.add_argument("--max-fd-growth", type=int, default=8, help="per process (default 8)")
    args = parser.parse_args()

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="llmtally-soak-"))
    records_path, log_path = work / "records.jsonl", work / "stderr.log"
    with records_path.open("wb") as records_out, log_path.open("wb") as log_out:
        proxy = subprocess.Popen(
            [str(Path(sys.executable).parent / "llmtally"), "serve", "--config", str(REPO / "config.toml"),
             "--fake-upstream", "--host", "127.0.0.1", "--port", str(port)],
            stdout=records_out, stderr=log_out, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proxy.poll() is not None or time.monotonic() > deadline:
                        print(f"soak: the proxy did not start; see {log_path}", file=sys.stderr)
                        return 1
                    time.sleep(0.3)
            print(
                f"soak: {args.duration:.0f} s, {args.clients} clients, {args.rate:g} calls/s, "
                f"a sample every {args.interval:g} s, growth judged after {args.warmup:g} s; work dir {work}",
                flush=True,
            )
            traffic, samples, times = asyncio.run(soak(args, f"http://127.0.0.1:{port}", proxy.pid))
            time.sleep(1.0)  # the last records leave the record pipeline
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                exit_code = proxy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proxy.kill()
                exit_code = proxy.wait()

    records = [orjson.loads(line) for line in records_path.read_bytes().splitlines() if line.strip()]
    succeeded = traffic.calls - sum(traffic.failures.values())
    print(f"\ncalls: {traffic.calls} ({', '.join(f'{k} {v}' for k, v in sorted(traffic.by_kind.items()))})")
    print(f"failed calls: {sum(traffic.failures.values())} {traffic.failures or ''}")
    print(f"records written: {len(records)} (one per call: {len(records) == traffic.calls})")
    print(f"proxy exit after SIGTERM: {exit_code}")
    problems = []
    judged_from = next(t for t in times if t >= args.warmup)
    print(f"growth from {judged_from:.0f} s to {times[-1]:.0f} s:")
    for name, rss, fds in growth(samples, times, args.warmup):
        print(f"  {name}: RSS {rss / MIB:+.1f} MiB, fds {fds:+d}")
        if rss > args.max_rss_growth_mb * MIB:
            problems.append(f"{name} RSS grew {rss / MIB:.1f} MiB (> {args.max_rss_growth_mb:g})")
        if fds > args.max_fd_growth:
            problems.append(f"{name} open fds grew by {fds} (> {args.max_fd_growth})")
    if traffic.failures:
        problems.append(f"{sum(traffic.failures.values())} calls failed")
    if len(records) != traffic.calls:
        problems.append(f"{len(records)} records for {traffic.calls} calls ({succeeded} succeeded)")
    if exit_code != 0:
        problems.append(f"the proxy exited {exit_code} after SIGTERM")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("OK: no growth past the thresholds, no failed call, one record per call")
        for path in (records_path, log_path):
            path.unlink()
        work.rmdir()
    else:
        print(f"kept {work} (records and the proxy's stderr)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

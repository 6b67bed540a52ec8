"""``llmtally serve --workers N`` as real processes: one record stream, shared metrics, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from llmtally.testing import FakeUpstream
from tests.conftest import API_KEY
from tests.proxy.test_server import serving, start_serve, stop_serve

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _workers(pid: int) -> list[int]:
    return [c for c in _children(pid) if b"llmtally.proxy.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


async def _calls(url: str, count: int, connections: int) -> None:
    # Separate sessions: separate connections, which SO_REUSEPORT spreads over the workers.
    async def one_connection(n: int) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.post(
                    url + "/openai/v1/chat/completions", data=CHAT, headers=HEADERS
                ) as response:
                    assert response.status == 200
                    await response.read()

    await asyncio.gather(*(one_connection(count // connections) for _ in range(connections)))


async def _until_listening(url: str) -> None:
    """A restarted worker takes a moment to listen (longer on a loaded machine)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the restarted worker never listened")


def _calls_counted(metrics: str) -> float:
    for family in text_string_to_metric_families(metrics):
        if family.name == "llmtally_requests":
            return sum(s.value for s in family.samples if s.name == "llmtally_requests_total")
    raise AssertionError("no llmtally_requests_total")


async def test_two_workers_feed_one_record_stream_and_one_set_of_metrics(
    tmp_path: Path, upstream: FakeUpstream, unused_tcp_port: int
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{upstream.url}"\n[server]\nadmin_port = {unused_tcp_port}\n')
    async with serving(config, {}, "--workers", "2") as (process, url):
        assert len(_workers(process.pid)) == 2
        await _calls(url, 240, 24)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{unused_tcp_port}/readyz") as response:
                assert response.status == 200
            await asyncio.sleep(0.5)  # records are built after the responses
            # /metrics answers the same on the admin port and, through a worker, on the proxy port.
            async with session.get(f"http://127.0.0.1:{unused_tcp_port}/metrics") as response:
                admin_metrics = await response.text()
            async with session.get(url + "/metrics") as response:
                assert response.status == 200
                proxy_metrics = await response.text()
        assert _calls_counted(admin_metrics) == _calls_counted(proxy_metrics) == 240
        stdout, _ = await stop_serve(process)
    records = [orjson.loads(line) for line in stdout.splitlines()]  # every line whole JSON
    assert len(records) == 240
    assert len({r["request_id"] for r in records}) == 240
    assert all(r["usage_source"] == "provider" and r["total_cost"] > 0 for r in records)


async def test_a_dead_worker_is_replaced_and_service_goes_on(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{upstream.url}"\n')
    async with serving(config, {}, "--workers", "1") as (process, url):
        await _calls(url, 5, 1)
        async with aiohttp.ClientSession() as session:
            while True:  # the records are on their way to the main process before the crash
                async with session.get(url + "/metrics") as response:
                    if _calls_counted(await response.text()) == 5:
                        break
        (old,) = _workers(process.pid)
        os.kill(old, signal.SIGKILL)
        for _ in range(100):  # restarted after a second
            await asyncio.sleep(0.1)
            now = _workers(process.pid)
            if now and now != [old]:
                break
        await _until_listening(url)
        await _calls(url, 5, 1)
        stdout, stderr = await stop_serve(process)
    assert b"exited with -9; restarting it" in stderr, stderr.decode()
    assert len(stdout.splitlines()) == 10  # the records of calls before the crash were not lost


async def test_workers_stop_when_the_main_process_dies(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{upstream.url}"\n')
    process, _ = await start_serve(config, {}, "--workers", "2")
    workers = _workers(process.pid)
    assert len(workers) == 2
    process.kill()
    await process.wait()
    for _ in range(100):  # no orphan keeps the port and swallows calls that nobody meters
        if not any(Path(f"/proc/{pid}").exists() and _running(pid) for pid in workers):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"orphaned workers still running: {workers}")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_a_single_process_serves_too(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{upstream.url}"\n[server]\nworkers = 0\n')
    async with serving(config, {}) as (process, url):
        assert _workers(process.pid) == []
        await _calls(url, 3, 1)
        stdout, _ = await stop_serve(process)
    assert len(stdout.splitlines()) == 3


async def test_streams_cut_off_at_shutdown_are_all_recorded(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Workers cancel what is still running when the grace ends; every such call's record must still
    # reach the main process before it stops.
    upstream.config.chunk_interval_s = 60
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{upstream.url}"\n[server]\nshutdown_grace_s = 0.5\n')
    stream = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    async with serving(config, {}, "--workers", "2") as (process, url):
        sessions = [aiohttp.ClientSession() for _ in range(20)]
        try:
            for session in sessions:
                response = await session.post(
                    url + "/openai/v1/chat/completions", data=stream, headers=HEADERS
                )
                assert (await response.content.readany()).startswith(b"data: ")
            stdout, stderr = await stop_serve(process)
        finally:
            for session in sessions:
                await session.close()
    records = [orjson.loads(line) for line in stdout.splitlines()]
    assert len(records) == 20, stderr.decode()
    assert all(r["error"].startswith("cut off at shutdown") for r in records)
    assert b"lost" not in stderr


# SIGKILL mid-load, then a restart: every call the client saw end has exactly one record per sink.


@dataclass
class _Meter:
    """One ``llmtally serve`` run in its own process group, its output in files."""

    process: asyncio.subprocess.Process
    url: str


def _crash_config(tmp_path: Path, upstream: FakeUpstream) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstreams]\nopenai = "{upstream.url}"\n'
        f'[logging]\ndestination = "{tmp_path / "records.jsonl"}"\n'
        f'[sinks.file]\npath = "{tmp_path / "file.jsonl"}"\n'
        f'[pipeline]\nspill_dir = "{tmp_path / "spill"}"\njournal_dir = "{tmp_path / "journal"}"\n'
    )
    return config


async def _start_meter(config: Path, run: int) -> _Meter:
    log = config.parent / f"stderr-{run}.log"
    stderr = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", "0",
            "--workers", "2",
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(stderr)  # the child has its own copy
    for _ in range(300):
        match = re.search(rb"listening on (http://\S+)", log.read_bytes())
        if match:
            return _Meter(process, match.group(1).decode())
        assert process.returncode is None, log.read_text()
        await asyncio.sleep(0.1)
    raise AssertionError(log.read_text())


async def _load_until_killed(url: str, kill_after: int, kill: Callable[[], None]) -> set[str]:
    """16 clients calling in a loop; ``kill`` once ``kill_after`` calls ended; the calls whose
    response the client read whole (each tagged with its own id)."""
    ended: set[str] = set()
    killed = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while not killed.is_set():
                call = uuid.uuid4().hex
                headers = {**HEADERS, "x-llmtally-tag-call": call}
                try:
                    async with session.post(
                        url + "/openai/v1/chat/completions", data=CHAT, headers=headers
                    ) as response:
                        body = await response.read()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.01)
                    continue
                if response.status == 200 and body.endswith(b"}"):
                    ended.add(call)
                if len(ended) >= kill_after and not killed.is_set():
                    killed.set()
                    kill()

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(16))), 60)
    return ended


def _calls_recorded(path: Path, *, strict: bool = True) -> list[str]:
    """The calls a sink file holds; ``strict=False`` while a sink may be writing its last line."""
    lines = path.read_bytes().splitlines() if path.exists() else []
    calls = []
    for line in lines:
        try:
            calls.append(orjson.loads(line)["tags"]["call"])
        except orjson.JSONDecodeError:
            if strict:
                raise
    return calls


async def _restart_and_check(tmp_path: Path, config: Path, ended: set[str]) -> None:
    assert list((tmp_path / "journal").glob("*.jnl")), "nothing was journaled"
    meter = await _start_meter(config, 2)
    sinks = [tmp_path / "records.jsonl", tmp_path / "file.jsonl"]
    try:
        for _ in range(300):  # a killed run's workers may still be draining: adopted when they exit
            if all(ended <= set(_calls_recorded(sink, strict=False)) for sink in sinks):
                break
            await asyncio.sleep(0.1)
        meter.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(meter.process.wait(), 30) == 0
    finally:
        if meter.process.returncode is None:
            meter.process.kill()
            await meter.process.wait()
    stderr = (tmp_path / "stderr-2.log").read_text()
    for sink in sinks:
        calls = _calls_recorded(sink)
        duplicated = {c for c in calls if calls.count(c) > 1}
        assert not duplicated, (sink, duplicated, stderr)
        assert not ended - set(calls), (sink, len(ended - set(calls)), stderr)
    print(f"{len(ended)} calls ended before the kill; {stderr.count('recovered')} recovery passes")
    assert not list((tmp_path / "journal").glob("*.jnl")), "the journal kept delivered segments"


async def test_sigkill_of_the_record_process_mid_load_loses_no_ended_call(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = _crash_config(tmp_path, upstream)
    first = await _start_meter(config, 1)
    workers = _workers(first.process.pid)
    try:
        ended = await _load_until_killed(first.url, 300, first.process.kill)
        await first.process.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.process.pid, signal.SIGKILL)
    assert len(workers) == 2
    await _restart_and_check(tmp_path, config, ended)


async def test_sigkill_of_the_whole_process_group_mid_load_loses_no_ended_call(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = _crash_config(tmp_path, upstream)
    first = await _start_meter(config, 1)
    try:
        ended = await _load_until_killed(first.url, 300, lambda: os.killpg(first.process.pid, signal.SIGKILL))
        await first.process.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.process.pid, signal.SIGKILL)
    before = len(_calls_recorded(tmp_path / "file.jsonl"))
    print(f"records in the file sink at the kill: {before} of {len(ended)}")
    await _restart_and_check(tmp_path, config, ended)

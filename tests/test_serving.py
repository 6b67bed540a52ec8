"""``llmtally serve`` as real processes: one meter per port, and the built-in fake upstream."""

from __future__ import annotations

import ast
import asyncio
import socket
import sys
import time
from pathlib import Path

import openai
import orjson

from tests.proxy.test_server import serving, stop_serve

SRC = Path(__file__).resolve().parents[1] / "src" / "llmtally"


async def _serve_on(port: int, config: Path, *args: str) -> tuple[int, str, float]:
    """``llmtally serve --port port``, which is expected to exit by itself: (status, stderr, seconds)."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", str(port), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode(), time.monotonic() - started


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_second_llmtally_on_a_served_port_exits_2_naming_the_port(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    for workers in ("1", "0"):  # the supervised form and the single process, both as first and second
        async with serving(config, {}, "--workers", workers) as (first, url):
            port = _port_of(url)
            for second in ("1", "0", "2"):
                status, stderr, _ = await _serve_on(port, config, "--workers", second)
                assert status == 2, stderr
                assert f"port {port} on 127.0.0.1 is already served by another process" in stderr
                assert "Traceback" not in stderr and stderr.count("\n") == 1
            await stop_serve(first)


async def test_a_port_held_by_any_other_process_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        status, stderr, _ = await _serve_on(port, config)
    assert status == 2
    assert f"port {port} on 127.0.0.1 is already served by another process" in stderr
    assert "Traceback" not in stderr


async def test_a_busy_admin_port_is_refused_too(tmp_path: Path, unused_tcp_port: int) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nadmin_host = "127.0.0.1"\nadmin_port = {unused_tcp_port}\n')
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", unused_tcp_port))
        holder.listen()
        status, stderr, _ = await _serve_on(0, config)
    assert status == 2
    assert f"admin port {unused_tcp_port} on 127.0.0.1 is already served by another process" in stderr


async def test_the_port_is_free_again_once_llmtally_stopped(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    async with serving(config, {}) as (first, url):
        await stop_serve(first)
    port = _port_of(url)
    async with serving(config, {}, "--port", str(port)) as (again, url_again):
        assert _port_of(url_again) == port
        await stop_serve(again)


async def test_fake_upstream_answers_an_sdk_and_every_record_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", "0", "--fake-upstream",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    banner = b""
    try:
        while b"listening on" not in banner:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, banner.decode()
            banner += line
        url = banner.split(b"listening on ")[1].split()[0].decode()
        client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="not-needed")
        reply = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello"}]
        )
        assert reply.choices[0].message.content
        await client.close()
        stdout, _ = await stop_serve(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b"llmtally: FAKE UPSTREAM at http://127.0.0.1:" in banner
    (record,) = [orjson.loads(line) for line in stdout.splitlines()]
    assert (record["fake_upstream"], record["status"], record["usage_source"]) == (True, 200, "provider")


async def test_records_of_real_upstreams_say_they_are_not_fake(tmp_path: Path) -> None:
    from llmtally.testing import FakeUpstream

    upstream = FakeUpstream()  # a separate upstream, as a provider would be: not the built-in one
    url = await upstream.start()
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{url}"\n')
    try:
        async with serving(config, {}) as (process, proxy):
            client = openai.AsyncOpenAI(base_url=f"{proxy}/openai/v1", api_key="k")
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            await client.close()
            stdout, stderr = await stop_serve(process)
    finally:
        await upstream.stop()
    assert b"FAKE UPSTREAM" not in stderr
    assert orjson.loads(stdout.splitlines()[0])["fake_upstream"] is False


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_proxy_package_never_imports_the_process_manager() -> None:
    # Imports run one way: serving → supervisor → proxy. Function-level imports count too.
    for path in sorted((SRC / "proxy").glob("*.py")):
        upward = {m for m in _imports(path) if m in ("llmtally.supervisor", "llmtally.serving")}
        assert not upward, f"{path.name} imports {upward}"
    assert "llmtally.serving" not in _imports(SRC / "supervisor.py")

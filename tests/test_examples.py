"""Every example in examples/ runs against the fake upstream, through the real proxy where it uses one."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


async def run_example(name: str, **env: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / name),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OPENAI_API_KEY": API_KEY, "ANTHROPIC_API_KEY": API_KEY, "GEMINI_API_KEY": API_KEY, **env},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_openai_proxy_example(proxy: RunningProxy) -> None:
    out = await run_example("openai_proxy.py", LLMTALLY_URL=proxy.url)
    assert (
        "chat: Hello from the" in out
        and "stream: Hello from the" in out
        and "responses: Hello from the" in out
    )
    records = await proxy.flush()
    assert [(r["endpoint"], r["stream"]) for r in records] == [
        ("chat.completions", False), ("chat.completions", True), ("responses", False)]  # fmt: skip
    assert records[0]["tags"] == {"feature": "greeting"}
    assert all(r["usage_source"] == "provider" and r["total_cost"] > 0 for r in records)


async def test_anthropic_proxy_example(proxy: RunningProxy) -> None:
    out = await run_example("anthropic_proxy.py", LLMTALLY_URL=proxy.url)
    assert "message: Hello from the" in out and "stream: Hello from the" in out
    records = await proxy.flush()
    assert [r["stream"] for r in records] == [False, True]
    assert all(r["provider"] == "anthropic" and r["input_tokens"] == 12050 for r in records)


async def test_gemini_proxy_example(proxy: RunningProxy) -> None:
    out = await run_example("gemini_proxy.py", LLMTALLY_URL=proxy.url)
    assert "generate: Hello from the" in out and "embed: dimensions 4" in out
    records = await proxy.flush()
    assert [r["endpoint"] for r in records] == [
        "generateContent",
        "streamGenerateContent",
        "batchEmbedContents",
    ]
    assert all(r["tags"] == {"feature": "greeting"} for r in records)


async def test_library_examples(upstream: FakeUpstream) -> None:
    out = await run_example("openai_library.py", OPENAI_BASE_URL=f"{upstream.url}/v1")
    assert "before sending: 22 input tokens (exact=True, o200k_base)" in out
    assert "after: 1200 in / 300 out (provider), cost $0.000" in out
    out = await run_example("anthropic_library.py", ANTHROPIC_BASE_URL=upstream.url)
    assert "exact=False" in out and "after: 12050 in / 400 out (provider)" in out
    out = await run_example("gemini_library.py", GEMINI_BASE_URL=upstream.url)
    assert "(exact=True, gemma3)" in out and "after: 3000 in / 750 out (provider)" in out


async def test_tenant_service_example(proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("tenant_service", EXAMPLES / "tenant_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    runner = web.AppRunner(module.create_app(proxy.url), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    service = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            for tenant in ("acme", "acme", "globex"):
                async with session.post(
                    f"{service}/ask", data="What is 2+2?", headers={"X-Tenant": tenant}
                ) as r:
                    assert (await r.json())["tenant"] == tenant
    finally:
        await runner.cleanup()
    records = await proxy.flush()
    assert [r["tags"]["tenant"] for r in records] == ["acme", "acme", "globex"]
    from llmtally.pipeline.report import build_report

    totals, groups = build_report(records, ["tag:tenant"])
    assert {k[0]: g.records for k, g in groups.items()} == {"acme": 2, "globex": 1}
    assert totals.total_cost == sum(r["total_cost"] for r in records)


def documented_commands(name: str) -> list[str]:
    """The shell lines an example's docstring tells the reader to run (its 4-space indented block)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text())) or ""
    return [line[4:] for line in doc.splitlines() if line.startswith("    ") and line.strip()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_script(lines: list[str], proxy_port: int, service_port: int) -> str:
    """The lines as one bash script, changed only as a test must: the built-in fake upstream answers
    (``--fake-upstream``, as the docstring offers), free ports instead of 8787/8080, and after each
    command sent to the background a wait until its port answers (a reader waits with their eyes)."""
    wait = (
        'until "$PY" -c "import socket; socket.create_connection((\'127.0.0.1\', {}), 0.2)" 2>/dev/null;'
        " do kill -0 $! || exit 1; sleep 0.1; done"
    )
    script = ["set -em", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for line in lines:
        line = line.replace(":8080", f":{service_port}")
        if line.startswith(".venv/bin/llmtally serve"):
            line = line.replace(".venv/bin/llmtally serve", ".venv/bin/llmtally serve --fake-upstream", 1)
        script.append(line)
        if line.split("#")[0].rstrip().endswith("&"):
            script.append(wait.format(proxy_port if "llmtally serve" in line else service_port))
    return "\n".join(script) + "\n"


PROXY_EXAMPLES = ["openai_proxy.py", "anthropic_proxy.py", "gemini_proxy.py", "tenant_service.py"]
LIBRARY_EXAMPLES = {
    "openai_library.py": "OPENAI_BASE_URL",
    "anthropic_library.py": "ANTHROPIC_BASE_URL",
    "gemini_library.py": "GEMINI_BASE_URL",
}


def test_every_example_documents_how_to_run_it() -> None:
    assert sorted(PROXY_EXAMPLES + list(LIBRARY_EXAMPLES)) == sorted(p.name for p in EXAMPLES.glob("*.py"))
    for name in PROXY_EXAMPLES + list(LIBRARY_EXAMPLES):
        assert any(f"examples/{name}" in line for line in documented_commands(name)), name


def _run_script(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (cwd / ".venv").symlink_to(Path(sys.prefix))  # the commands say .venv/bin/..., as after `make test`
    (cwd / "examples").symlink_to(EXAMPLES)
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "PY": sys.executable, **env},
    )  # fmt: skip


@pytest.mark.parametrize("name", PROXY_EXAMPLES)
def test_a_proxy_examples_instructions_run_as_written(name: str, tmp_path: Path) -> None:
    proxy_port, service_port = _free_port(), _free_port()
    script = _as_script(documented_commands(name), proxy_port, service_port)
    result = _run_script(
        script, tmp_path, LLMTALLY_SERVER_PORT=str(proxy_port), LLMTALLY_URL=f"http://127.0.0.1:{proxy_port}",
        PORT=str(service_port),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    records = [orjson.loads(line) for line in (tmp_path / "records.jsonl").read_bytes().splitlines()]
    assert records and all(r["fake_upstream"] and r["usage_source"] == "provider" for r in records)
    assert re.search(rf"^TOTAL\s+{len(records)}\s", result.stdout, re.MULTILINE), result.stdout
    if name == "tenant_service.py":
        assert re.search(r"^acme\s+1\s", result.stdout, re.MULTILINE)
        assert re.search(r"^globex\s+1\s", result.stdout, re.MULTILINE)


@pytest.mark.parametrize(("name", "base_url_variable"), LIBRARY_EXAMPLES.items())
def test_a_library_examples_instructions_run_as_written(
    name: str, base_url_variable: str, tmp_path: Path
) -> None:
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text())) or ""
    # "start it with `<fake upstream command>` and add `<VARIABLE=url>` to the command"
    start, assignment = re.findall(r"`([^`]+)`", " ".join(doc.split()))[-2:]
    assert start.startswith(".venv/bin/python -m llmtally.testing") and assignment.startswith(
        base_url_variable
    )
    port = _free_port()
    start, assignment = start.replace("9999", str(port)), assignment.replace("9999", str(port))
    (command,) = documented_commands(name)
    script = _as_script([f"{start} &", f"{assignment} {command}"], port, port)
    result = _run_script(script, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "after:" in result.stdout and "(provider)" in result.stdout

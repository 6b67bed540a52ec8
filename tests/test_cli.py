"""The command line, run as a user would."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "llmtally", *args], input=stdin, capture_output=True, timeout=120, check=False
    )


def test_demo_prints_a_record_per_sdk_call() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr.decode()
    records = [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith(b"{")]
    assert len(records) == 6
    assert {r["provider"] for r in records} == {"openai", "anthropic", "gemini"}
    assert all(r["usage_source"] == "provider" and r["total_cost"] > 0 for r in records)
    assert {r["stream"] for r in records} == {True, False}


def test_price() -> None:
    result = run("price", "--model", "gpt-4o", "--input", "1200", "--cache-read", "1024", "--output", "300")
    assert result.returncode == 0, result.stderr
    out = orjson.loads(result.stdout)
    assert (out["input_cost"], out["output_cost"], out["total_cost"]) == (0.00172, 0.003, 0.00472)
    assert (out["currency"], out["price_source"]) == ("USD", "genai-prices")
    assert len(out["price_version"]) == 12


def test_price_unknown_model_exits_1() -> None:
    result = run("price", "--model", "nope", "--provider", "openai", "--input", "1")
    assert result.returncode == 1
    assert orjson.loads(result.stdout)["price_source"] == "unknown_model"


def test_count_stdin() -> None:
    result = run("count", "--model", "gpt-4o", "-", stdin=b"hello world")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == {
        "model": "gpt-4o", "provider": "openai", "input_tokens": 2, "exact": True, "tokenizer": "o200k_base",
    }  # fmt: skip


def test_count_request_bodies(tmp_path: object) -> None:
    anthropic_body = (
        b'{"model":"claude-sonnet-5","max_tokens":10,"messages":[{"role":"user","content":"Hello"}]}'
    )
    out = orjson.loads(run("count", "--request", "-", stdin=anthropic_body).stdout)
    assert (out["provider"], out["exact"]) == ("anthropic", False)
    gemini_body = b'{"contents":[{"role":"user","parts":[{"text":"Hello world, how are you?"}]}]}'
    out = orjson.loads(
        run("count", "--request", "-", "--model", "gemini-2.5-flash", stdin=gemini_body).stdout
    )
    assert (out["input_tokens"], out["exact"], out["tokenizer"]) == (7, True, "gemma3")
    openai_body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}]}'
    out = orjson.loads(run("count", "--request", "-", stdin=openai_body).stdout)
    assert (out["input_tokens"], out["exact"]) == (9, True)
    responses_body = b'{"model":"gpt-4o","input":"Say hello"}'
    out = orjson.loads(run("count", "--request", "-", stdin=responses_body).stdout)
    assert out["exact"] is False and out["input_tokens"] > 0


def test_count_strict_unknown_model_exits_2() -> None:
    result = run("count", "--model", "mystery-1", "--strict", "-", stdin=b"hi")
    assert result.returncode == 2
    assert b"cannot tell the provider" in result.stderr


DOCS_CLI = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
#: The files docs/cli.md's error examples name (its "Errors" section says what each holds).
ERROR_FIXTURES = {
    "array.json": b"[1, 2]\n",
    "latin1.txt": "café crème\n".encode("latin-1"),
    "serve.log": b"2026-12-07 02:52:25,905 INFO llmtally.server: llmtally listening on http://127.0.0.1:8787\n"
    b"2026-12-07 02:52:31,699 INFO llmtally.server: shutting down\n",
}


def documented_errors() -> list[tuple[str, int, str]]:
    """(command, exit status, stderr) for each row of the Errors table in docs/cli.md."""
    section = DOCS_CLI.read_text().split("\n## Errors\n", 1)[1]
    rows = []
    for line in section.splitlines():
        match = re.fullmatch(r"\| `llmtally ([^`]*)`[^|]*\| (\d) \| `(.*)` \|", line)
        if match:
            rows.append((match.group(1), int(match.group(2)), match.group(3)))
    return rows


def test_the_errors_table_covers_every_command() -> None:
    commands = {command.split()[0] for command, _, _ in documented_errors()}
    assert {"count", "price", "report", "health", "serve"} <= commands


@pytest.mark.parametrize(("command", "status", "message"), documented_errors())
def test_each_documented_error_is_one_line_and_its_exit_status(
    command: str, status: int, message: str, tmp_path: Path
) -> None:
    for name, data in ERROR_FIXTURES.items():
        (tmp_path / name).write_bytes(data)
    with socket.socket() as holder:  # "while another process serves 8787": a free port, held
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        command, message = command.replace("8787", port), message.replace("8787", port)
        result = subprocess.run(
            [sys.executable, "-m", "llmtally", *shlex.split(command)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == status, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr

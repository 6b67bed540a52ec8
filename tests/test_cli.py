"""The command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import orjson


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

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

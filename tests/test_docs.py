"""The docs stay true: every configuration key and record field is documented."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import typing
from pathlib import Path

import openai
import orjson

from llmtally.config import Config
from llmtally.pipeline import render_records
from llmtally.record import TokenUsage, UsageRecord
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY
from tests.proxy.test_server import serving, stop_serve

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            out.extend(_keys(hints[field.name], f"{prefix}{field.name}."))
        else:
            out.append(f"{prefix}{field.name}")
    return out


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for key in _keys(Config):
        section, _, name = key.rpartition(".")
        assert f"[{section}]" in text, section
        assert f"`{name}`" in text or f"[{section}] {name}`" in text, key


def test_every_record_field_is_documented() -> None:
    text = (DOCS / "records.md").read_text()
    record = UsageRecord(
        timestamp="t", request_id="r", provider="openai", endpoint="e", request_model=None, model=None,
        stream=False, status=None, usage=TokenUsage(), usage_source="none", cost=None, price_source="p",
        latency_ms=0.0, ttfb_ms=None,
    )  # fmt: skip
    for field in record.to_dict():
        assert f"| `{field}` |" in text, field


def _fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


async def _real_records(proxy: RunningProxy) -> list[dict[str, object]]:
    """The JSON lines the proxy writes for an SDK call, parsed back."""
    client = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1")
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    return [orjson.loads(line) for line in render_records(await proxy.flush()).splitlines()]


async def test_the_readme_record_example_has_exactly_a_real_records_fields(proxy: RunningProxy) -> None:
    (real,) = await _real_records(proxy)
    (example,) = _fenced(_section(README.read_text(), "A record"), "json")
    shown = orjson.loads(" ".join(example.split("\n")))
    assert list(shown) == list(real)  # every field, in the record's order: add one, show it here
    for name, value in shown.items():  # and each with its type (null where the real one may be null)
        assert value is None or real[name] is None or type(value) is type(real[name]), name


async def test_the_records_doc_examples_have_exactly_a_real_records_fields(proxy: RunningProxy) -> None:
    (real,) = await _real_records(proxy)
    (block,) = _fenced(_section((DOCS / "records.md").read_text(), "Example lines"), "json")
    examples = [orjson.loads(line) for line in block.splitlines()]
    assert len(examples) == 3
    assert all(list(example) == list(real) for example in examples)


def _subcommands() -> set[str]:
    from llmtally.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_readme_and_docs_cli_list_every_subcommand() -> None:
    (synopsis,) = _fenced(_section(README.read_text(), "Command line"), "")
    assert {line.split()[1] for line in synopsis.splitlines()} == _subcommands()
    cli = (DOCS / "cli.md").read_text()
    assert {m for m in re.findall(r"^## `llmtally (\w+)`", cli, re.MULTILINE)} == _subcommands()


#: Measured figures: a size or a duration (or an approximate number of seconds).
FIGURE = re.compile(r"\d[\d.,]*\s?(MiB|MB|GiB|GB|ms|µs)\b|~\d[\d.,]*\s?s\b")


def test_measured_figures_live_only_in_the_performance_doc() -> None:
    # Manifests, config comments and the other setup docs point to docs/performance.md#sizing.
    found = []
    for path in [REPO / "config.toml", *sorted((REPO / "deploy").rglob("*.*"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.partition("#")[2] if path.suffix in (".toml", ".yaml", ".yml", "") else line
            if path.name != "Dockerfile" and FIGURE.search(comment):
                found.append(f"{path.relative_to(REPO)}:{number}")
    for path in [README, DOCS / "deploy.md", DOCS / "configuration.md", DOCS / "counting.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            approximate = [m for m in FIGURE.finditer(line) if "~" in m.group() or "MiB" in m.group()]
            if (path in (README, DOCS / "deploy.md") and FIGURE.search(line)) or approximate:
                found.append(f"{path.relative_to(REPO)}:{number}")
    assert found == []
    assert "\n## Sizing\n" in (DOCS / "performance.md").read_text()


async def test_the_readmes_try_it_snippets_each_print_a_fake_record(tmp_path: Path) -> None:
    snippets = _fenced(_section(README.read_text(), "Try it without a key, with your own code"), "python")
    assert len(snippets) == 3 and all("8787" in snippet for snippet in snippets)
    config = tmp_path / "config.toml"
    config.write_text("")
    async with serving(config, {}, "--fake-upstream") as (process, url):  # `make serve-fake`, any port
        port = url.rsplit(":", 1)[1]
        for snippet in snippets:
            run = await asyncio.create_subprocess_exec(
                sys.executable, "-c", snippet.replace("8787", port),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(run.communicate(), 60)
            assert run.returncode == 0, err.decode()
            assert b"Hello from the" in out
        stdout, _ = await stop_serve(process)
    records = [orjson.loads(line) for line in stdout.splitlines()]
    assert [r["provider"] for r in records] == ["openai", "anthropic", "gemini"]
    assert all(r["fake_upstream"] is True and r["total_cost"] > 0 for r in records)


def test_make_serve_fake_runs_serve_with_the_fake_upstream() -> None:
    recipe = (REPO / "Makefile").read_text().split("\nserve-fake:", 1)[1].split("\n\n", 1)[0]
    assert "llmtally serve --config config.toml --fake-upstream" in recipe

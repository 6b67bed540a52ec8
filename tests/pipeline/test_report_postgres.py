"""``llmtally report --from postgresql://…`` prints what ``llmtally report records.jsonl`` prints for the
same records, character for character, for every grouping, window and output format."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llmtally import cli
from llmtally.config import Config
from llmtally.pipeline.postgres import PostgresSink
from llmtally.pipeline.sinks import JsonLinesSink
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy
from tests.pipeline.pg_traffic import traffic
from tests.pipeline.test_postgres import FAST, record

GROUPINGS = [
    "provider,model", "provider", "model", "platform", "item", "endpoint", "day", "hour", "tag:tenant",
    "tag:team", "usage_source", "price_source", "service_tier", "tag:tenant,item", "day,provider,model",
]  # fmt: skip
WINDOWS = [[], ["--since", "2026-11-02"], ["--until", "2026-11-03T12:00:00Z"],
           ["--since", "2026-11-01T06:00:00+00:00", "--until", "2026-11-03"]]  # fmt: skip
FORMATS = [[], ["--json"], ["--csv"]]


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["report", *args])
    return status, out.getvalue(), err.getvalue()


def synthetic(count: int) -> list[dict[str, Any]]:
    """Records over several days and hours, with costs past 10 decimal places, line items priced and not,
    unpriced records, tags present and absent, every platform."""
    rng = random.Random(29)
    out = []
    for i in range(count):
        day, hour = 1 + i % 4, rng.randrange(24)
        priced = i % 7 != 0
        cost = Decimal(rng.randrange(10**13)) / Decimal(10**15) if priced else None  # 15 places
        items = []
        if i % 3 == 0:
            items.append({"item": "web_search", "quantity": 2, "unit": "search", "unit_price": Decimal("0.01"),
                          "cost": Decimal("0.02"), "source": "genai-prices"})  # fmt: skip
        if i % 5 == 0:
            items.append({"item": "grounded_prompt", "quantity": 1, "unit": "prompt", "unit_price": None,
                          "cost": None, "source": "unknown"})  # fmt: skip
        tags = {"tenant": rng.choice(["acme", "globex", "initech"])} if i % 4 else {}
        out.append(record(
            f"syn{i:04d}", timestamp=f"2026-11-{day:02d}T{hour:02d}:{rng.randrange(60):02d}:00.{i % 1000:03d}Z",
            provider=rng.choice(["openai", "anthropic", "gemini", "converse"]),
            platform=rng.choice(["direct", "azure", "vertex", "bedrock"]),
            endpoint=rng.choice(["chat.completions", "messages", "generateContent"]),
            model=rng.choice(["gpt-4o", "claude-sonnet-5", None]), request_model="req-model",
            input_tokens=rng.randrange(10**6), output_tokens=rng.randrange(10**5),
            cache_read_tokens=rng.randrange(1000), cache_write_tokens=rng.randrange(100),
            reasoning_tokens=rng.choice([None, rng.randrange(500)]),
            input_cost=cost, output_cost=cost / 3 if cost is not None else None,
            total_cost=(cost + cost / 3 + sum((x["cost"] for x in items if x["cost"]), Decimal(0)))
            if cost is not None else None,
            price_source="genai-prices" if priced else "unknown_model",
            service_tier=rng.choice([None, "default", "flex"]), line_items=items, tags=tags,
        ))  # fmt: skip
    return out


async def test_report_from_postgres_is_the_report_from_json_lines(
    upstream: FakeUpstream, pg_dsn: str, tmp_path: Path
) -> None:
    jsonl = tmp_path / "records.jsonl"
    file_sink, pg_sink = JsonLinesSink(str(jsonl)), PostgresSink(pg_dsn)
    # Records of real calls through the proxy, to both sinks ...
    config = config_for_upstream(
        upstream.url, Config(pipeline=dataclasses.replace(FAST, spill_dir=str(tmp_path / "spill")))
    )
    proxy = await start_proxy(config, sinks=[file_sink, pg_sink])
    try:
        for tenant in ("acme", "globex"):
            await traffic(proxy, tenant=tenant)
        await proxy.flush()
    finally:
        await proxy.stop()  # (closes both sinks)
    # ... and records spread over days and hours, with awkward costs, written by both sinks too.
    file_sink, pg_sink = JsonLinesSink(str(jsonl)), PostgresSink(pg_dsn)
    records = synthetic(300)
    for start in range(0, len(records), 64):
        await file_sink.write(records[start : start + 64])
        await pg_sink.write(records[start : start + 64])
    await file_sink.close()
    await pg_sink.close()

    compared = 0
    for by in GROUPINGS:
        for window in WINDOWS:
            for output in FORMATS:
                args = ["--by", by, *window, *output]
                from_file = await asyncio.to_thread(run, [str(jsonl), *args])
                from_db = await asyncio.to_thread(run, ["--from", pg_dsn, *args])
                assert from_file[0] == 0 and from_file[2] == "", from_file
                assert from_db == from_file, (by, window, output)
                compared += 1
    assert compared == len(GROUPINGS) * len(WINDOWS) * len(FORMATS)
    # the comparison compared something: every group, costs to 10 places
    _, table, _ = await asyncio.to_thread(run, ["--from", pg_dsn, "--by", "item"])
    assert "web_search" in table and "grounded_prompt" in table and "had no price" in table
    _, table, _ = await asyncio.to_thread(run, ["--from", pg_dsn, "--by", "day", "--csv"])
    assert table.count("2026-11-0") == 4 and any(
        len(cell.partition(".")[2]) == 10 for line in table.splitlines() for cell in line.split(",")
    )


async def test_report_from_a_database_without_records_says_so(pg_dsn: str, tmp_path: Path) -> None:
    status, out, err = await asyncio.to_thread(run, ["--from", pg_dsn])
    where = pg_dsn.replace("postgres@", "")
    assert (status, out) == (1, "")
    assert (
        err
        == f"llmtally report: {where}: no table llmtally_usage (nothing stored there: [sinks.postgres] creates it)\n"
    )
    sink = PostgresSink(pg_dsn)
    await sink.write([record("r1", timestamp="2026-11-01T00:00:00.000Z")])
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("DELETE FROM llmtally_usage")
    await conn.close()
    status, out, err = await asyncio.to_thread(run, ["--from", pg_dsn])
    assert (status, err) == (1, f"llmtally report: {where}: table llmtally_usage holds no usage record\n")
    await sink.write([record("r2", timestamp="2026-11-01T00:00:00.000Z")])
    await sink.close()
    # records, none in the window: an empty report, as from a file
    jsonl = tmp_path / "one.jsonl"
    file_sink = JsonLinesSink(str(jsonl))
    await file_sink.write([record("r2", timestamp="2026-11-01T00:00:00.000Z")])
    await file_sink.close()
    window = ["--since", "2026-12-01"]
    assert await asyncio.to_thread(run, ["--from", pg_dsn, *window]) == await asyncio.to_thread(
        run, [str(jsonl), *window]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "mysql://meter:pw@db/usage"], "--from: expected a postgresql://user:password@host:port/database URL"),
        (["--from", "postgresql://meter:pw@127.0.0.1:1/usage"], "postgresql://127.0.0.1:1/usage: [Errno 111] Connect call failed ('127.0.0.1', 1)"),
        (["--from", "postgresql://127.0.0.1:1/usage", "records.jsonl"], "give record files or --from, not both"),
    ],
)  # fmt: skip
def test_report_from_errors_are_one_line_without_the_password(args: list[str], message: str) -> None:
    status, out, err = run(args)
    assert (status, out, err) == (2, "", f"llmtally report: {message}\n")


async def test_report_from_a_database_with_a_wrong_password_or_name(postgres_server: Any) -> None:
    missing = postgres_server.dsn("no_such_db")
    status, _, err = await asyncio.to_thread(run, ["--from", missing])
    assert status == 2 and "InvalidCatalogNameError" in err and "no_such_db" in err

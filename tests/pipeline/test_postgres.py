"""[sinks.postgres] against a real PostgreSQL server (tests/postgres_server.py): the schema and its
migrations, records from the real proxy stored as typed columns, idempotent replays, the database going
away mid-run, and records the database refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llmtally.config import Config, ConfigError, PipelineConfig, load_config
from llmtally.pipeline.build import build_sinks
from llmtally.pipeline.postgres import (
    COLUMNS,
    MIGRATIONS,
    TABLE,
    Migration,
    PostgresSink,
    from_row,
    migrate,
    redacted,
)
from llmtally.pipeline.queue import RecordPipeline
from llmtally.pipeline.sinks import render_record
from llmtally.pipeline.spill import SpillFile
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.pipeline.pg_traffic import traffic
from tests.postgres_server import PostgresServer
from tests.proxy.test_server import serving, stop_serve

FAST = PipelineConfig(retry_attempts=2, retry_backoff_s=0.05, retry_backoff_max_s=0.1, replay_interval_s=3600)


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def stored(dsn: str) -> list[dict[str, Any]]:
    """Every row, as the record dict it stands for."""
    from llmtally.pipeline.postgres import fetch_records

    records, _ = await fetch_records(dsn)
    return records


def as_json_line(record: dict[str, Any]) -> dict[str, Any]:
    """What the JSON-lines sink writes for the record, parsed back as a report reads it."""
    return json.loads(render_record(record), parse_float=Decimal)  # type: ignore[no-any-return]


def same_record(row: dict[str, Any], record: dict[str, Any]) -> None:
    """The row holds exactly what the JSON line says, field by field (latencies as floats)."""
    line = as_json_line(record)
    assert list(row) == list(line)  # every field, in the record's order
    for name, value in line.items():
        if name in ("latency_ms", "ttfb_ms") and value is not None:
            assert row[name] == float(value), name
        else:
            assert row[name] == value and type(row[name]) in (type(value), Decimal), (name, row[name], value)


async def proxy_with(upstream: FakeUpstream, sink: PostgresSink, spill_dir: Path) -> RunningProxy:
    config = config_for_upstream(
        upstream.url, Config(pipeline=dataclasses.replace(FAST, spill_dir=str(spill_dir)))
    )
    return await start_proxy(config, sinks=[sink])


# -- the schema ----------------------------------------------------------------------------------------


async def test_migrating_an_empty_database_then_again_is_a_no_op(pg_dsn: str) -> None:
    conn = await connect(pg_dsn)
    try:
        assert await migrate(conn) == [m.version for m in MIGRATIONS]
        versions = await conn.fetch("SELECT version, name FROM llmtally_schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in versions] == [(m.version, m.name) for m in MIGRATIONS]
        types = {
            r["column_name"]: r["data_type"]
            for r in await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1", TABLE
            )
        }
        assert types["timestamp"] == "timestamp with time zone"
        assert types["request_id"] == "text"
        assert types["input_cost"] == types["output_cost"] == types["total_cost"] == "numeric"
        assert types["tags"] == types["line_items"] == types["extra"] == "jsonb"
        assert types["input_tokens"] == types["reasoning_tokens"] == "bigint"
        assert types["stream"] == types["fake_upstream"] == "boolean"
        assert types["latency_ms"] == "double precision"
        assert set(types) == {c.name for c in COLUMNS} | {"extra", "stored_at"}
        primary = await conn.fetchval(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::regclass AND i.indisprimary", TABLE
        )  # fmt: skip
        assert primary == "request_id"

        assert await migrate(conn) == []  # again: nothing to do, nothing changed
        assert await conn.fetchval("SELECT count(*) FROM llmtally_schema_migrations") == len(MIGRATIONS)
    finally:
        await conn.close()


async def test_pods_starting_at_once_migrate_once(pg_dsn: str) -> None:
    conns = [await connect(pg_dsn) for _ in range(8)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(applied) == [[]] * 7 + [[m.version for m in MIGRATIONS]]
        assert await conns[0].fetchval("SELECT count(*) FROM llmtally_schema_migrations") == len(MIGRATIONS)
    finally:
        for conn in conns:
            await conn.close()


async def test_sinks_starting_at_once_on_an_empty_database_all_write(pg_dsn: str) -> None:
    sinks = [PostgresSink(pg_dsn) for _ in range(6)]
    records = [{**record(f"pod{i}"), "tags": {"pod": str(i)}} for i in range(6)]
    await asyncio.gather(*(s.write([r]) for s, r in zip(sinks, records, strict=True)))
    assert sorted(s.migrated for s in sinks) == [[]] * 5 + [[m.version for m in MIGRATIONS]]  # type: ignore[type-var]
    assert sorted(r["request_id"] for r in await stored(pg_dsn)) == [f"pod{i}" for i in range(6)]
    for sink in sinks:
        await sink.close()


async def test_a_user_that_may_only_insert_and_select_writes_once_the_schema_is_there(pg_dsn: str) -> None:
    owner = await connect(pg_dsn)
    try:
        await migrate(owner)
        await owner.execute(
            "CREATE ROLE meter LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC;"
            f" GRANT SELECT, INSERT ON {TABLE} TO meter; GRANT SELECT ON llmtally_schema_migrations TO meter"
        )
        sink = PostgresSink(pg_dsn.replace("postgres@", "meter@"))
        await sink.write([record("least-privilege")])
        await sink.close()
        assert sink.migrated == []
        assert await owner.fetchval(f"SELECT count(*) FROM {TABLE}") == 1
    finally:
        await owner.execute("DROP OWNED BY meter; DROP ROLE meter")
        await owner.close()


async def test_migrations_apply_in_version_order_and_a_failing_one_rolls_back_whole(pg_dsn: str) -> None:
    newest = max(m.version for m in MIGRATIONS)
    later = Migration(newest + 1, "a column", f"ALTER TABLE {TABLE} ADD COLUMN region text")
    broken = Migration(newest + 2, "fails half-way", "CREATE TABLE half_done (a int); SELECT 1/0")
    conn = await connect(pg_dsn)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conn, [broken, later, *MIGRATIONS])
        # Nothing of any of them is left: not the table, not the versions, not the half-done part.
        assert await conn.fetchval("SELECT to_regclass($1)", TABLE) is None
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert await conn.fetchval("SELECT to_regclass('llmtally_schema_migrations')") is None

        every = [*range(1, newest + 2)]
        assert await migrate(conn, [later, *reversed(MIGRATIONS)]) == every  # later needs 1's table
        names = await conn.fetch(
            "SELECT version FROM llmtally_schema_migrations ORDER BY applied_at, version"
        )
        assert [r["version"] for r in names] == every
        assert await migrate(conn) == []  # the default set: all there (and the newer one is left alone)
    finally:
        await conn.close()


# -- records from the real proxy -------------------------------------------------------------------------


async def test_records_through_the_proxy_are_stored_with_exact_typed_values(
    upstream: FakeUpstream, pg_dsn: str, tmp_path: Path
) -> None:
    sink = PostgresSink(pg_dsn)
    proxy = await proxy_with(upstream, sink, tmp_path)
    try:
        calls = await traffic(proxy)
        records = await proxy.flush()
    finally:
        await proxy.stop()
    assert len(records) == calls
    assert any(r["line_items"] for r in records) and any(r["total_cost"] is None for r in records)
    assert any(r["tags"] for r in records) and any(r["stream"] for r in records)

    by_id = {r["request_id"]: r for r in await stored(pg_dsn)}
    assert set(by_id) == {r["request_id"] for r in records}
    for record in records:
        same_record(by_id[record["request_id"]], record)

    conn = await connect(pg_dsn)
    try:
        priced = next(r for r in records if r["line_items"])
        row = await conn.fetchrow(f"SELECT * FROM {TABLE} WHERE request_id = $1", priced["request_id"])
        assert row is not None
        assert row["timestamp"] == datetime.fromisoformat(priced["timestamp"]) and row["timestamp"].tzinfo
        assert isinstance(row["total_cost"], Decimal)
        assert row["total_cost"] == priced["total_cost"].quantize(Decimal("1E-10"))
        assert row["input_tokens"] == priced["input_tokens"] and isinstance(row["input_tokens"], int)
        items = json.loads(row["line_items"], parse_float=Decimal)
        assert [(i["item"], i["quantity"], i["cost"]) for i in items] == [
            (i["item"], i["quantity"], i["cost"]) for i in priced["line_items"]
        ]
        # jsonb, queried as such: the costs inside are numbers, summed exactly by PostgreSQL too
        item_total = await conn.fetchval(
            f"SELECT sum((i->>'cost')::numeric) FROM {TABLE}, jsonb_array_elements(line_items) i"
            " WHERE request_id = $1", priced["request_id"],
        )  # fmt: skip
        assert item_total == sum(i["cost"] for i in priced["line_items"] if i["cost"] is not None)
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE tags->>'tenant' = 'acme'") == sum(
            1 for r in records if r["tags"].get("tenant") == "acme"
        )
    finally:
        await conn.close()


def record(request_id: str, **fields: Any) -> dict[str, Any]:
    """A record dict as the pipeline hands it to sinks (costs Decimal)."""
    base: dict[str, Any] = {
        "event": "llm.usage", "timestamp": "2026-12-01T10:00:00.123Z", "request_id": request_id,
        "provider": "openai", "platform": "direct", "endpoint": "chat.completions", "request_model": "gpt-4o",
        "model": "gpt-4o-2024-08-06", "stream": False, "status": 200, "input_tokens": 1200,
        "output_tokens": 300, "cache_read_tokens": 1024, "cache_write_tokens": 0, "cache_write_1h_tokens": 0,
        "reasoning_tokens": None, "input_audio_tokens": 0, "output_audio_tokens": 0, "total_tokens": 1500,
        "usage_source": "provider", "estimated_input_tokens": None, "input_cost": Decimal("0.00172"),
        "output_cost": Decimal("0.003"), "total_cost": Decimal("0.00472"), "currency": "USD",
        "line_items": [], "price_source": "genai-prices", "price_version": "b920eef22b94",
        "priced_model": "gpt-4o", "pricing_note": None, "service_tier": "default", "inference_geo": None,
        "latency_ms": 1.421, "ttfb_ms": 1.322, "client_disconnected": False, "fake_upstream": False,
        "tags": {}, "upstream_request_id": "req_1", "error": None,
    }  # fmt: skip
    return {**base, **fields}


async def test_a_replayed_batch_is_stored_once_and_never_overwritten(pg_dsn: str) -> None:
    sink = PostgresSink(pg_dsn)
    batch = [record(f"r{i}", total_cost=Decimal(i)) for i in range(5)]
    await sink.write(batch)
    await sink.write(batch)  # a retry after a lost answer: no error, no second row
    await sink.write([record("r2", total_cost=Decimal(99)), record("r9")])  # overlapping, and new
    await sink.write([record("r9"), record("r9")])  # the same id twice in one batch
    await sink.close()
    rows = {r["request_id"]: r for r in await stored(pg_dsn)}
    assert sorted(rows) == ["r0", "r1", "r2", "r3", "r4", "r9"]
    assert rows["r2"]["total_cost"] == 2  # the first write stays

    # Through the pipeline: a spill file holding stored and new records, replayed.
    spill_dir = Path(os.environ["TMPDIR"]) / "replay-once"
    pipeline = RecordPipeline([PostgresSink(pg_dsn)], dataclasses.replace(FAST, spill_dir=str(spill_dir)))
    runner = pipeline.runners[0]
    runner.spill.append([record("r1"), record("r3"), record("r10"), record("r11")])
    pipeline.start()
    assert await pipeline.replay()
    await pipeline.close()
    assert sorted(r["request_id"] for r in await stored(pg_dsn)) == sorted([*rows, "r10", "r11"])
    assert pipeline.stats.replayed[runner.sink.name] == 4 and not pipeline.stats.quarantined


async def test_records_replayed_from_a_spill_file_are_the_same_rows_as_delivered_at_once(pg_dsn: str) -> None:
    fresh = record(
        "fresh", input_cost=Decimal("0.000347040000001"), tags={"tenant": "acme"},
        line_items=[{"item": "web_search", "quantity": 2, "unit": "search", "unit_price": Decimal("0.01"),
                     "cost": Decimal("0.02"), "source": "genai-prices"}],
    )  # fmt: skip
    spill = SpillFile(Path(os.environ["TMPDIR"]) / "same-rows.jsonl")
    spill.append([{**fresh, "request_id": "spilled"}])
    (replayed,) = spill.take()  # what a replay reads: costs as Decimal, latencies as Decimal
    sink = PostgresSink(pg_dsn)
    await sink.write([fresh, replayed])
    await sink.close()
    a, b = sorted(await stored(pg_dsn), key=lambda r: r["request_id"] != "fresh")
    assert {**a, "request_id": "spilled"} == b
    assert a["input_cost"] == Decimal("0.00034704")  # rounded to 10 places, as the JSON line says


async def test_fields_the_table_has_no_column_for_are_kept_in_extra(pg_dsn: str) -> None:
    sink = PostgresSink(pg_dsn)
    newer = record("newer", region_cost={"eu": Decimal("0.5")}, batch_id="b-7")
    older = {k: v for k, v in record("older").items() if k not in ("platform", "line_items", "fake_upstream")}
    await sink.write([newer, older])
    await sink.close()
    rows = {r["request_id"]: r for r in await stored(pg_dsn)}
    assert rows["newer"]["region_cost"] == {"eu": Decimal("0.5")} and rows["newer"]["batch_id"] == "b-7"
    assert rows["older"]["platform"] == "direct" and rows["older"]["line_items"] == []
    assert rows["older"]["fake_upstream"] is False


# -- refused records ---------------------------------------------------------------------------------------


async def test_records_the_database_refuses_are_quarantined_and_the_others_stored(pg_dsn: str) -> None:
    spill_dir = Path(os.environ["TMPDIR"]) / "refused"
    sink = PostgresSink(pg_dsn)
    pipeline = RecordPipeline([sink], dataclasses.replace(FAST, spill_dir=str(spill_dir)))
    pipeline.start()
    # Refused by PostgreSQL itself (checked by nobody before it): an id too long for the primary key's
    # index (SQLSTATE 54000). Refused before sending: a NUL byte (text cannot hold one), a tag that is
    # not an object, a count past bigint.
    long_id = os.urandom(6000).hex()
    bad = [
        record(long_id),
        record("nul", model="gpt\x00-4o"),
        record("nul-tag", tags={"k": "a\x00b"}),
        record("tags-list", tags=["a"]),
        record("huge", input_tokens=2**70),
    ]
    good = [record(f"ok{i}") for i in range(6)]
    batch = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5]]
    pipeline._fan_out(batch)  # a built batch, as the worker hands it to every sink's runner
    await pipeline.flush()
    await pipeline.close()
    assert sorted(r["request_id"] for r in await stored(pg_dsn)) == [f"ok{i}" for i in range(6)]
    lines = [json.loads(line) for line in (spill_dir / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(line["record"]["request_id"] for line in lines) == sorted(r["request_id"] for r in bad)
    assert {line["sink"] for line in lines} == {sink.name} and {line["reason"] for line in lines} == {
        "rejected"
    }
    # Each quarantined line says why each of them was refused: by us, or by PostgreSQL.
    (error,) = {line["error"] for line in lines}
    assert "nul: model: NUL character" in error and "tags-list: tags: expected an object" in error
    assert "huge: input_tokens: integer out of range" in error
    assert f"{long_id[:40]}: ProgramLimitExceededError: index row" in error
    assert pipeline.stats.quarantined[(sink.name, "rejected")] == len(bad)
    assert pipeline.stats.delivered[sink.name] == len(good)
    assert not SpillFile(runner_spill(pipeline)).has_records()  # nothing left to retry: refused is final


def runner_spill(pipeline: RecordPipeline) -> Path:
    return pipeline.runners[0].spill.path


# -- the database going away ----------------------------------------------------------------------------


async def test_database_down_mid_run_records_spill_and_arrive_after_restart_once(
    upstream: FakeUpstream, own_postgres_server: PostgresServer, tmp_path: Path
) -> None:
    server = own_postgres_server
    dsn = await server.create_database()
    sink = PostgresSink(dsn, connect_timeout_s=2.0)
    proxy = await proxy_with(upstream, sink, tmp_path)
    try:
        before = await traffic(proxy, tenant="before")
        await proxy.flush()
        assert len(await stored(dsn)) == before

        server.stop()  # the connection the sink holds is cut; new ones are refused
        during = await traffic(proxy, tenant="during", rounds=2)
        await proxy.flush()
        name = sink.name
        assert proxy.pipeline.stats.spilled[name] == during
        assert proxy.pipeline.stats.failed[name] == during
        assert proxy.pipeline.runners[-1].spill.has_records()
        assert not proxy.pipeline.stats.quarantined  # down is not refused

        server.start()
        assert await proxy.pipeline.replay()
        after = await traffic(proxy, tenant="after")  # and the sink is back for new records
        records = await proxy.flush()
    finally:
        await proxy.stop()
    rows = await stored(dsn)
    assert len(rows) == len(records) == before + during + after  # none lost, none twice
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows)
    for rec in records:
        same_record(by_id[rec["request_id"]], rec)  # the replayed ones too, to the last decimal
    assert proxy.pipeline.stats.replayed[name] == during
    assert not proxy.pipeline.runners[-1].spill.has_records()


async def test_records_spilled_while_the_database_was_down_are_delivered_at_the_next_start(
    own_postgres_server: PostgresServer, tmp_path: Path
) -> None:
    server = own_postgres_server
    dsn = await server.create_database()
    server.stop()
    config = dataclasses.replace(FAST, spill_dir=str(tmp_path))
    first = RecordPipeline([PostgresSink(dsn, connect_timeout_s=1.0)], config)
    first.start()
    first._fan_out([record(f"s{i}") for i in range(10)])
    await first.flush()
    await first.close()  # still down: the records stay in the spill file
    assert first.stats.spilled[first.runners[0].sink.name] == 10

    server.start()
    second = RecordPipeline([PostgresSink(dsn)], config)
    second.start()  # replays the spill file first thing
    await second.flush()
    for _ in range(100):
        if not second.runners[0].spill.has_records():
            break
        await asyncio.sleep(0.05)
    await second.close()
    assert sorted(r["request_id"] for r in await stored(dsn)) == sorted(f"s{i}" for i in range(10))


async def test_serve_with_two_workers_stores_every_call_in_postgres(
    upstream: FakeUpstream, pg_dsn: str, tmp_path: Path
) -> None:
    # The real thing: `llmtally serve` processes, the record process holding the connection, the DSN
    # from the environment, SIGTERM at the end.
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nopenai = "{upstream.url}"\nanthropic = "{upstream.url}"\n')
    env = {"LLMTALLY_SINKS_POSTGRES_DSN": pg_dsn, "LLMTALLY_PIPELINE_SPILL_DIR": str(tmp_path / "spill")}
    async with serving(config, env, "--workers", "2") as (process, url):
        calls = await traffic(_At(url))
        stdout, _ = await stop_serve(process)
    lines = [json.loads(line, parse_float=Decimal) for line in stdout.splitlines()]
    assert len(lines) == calls
    rows = {r["request_id"]: r for r in await stored(pg_dsn)}
    assert set(rows) == {line["request_id"] for line in lines}
    for line in lines:
        same_record(rows[line["request_id"]], line)


@dataclasses.dataclass
class _At:
    """What tests.pipeline.pg_traffic needs of a proxy: its URL."""

    url: str


# -- configuration ------------------------------------------------------------------------------------------


def test_the_dsn_comes_from_config_or_environment_and_is_never_echoed(tmp_path: Path) -> None:
    dsn = "postgresql://meter:s3cret@db.internal:6432/usage"
    config = load_config(None, env={"LLMTALLY_SINKS_POSTGRES_DSN": dsn})
    assert config.sinks.postgres.dsn == dsn
    (sink,) = [s for s in build_sinks(config) if isinstance(s, PostgresSink)]
    assert sink.name == "postgres:db.internal/usage" and "s3cret" not in sink.name
    assert redacted(dsn) == "postgresql://db.internal:6432/usage"
    path = tmp_path / "config.toml"
    path.write_text('[sinks.postgres]\ndsn = "mysql://meter:s3cret@db/usage"\n')
    with pytest.raises(ConfigError, match=r"\[sinks.postgres\] dsn: must be a postgresql://") as refused:
        load_config(str(path), env={})
    assert "s3cret" not in str(refused.value)
    assert not [s for s in build_sinks(Config()) if isinstance(s, PostgresSink)]  # off by default


def test_row_timestamps_read_back_as_the_record_wrote_them() -> None:
    row = [None] * (len(COLUMNS) + 1)
    row[0] = datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=UTC)
    row[[c.name for c in COLUMNS].index("tags")] = "{}"
    assert from_row(row)["timestamp"] == "2026-12-01T10:00:00.123Z"
    row[0] = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert from_row(row)["timestamp"] == "2026-12-01T10:00:00.123456Z"

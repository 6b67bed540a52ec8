"""``[sinks.postgres]``: one row per usage record in PostgreSQL, and the records read back for reports.

The table (``llmtally_usage``) has the record's fields as typed columns: tokens ``bigint``, costs
``numeric`` (rounded to 10 places, as every other sink writes them), ``timestamp`` ``timestamptz``,
``tags`` and ``line_items`` ``jsonb``. llmtally creates and migrates it itself: :data:`MIGRATIONS` are
applied in order, in one transaction, under a transaction-scoped advisory lock, and recorded in
``llmtally_schema_migrations``; so several pods starting at once migrate once, and a failed migration
leaves nothing half-done.

Writes follow the sink contract (:mod:`llmtally.pipeline.queue`):

- a batch is one multi-row ``INSERT … SELECT FROM unnest(…) ON CONFLICT (request_id) DO NOTHING``: a
  retried or replayed batch (spill files, the journal's crash recovery) never stores a record twice;
- the database unreachable, restarting, out of resources …: the write raises, the runner retries,
  spills and replays later;
- a record the database refuses for what it holds (a data exception such as a NUL character, a value
  out of range), or one that cannot be converted to the columns' types: the others are stored, and it
  is reported as :class:`RecordsRejected` (permanent), so the runner quarantines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from llmtally.pipeline.sinks import COST_DECIMALS, RecordsRejected, decimal_text

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("llmtally.pipeline")

TABLE = "llmtally_usage"
MIGRATIONS_TABLE = "llmtally_schema_migrations"
#: ``pg_advisory_xact_lock`` key: every llmtally migrating one database takes its turn.
MIGRATION_LOCK = int.from_bytes(
    hashlib.sha256(b"llmtally schema migrations").digest()[:8], "big", signed=True
)

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "usage records",
        f"""
        CREATE TABLE {TABLE} (
            request_id text PRIMARY KEY,
            "timestamp" timestamptz NOT NULL,
            provider text NOT NULL,
            platform text NOT NULL,
            endpoint text NOT NULL,
            request_model text,
            model text,
            stream boolean NOT NULL,
            status integer,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            cache_read_tokens bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            cache_write_1h_tokens bigint NOT NULL,
            reasoning_tokens bigint,
            input_audio_tokens bigint NOT NULL,
            output_audio_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            usage_source text NOT NULL,
            estimated_input_tokens bigint,
            input_cost numeric,
            output_cost numeric,
            total_cost numeric,
            currency text NOT NULL,
            line_items jsonb NOT NULL,
            price_source text NOT NULL,
            price_version text,
            priced_model text,
            pricing_note text,
            service_tier text,
            inference_geo text,
            latency_ms double precision NOT NULL,
            ttfb_ms double precision,
            client_disconnected boolean NOT NULL,
            fake_upstream boolean NOT NULL,
            tags jsonb NOT NULL,
            upstream_request_id text,
            error text,
            extra jsonb,
            stored_at timestamptz NOT NULL DEFAULT now()
        )
        """,
    ),
    Migration(2, "index on timestamp", f'CREATE INDEX {TABLE}_timestamp ON {TABLE} ("timestamp")'),
    Migration(
        3,
        "spend limits and batch results",
        f"ALTER TABLE {TABLE} ADD COLUMN budget_exceeded text, ADD COLUMN batch_id text,"
        " ADD COLUMN custom_id text",
    ),
    Migration(
        4,
        "image tokens",
        f"ALTER TABLE {TABLE} ADD COLUMN input_image_tokens bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN output_image_tokens bigint NOT NULL DEFAULT 0",
    ),
    Migration(
        5,
        "WebSocket sessions and cached audio",
        f"ALTER TABLE {TABLE} ADD COLUMN cache_read_audio_tokens bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN session_id text",
    ),
)


async def migrate(conn: asyncpg.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations this database has not had, in version order; returns their versions.

    One transaction for all of them, after ``pg_advisory_xact_lock``: processes migrating at once wait
    for each other (the second finds nothing left to do), and a failing migration rolls back whole.
    """
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        # Looked up, not CREATE … IF NOT EXISTS: that needs CREATE on the schema even when the table is
        # there, and a user that may only insert and select must be able to start once it is migrated.
        if await conn.fetchval("SELECT to_regclass($1)", MIGRATIONS_TABLE) is None:
            await conn.execute(
                f"CREATE TABLE {MIGRATIONS_TABLE} (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        done = {row["version"] for row in await conn.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")}
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)",
                migration.version, migration.name,
            )  # fmt: skip
            applied.append(migration.version)
    if applied:
        log.info("postgres: schema migrated to version %d (applied %s)", applied[-1], applied)
    newer = sorted(v for v in done if v > max(m.version for m in migrations))
    if newer:
        log.warning("postgres: schema has versions %s, newer than this llmtally knows", newer)
    return applied


# -- records → rows ----------------------------------------------------------------------------------


class Unstorable(ValueError):
    """A record field that cannot go into its column."""


_MISSING = object()


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Unstorable(f"expected a string, got {type(value).__name__}")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise Unstorable("NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Unstorable("not UTF-8 (lone surrogate)") from None
    return value


def _int(bounds: tuple[int, int]) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Unstorable(f"expected an integer, got {type(value).__name__}")
        if not bounds[0] <= value <= bounds[1]:
            raise Unstorable(f"integer out of range: {value}")
        return value

    return convert


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Unstorable(f"expected true or false, got {type(value).__name__}")
    return value


def _money(value: Any) -> Decimal:
    """Rounded to 10 places, as the JSON sinks write it: the same record gives the same row whether it
    is delivered at once or replayed from a spill file."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise Unstorable(f"expected a decimal number, got {type(value).__name__}")
    dec = Decimal(value)
    if not dec.is_finite():
        raise Unstorable(f"not a finite number: {value}")
    try:
        return dec.quantize(COST_DECIMALS)
    except ArithmeticError:
        raise Unstorable(f"too large: {value}") from None


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise Unstorable(f"expected a number, got {type(value).__name__}")
    return float(value)


def _timestamp(value: Any) -> datetime:
    text = _text(value)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Unstorable(f"not an RFC 3339 timestamp: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(decimal_text(value))  # exact, as the JSON sinks write money
    raise TypeError(type(value).__name__)


def _jsonb(kind: type) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, kind):
            raise Unstorable(
                f"expected {'an object' if kind is dict else 'an array'}, got {type(value).__name__}"
            )
        try:
            text = orjson.dumps(value, default=_json_default).decode()
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise Unstorable(f"not JSON: {exc}") from None
        if "\\u0000" in text:  # jsonb refuses the NUL escape
            raise Unstorable("NUL character")
        return text

    return convert


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    #: The element type of the array the batch passes for this column.
    pg_type: str
    convert: Callable[[Any], Any]
    #: What a record without the field gets (records spilled by an older llmtally); _MISSING: required.
    default: Any = _MISSING
    nullable: bool = False
    #: The type the column has, when the batch passes another (jsonb passed as text).
    cast: str | None = None


def _columns() -> tuple[Column, ...]:
    i64, i32 = _int(INT64), _int(INT32)

    def text_or_null(name: str) -> Column:
        return Column(name, "text", _text, None, nullable=True)

    return (
        Column("timestamp", "timestamptz", _timestamp),
        Column("request_id", "text", _text),
        Column("provider", "text", _text),
        Column("platform", "text", _text, "direct"),
        Column("endpoint", "text", _text),
        text_or_null("request_model"),
        text_or_null("model"),
        Column("stream", "boolean", _bool),
        Column("status", "integer", i32, None, nullable=True),
        Column("input_tokens", "bigint", i64, 0),
        Column("output_tokens", "bigint", i64, 0),
        Column("cache_read_tokens", "bigint", i64, 0),
        Column("cache_write_tokens", "bigint", i64, 0),
        Column("cache_write_1h_tokens", "bigint", i64, 0),
        Column("reasoning_tokens", "bigint", i64, None, nullable=True),
        Column("input_audio_tokens", "bigint", i64, 0),
        Column("output_audio_tokens", "bigint", i64, 0),
        Column("input_image_tokens", "bigint", i64, 0),
        Column("output_image_tokens", "bigint", i64, 0),
        Column("cache_read_audio_tokens", "bigint", i64, 0),
        Column("total_tokens", "bigint", i64),
        Column("usage_source", "text", _text),
        Column("estimated_input_tokens", "bigint", i64, None, nullable=True),
        Column("input_cost", "numeric", _money, None, nullable=True),
        Column("output_cost", "numeric", _money, None, nullable=True),
        Column("total_cost", "numeric", _money, None, nullable=True),
        Column("currency", "text", _text, "USD"),
        Column("line_items", "text", _jsonb(list), [], cast="jsonb"),
        Column("price_source", "text", _text),
        text_or_null("price_version"),
        text_or_null("priced_model"),
        text_or_null("pricing_note"),
        text_or_null("service_tier"),
        text_or_null("inference_geo"),
        Column("latency_ms", "double precision", _float),
        Column("ttfb_ms", "double precision", _float, None, nullable=True),
        Column("client_disconnected", "boolean", _bool, False),
        Column("fake_upstream", "boolean", _bool, False),
        Column("tags", "text", _jsonb(dict), {}, cast="jsonb"),
        text_or_null("upstream_request_id"),
        text_or_null("batch_id"),
        text_or_null("custom_id"),
        text_or_null("session_id"),
        text_or_null("error"),
        text_or_null("budget_exceeded"),
    )


#: In the record's field order (``UsageRecord.to_dict``), ``event`` aside (always ``llm.usage``).
COLUMNS = _columns()
_KNOWN = frozenset(c.name for c in COLUMNS) | {"event"}
#: Record fields this table has no column for (a newer llmtally's, replayed from its spill file) go to
#: ``extra`` (jsonb), so nothing a record says is dropped.
_EXTRA = Column("extra", "text", _jsonb(dict), None, nullable=True, cast="jsonb")
_ALL = (*COLUMNS, _EXTRA)


def to_row(record: dict[str, Any]) -> tuple[Any, ...]:
    """The record as the table's row (in :data:`COLUMNS` order, then ``extra``); raises
    :class:`Unstorable` naming the field that cannot be stored."""
    row: list[Any] = []
    for column in COLUMNS:
        value = record.get(column.name, _MISSING)
        if value is _MISSING:
            if column.default is _MISSING:
                raise Unstorable(f"{column.name}: missing")
            value = column.default
        if value is None and column.nullable:
            row.append(None)
            continue
        if value is None:
            raise Unstorable(f"{column.name}: null")
        try:
            row.append(column.convert(value))
        except Unstorable as exc:
            raise Unstorable(f"{column.name}: {exc}") from None
    extra = {k: v for k, v in record.items() if k not in _KNOWN}
    try:
        row.append(_EXTRA.convert(extra) if extra else None)
    except Unstorable as exc:
        raise Unstorable(f"extra fields {sorted(extra)}: {exc}") from None
    return tuple(row)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _insert_sql() -> str:
    names = ", ".join(_ident(c.name) for c in _ALL)
    selected = ", ".join(_ident(c.name) + (f"::{c.cast}" if c.cast else "") for c in _ALL)
    arrays = ", ".join(f"${i}::{c.pg_type}[]" for i, c in enumerate(_ALL, 1))
    return (
        f"INSERT INTO {TABLE} ({names}) SELECT {selected} FROM unnest({arrays}) AS u({names})"
        " ON CONFLICT (request_id) DO NOTHING"
    )


INSERT_SQL = _insert_sql()


def record_fault(exc: BaseException) -> bool:
    """The database refused the data, not the connection: a data exception (SQLSTATE class 22, e.g. a
    NUL byte, a value out of range), an integrity violation (23) or a program limit (54, e.g. a key
    too long for its index). Anything else (down, shutting down, out of resources, a dropped table)
    says nothing about the records."""
    import asyncpg

    if not isinstance(exc, asyncpg.PostgresError):
        return False
    state = str(getattr(exc, "sqlstate", "") or "")
    return state[:2] in ("22", "23", "54")


def redacted(dsn: str) -> str:
    """The DSN as ``postgresql://host:port/database``: no user, no password (for names and logs)."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://?"
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


class PostgresSink:
    """Records as rows of ``llmtally_usage`` (see the module docstring for the contract).

    One connection, opened at the first write, migrated then, and opened again after any failure: the
    runner calls ``write`` for one batch at a time.
    """

    def __init__(self, dsn: str, connect_timeout_s: float = 10.0) -> None:
        import importlib.util

        if importlib.util.find_spec("asyncpg") is None:  # refused at start, not spilled for ever
            from llmtally.config import ConfigError

            raise ConfigError("[sinks.postgres] dsn: needs asyncpg: pip install 'llmtally[postgres]'")
        where = urlsplit(redacted(dsn))
        self.name = f"postgres:{where.hostname}{where.path}"
        self._dsn = dsn
        self._connect_timeout = connect_timeout_s
        self._conn: asyncpg.Connection | None = None
        #: Versions the last migration applied (tests and logs).
        self.migrated: list[int] | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
        try:
            self.migrated = await migrate(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def write(self, records: list[dict[str, Any]]) -> None:
        rows: list[tuple[Any, ...]] = []
        kept: list[dict[str, Any]] = []
        refused: list[tuple[dict[str, Any], BaseException]] = []
        for record in records:
            try:
                rows.append(to_row(record))
            except Unstorable as exc:
                refused.append((record, exc))
                continue
            kept.append(record)
        if rows:
            try:
                conn = await self._connection()
                try:
                    await conn.execute(INSERT_SQL, *_arrays(rows))
                except Exception as exc:
                    if not record_fault(exc):
                        raise
                    # One of them (at least) is refused for what it holds: each alone finds which.
                    for record, row in zip(kept, rows, strict=True):
                        try:
                            await conn.execute(INSERT_SQL, *_arrays([row]))
                        except Exception as alone:
                            if not record_fault(alone):
                                raise
                            refused.append((record, alone))
            except BaseException as exc:  # down, timed out (cancelled), a dropped table: connect anew
                self._drop()
                if not isinstance(exc, Exception):
                    raise
                raise ConnectionError(f"postgres {redacted(self._dsn)}: {type(exc).__name__}: {exc}") from exc
        if refused:
            raise RecordsRejected([r for r, _ in refused], "rejected", permanent=True) from _why(refused)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=self._connect_timeout)
            except Exception:
                conn.terminate()


def _why(refused: list[tuple[dict[str, Any], BaseException]]) -> Unstorable:
    """One error naming each refused record's own reason (the quarantine keeps it beside them)."""
    shown = [
        f"{str(r.get('request_id'))[:40]}: "
        + ("" if isinstance(e, Unstorable) else f"{type(e).__name__}: ")
        + str(e)[:200]
        for r, e in refused[:10]
    ]
    more = f"; and {len(refused) - 10} more" if len(refused) > 10 else ""
    return Unstorable("; ".join(shown) + more)


def _arrays(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


# -- rows → records (llmtally report --from) ---------------------------------------------------------


def _stamp(when: datetime) -> str:
    """The record's timestamp text: RFC 3339 UTC, milliseconds (microseconds when it had them)."""
    when = when.astimezone(UTC)
    spec = "milliseconds" if when.microsecond % 1000 == 0 else "microseconds"
    return when.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _select_sql(since: bool, until: bool) -> str:
    cols = ", ".join(_ident(c.name) + ("::text" if c.cast else "") for c in _ALL)
    where = [
        cond for cond, on in (('"timestamp" >= $1', since), (f'"timestamp" < ${1 + since}', until)) if on
    ]
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f'SELECT {cols} FROM {TABLE}{clause} ORDER BY "timestamp", request_id'


def from_row(row: Iterable[Any]) -> dict[str, Any]:
    """A row back as the record dict a JSON line parses to (costs Decimal, JSON numbers as Decimal)."""
    record: dict[str, Any] = {"event": "llm.usage"}
    for column, value in zip(_ALL, row, strict=True):
        if column.cast and value is not None:
            value = json.loads(value, parse_float=Decimal)
        if column is _EXTRA:
            record.update(value or {})
        elif column.name == "timestamp":
            record["timestamp"] = _stamp(value)
        elif column.pg_type == "numeric" and value is not None:
            record[column.name] = value.normalize() if value else Decimal(0)
        else:
            record[column.name] = value
    return record


async def fetch_records(
    dsn: str, since: datetime | None = None, until: datetime | None = None, timeout_s: float = 10.0
) -> tuple[list[dict[str, Any]], bool]:
    """The records stored in ``dsn`` with ``since <= timestamp < until``, oldest first, and whether the
    table holds any record at all (a window can be empty where the table is not).

    Raises ``LookupError`` when the database has no llmtally table (never written to); asyncpg's and the
    OS's errors when it cannot be reached or read.
    """
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", TABLE) is None:
            raise LookupError(f"no table {TABLE} in {redacted(dsn)}")
        args = [w for w in (since, until) if w is not None]
        async with conn.transaction(readonly=True):  # one snapshot; a cursor, not the table in one go
            records = [
                from_row(row.values())
                async for row in conn.cursor(_select_sql(since is not None, until is not None), *args)
            ]
        some = bool(records) or bool(await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {TABLE})"))
    finally:
        await conn.close()
    return records, some

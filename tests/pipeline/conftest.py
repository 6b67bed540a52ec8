"""The pipeline tests' real PostgreSQL server (tests/postgres_server.py)."""

from tests.postgres_server import own_postgres_server, pg_dsn, postgres_server

__all__ = ["own_postgres_server", "pg_dsn", "postgres_server"]

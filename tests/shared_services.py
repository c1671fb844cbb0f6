"""PostgreSQL and Redis for tests: one database per test session, one schema per store, one key prefix per session.

The services run on the test machines (127.0.0.1:5432 with trust auth, 127.0.0.1:6379); override with
$REFT_TEST_POSTGRES (a URL to a server where we may create databases) and $REFT_TEST_REDIS. Everything created is
removed at the end: the database is dropped (its connections terminated), the Redis keys under the prefix deleted.
Only tests that ask for these fixtures need the services; the embedded default's tests never touch them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import psycopg

ADMIN_URL = os.environ.get("REFT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REFT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def database_url(database: str, schema: str | None = None, app: str | None = None) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"
    params = []
    if schema is not None:
        params.append("options=" + quote(f"-csearch_path={schema}"))
    if app is not None:
        params.append(f"application_name={app}")
    return base + ("?" + "&".join(params) if params else "")


class ScratchDatabase:
    """A database of our own; `new_schema()` gives a URL whose connections live in a fresh, empty schema."""

    def __init__(self) -> None:
        self.name = f"reft_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')  # type: ignore[arg-type]  # our own generated name
        self.url = database_url(self.name)

    def new_schema(self) -> str:
        schema = f"s_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]
        return database_url(self.name, schema, app=schema)

    def close_connections(self, url: str) -> None:
        """End the connections a test left open to its schema (pools a test did not close)."""
        app = url.rsplit("application_name=", 1)[-1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name=%s", (app,))

    def drop(self) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')  # type: ignore[arg-type]


def scratch_database() -> Iterator[ScratchDatabase]:
    database = ScratchDatabase()
    try:
        yield database
    finally:
        database.drop()


def redis_prefix() -> Iterator[str]:
    """A key prefix of our own in the test Redis; its keys are deleted at the end."""
    import redis

    prefix = f"reft_test_{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()

"""One connection pool to the store's database, its transactions, and versioned schema migrations.

Transactions run at READ COMMITTED; a writer that must not interleave with another (a tenant's quota check and
its write, a migration) takes a transaction-scoped advisory lock first, so the check and the write are atomic
across every replica. A connection failure (the database restarting, a network fault) becomes
`StoreUnavailableError` (HTTP 503): nothing was changed and retrying later works. Pooled connections are checked
before use, so after a restart the pool replaces its dead connections instead of failing one request per each.

Migrations: each component (artifacts, tenants, jobs) has an ordered list of statement groups; the table
`schema_versions` records how many each database has applied. Opening applies the missing ones under a global
advisory lock (replicas starting together migrate once); a database newer than this build is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from adapters_store.errors import StoreError, StoreUnavailableError

log = logging.getLogger("reft_serve.store")
Cursor = psycopg.Cursor[Any]
_MIGRATION_LOCK = "reft-serve:migrations"


def describe(url: str) -> str:
    """The URL without user or password, for messages and logs."""
    params = conninfo_to_dict(url)
    host, port, dbname = params.get("host", "localhost"), params.get("port", "5432"), params.get("dbname", "")
    return f"postgresql://{host}:{port}/{dbname}"


class Database:
    def __init__(self, url: str, *, max_connections: int = 8, open_timeout_s: float = 10.0,
                 idle_in_transaction_timeout_s: float | None = None) -> None:
        """`idle_in_transaction_timeout_s`: the server ends a session of this pool that sits that long inside a
        transaction without a statement (its process frozen or stuck), releasing the row locks it holds."""
        self.url = url
        self.location = describe(url)
        self.pool = ConnectionPool(
            url, min_size=1, max_size=max_connections, timeout=5.0, open=False, name=f"reft-{self.location}",
            check=ConnectionPool.check_connection,  # a restarted server leaves dead connections in the pool
            configure=None if idle_in_transaction_timeout_s is None else _idle_in_transaction_timeout(
                idle_in_transaction_timeout_s),
        )
        try:
            self.pool.open(wait=True, timeout=open_timeout_s)
        except psycopg.OperationalError as exc:
            self.pool.close()
            raise StoreUnavailableError(f"cannot connect to the store database {self.location}: {exc}") from exc

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Cursor]:
        """A cursor in one transaction (committed on success); `lock` names an advisory lock held until the end."""
        try:
            with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                if lock is not None:
                    cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
                yield cur
        # a session the server ended for sitting idle in its transaction (this process was frozen): rolled back
        except (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout) as exc:
            raise StoreUnavailableError(
                f"the store database {self.location} is unavailable ({str(exc).strip() or type(exc).__name__}); "
                "nothing was changed, retry shortly"
            ) from exc

    def migrate(self, component: str, migrations: Sequence[Sequence[str]]) -> None:
        """Apply `migrations[n:]` where the database has applied n of them for `component`."""
        with self.transaction(lock=_MIGRATION_LOCK) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_versions WHERE component=%s", (component,)).fetchone()
            found = 0 if row is None else int(row[0])
            if found > len(migrations):
                raise StoreError(
                    f"the {component} schema in {self.location} is version {found}, newer than this build's "
                    f"{len(migrations)}: upgrade reft-serve or use another database"
                )
            for statements in migrations[found:]:
                for statement in statements:
                    cur.execute(statement)  # type: ignore[call-overload]  # our own constant DDL
            if found < len(migrations):
                cur.execute("INSERT INTO schema_versions VALUES (%s, %s) ON CONFLICT (component) DO UPDATE "
                            "SET version=EXCLUDED.version", (component, len(migrations)))
                log.info("migrated the store schema", extra={"component": component, "from": found,
                                                               "to": len(migrations)})

    def close(self) -> None:
        self.pool.close()


def _idle_in_transaction_timeout(seconds: float) -> Callable[[psycopg.Connection[Any]], None]:
    def configure(conn: psycopg.Connection[Any]) -> None:  # on each new connection, for its whole session
        conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                     (f"{max(1, round(seconds * 1000))}ms",))
        conn.commit()  # the pool wants new connections idle, not inside the transaction SET opened
    return configure

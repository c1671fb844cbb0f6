"""Interventions on PostgreSQL: versions, current pointers and the artifact bytes in one database.

The same model as the local index (`adapters_store.index`): `versions` holds every retained version, `current` one
row per name (its pointer, public flag, and the highest number ever given), and `blobs` the artifact bytes by
sha256 (personas are KB-sized, so storing them beside their records makes a put one transaction: no orphan files,
no second system to back up). `versions.file_sha256` references `blobs` with ON DELETE RESTRICT, so a blob that
some version uses can never be removed, whatever races.

Every write takes the tenant's advisory lock first: the quota check, the version number, the insert and the
retention pruning of one tenant are serialised across all replicas, while other tenants write in parallel. The
tenants' uploaded training files (`training_files`) live here too and count in the same byte quota. Each
committed change sends a NOTIFY on the store's channel (`changes_channel`) naming what changed, so replicas drop
their cached view of it (see `adapters_store.postgres.changes`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import psycopg

from adapters_store.backend import MakeRecord, WriteRequest, admit, admit_file
from adapters_store.errors import InterventionNotFoundError, VersionIsCurrentError
from adapters_store.index import to_record, to_row
from adapters_store.jobs import JobLeaseLostError
from adapters_store.postgres.changes import ChangeListener
from adapters_store.postgres.db import Cursor, Database
from adapters_store.postgres.jobs import finish_job
from adapters_store.records import InterventionRecord, StorageQuota, TrainingFileRecord

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE blobs (file_sha256 TEXT PRIMARY KEY, payload BYTEA NOT NULL)",
        """CREATE TABLE versions (
            tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL,
            file_sha256 TEXT NOT NULL REFERENCES blobs ON DELETE RESTRICT, size_bytes BIGINT NOT NULL,
            base_model_id TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL, source TEXT NOT NULL,
            description TEXT NOT NULL, tags TEXT NOT NULL, training TEXT NOT NULL,
            PRIMARY KEY (tenant, name, version))""",
        "CREATE INDEX versions_file ON versions (file_sha256)",
        """CREATE TABLE current (
            tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, public BOOLEAN NOT NULL DEFAULT false,
            latest INTEGER NOT NULL, PRIMARY KEY (tenant, name))""",
        "CREATE INDEX current_public ON current (tenant, name) WHERE public",
    ),
    ("CREATE INDEX versions_digest ON versions (digest)",),  # engine replicas load by digest (Ray Serve)
    (  # uploaded training files (OpenAI's /v1/files), bytes in the row: counted in the tenant's byte quota
        """CREATE TABLE training_files (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
            size_bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, content BYTEA NOT NULL,
            seq BIGSERIAL NOT NULL)""",  # seq: upload order, for ties within one second
        "CREATE INDEX training_files_tenant ON training_files (tenant, created_at DESC, seq DESC)",
    ),
)
_COLUMNS = ("name, version, tenant, digest, file_sha256, size_bytes, base_model_id, config, created_at, source, "
            "description, tags, training")
_CURRENT = f"SELECT {_COLUMNS}, public FROM versions JOIN current USING (tenant, name, version)"
_VERSIONS = (f"SELECT {_COLUMNS}, (SELECT public FROM current c WHERE c.tenant = versions.tenant "
             "AND c.name = versions.name) FROM versions")
_KEY = "tenant=%s AND name=%s"
_FILE_COLUMNS = "id, tenant, filename, purpose, size_bytes, created_at"  # TrainingFileRecord's fields, in order


def changes_channel(cur: Cursor) -> str:
    """The NOTIFY channel of this database and schema (tests run many stores in one database, one schema each)."""
    schema = cur.execute("SELECT current_schema()").fetchone()
    return f"reft_changes_{(schema[0] if schema else 'public')}"[:63]


class PostgresBackend:
    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        self.db = Database(url, max_connections=max_connections)
        self.location = self.db.location
        self.read_only = False
        self._listeners: list[ChangeListener] = []
        try:
            self.db.migrate("artifacts", _MIGRATIONS)
            with self.db.transaction() as cur:
                self.channel = changes_channel(cur)
        except BaseException:
            self.db.close()
            raise

    # -- reads -----------------------------------------------------------------------------------------------------
    def current(self, tenant: str, name: str) -> InterventionRecord | None:
        return self._one(f"{_CURRENT} WHERE {_KEY}", (tenant, name))

    def version(self, tenant: str, name: str, version: int) -> InterventionRecord | None:
        return self._one(f"{_VERSIONS} WHERE {_KEY} AND version=%s", (tenant, name, version))

    def by_digest(self, digest: str) -> InterventionRecord | None:
        return self._one(f"{_VERSIONS} WHERE digest=%s LIMIT 1", (digest,))

    def history(self, tenant: str, name: str) -> tuple[list[InterventionRecord], int] | None:
        with self.db.transaction() as cur:  # one transaction: the list and the pointer agree
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            current = cur.execute(f"SELECT version FROM current WHERE {_KEY}", (tenant, name)).fetchone()
            if current is None:
                return None
            rows = cur.execute(f"{_VERSIONS} WHERE {_KEY} ORDER BY version DESC", (tenant, name)).fetchall()
        return [to_record(row) for row in rows], int(current[0])

    def list_current(self, tenant: str) -> list[InterventionRecord]:
        return self._all(f"{_CURRENT} WHERE tenant=%s ORDER BY name", (tenant,))

    def list_public(self) -> list[InterventionRecord]:
        return self._all(f"{_CURRENT} WHERE public ORDER BY tenant, name", ())

    def list_names(self) -> list[tuple[str, str]]:
        with self.db.transaction() as cur:
            return [(r[0], r[1]) for r in cur.execute("SELECT tenant, name FROM current ORDER BY 1, 2").fetchall()]

    def usage(self, tenant: str) -> tuple[int, int]:
        with self.db.transaction() as cur:
            return _usage(cur, tenant)

    def counts(self) -> tuple[int, int, int]:
        with self.db.transaction() as cur:
            interventions = cur.execute("SELECT COUNT(*) FROM current").fetchone()
            versions = cur.execute("SELECT COUNT(*) FROM versions").fetchone()
            size = cur.execute("SELECT COALESCE(SUM(octet_length(payload)), 0) FROM blobs b WHERE EXISTS "
                               "(SELECT 1 FROM versions v WHERE v.file_sha256 = b.file_sha256)").fetchone()
        assert interventions and versions and size
        return int(interventions[0]), int(versions[0]), int(size[0])

    def read_blob(self, file_sha256: str) -> bytes:
        with self.db.transaction() as cur:
            row = cur.execute("SELECT payload FROM blobs WHERE file_sha256=%s", (file_sha256,)).fetchone()
        if row is None:
            raise FileNotFoundError(file_sha256)
        return bytes(row[0])

    def blob_addresses(self) -> set[str]:
        with self.db.transaction() as cur:
            return {row[0] for row in cur.execute("SELECT file_sha256 FROM blobs").fetchall()}

    # -- writes ----------------------------------------------------------------------------------------------------
    def add_version(self, request: WriteRequest, payload: bytes, make: MakeRecord) -> InterventionRecord:
        tenant, name = request.tenant, request.name
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            previous = cur.execute(f"{_CURRENT} WHERE {_KEY}", (tenant, name)).fetchone()
            usage = None if request.quota is None else _usage(cur, tenant)
            admit(request, previous is not None, usage, lambda: _pruned_bytes(cur, request))
            latest = cur.execute(  # the highest number ever given: never reused, whatever was deleted
                "SELECT GREATEST(COALESCE((SELECT latest FROM current WHERE tenant=%s AND name=%s), 0), "
                "COALESCE((SELECT MAX(version) FROM versions WHERE tenant=%s AND name=%s), 0))", (tenant, name) * 2
            ).fetchone()
            assert latest is not None
            record = make(int(latest[0]) + 1, None if previous is None else to_record(previous))
            # identical bytes are stored once; a stored copy that differs (corrupted) is replaced by good bytes
            cur.execute("INSERT INTO blobs VALUES (%s, %s) ON CONFLICT (file_sha256) DO UPDATE "
                        "SET payload=EXCLUDED.payload WHERE blobs.payload IS DISTINCT FROM EXCLUDED.payload",
                        (record.file_sha256, payload))
            cur.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})", to_row(record))
            cur.execute("INSERT INTO current (tenant, name, version, latest) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (tenant, name) DO UPDATE SET version=EXCLUDED.version, latest=EXCLUDED.latest",
                        (tenant, name, record.version, record.version))  # a new version keeps the public flag
            _remove_unused_blobs(cur, _prune(cur, request))
            public = cur.execute(f"SELECT public FROM current WHERE {_KEY}", (tenant, name)).fetchone()
            if request.job is not None and not finish_job(cur, request.job.finish(record.version), request.job.owner):
                raise JobLeaseLostError(request.job.job_id)  # rolls the version back: another replica runs the job
            self._notify(cur, tenant, name)
        return dataclasses.replace(record, public=bool(public and public[0]))

    def set_public(self, tenant: str, name: str, public: bool) -> bool:
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            changed = cur.execute(f"UPDATE current SET public=%s WHERE {_KEY}", (public, tenant, name)).rowcount
            if changed:
                self._notify(cur, tenant, name)
        return bool(changed)

    def promote(self, tenant: str, name: str, version: int) -> InterventionRecord:
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            _retained(cur, tenant, name, version)
            cur.execute(f"UPDATE current SET version=%s WHERE {_KEY}", (version, tenant, name))
            row = cur.execute(f"{_CURRENT} WHERE {_KEY}", (tenant, name)).fetchone()
            self._notify(cur, tenant, name)
        assert row is not None
        return to_record(row)

    def delete_version(self, tenant: str, name: str, version: int) -> None:
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            if _retained(cur, tenant, name, version) == version:
                raise VersionIsCurrentError(name, version, tenant=tenant)
            rows = cur.execute(f"DELETE FROM versions WHERE {_KEY} AND version=%s RETURNING file_sha256",
                               (tenant, name, version)).fetchall()
            _remove_unused_blobs(cur, {row[0] for row in rows})
            self._notify(cur, tenant, name)

    def delete(self, tenant: str, name: str) -> bool:
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            if not cur.execute(f"DELETE FROM current WHERE {_KEY}", (tenant, name)).rowcount:
                return False
            rows = cur.execute(f"DELETE FROM versions WHERE {_KEY} RETURNING file_sha256", (tenant, name)).fetchall()
            _remove_unused_blobs(cur, {row[0] for row in rows})
            self._notify(cur, tenant, name)
        return True

    def gc(self) -> int:
        """Remove blobs no version references (a write removes its own; this catches what a race left)."""
        with self.db.transaction() as cur:
            unused = {row[0] for row in cur.execute(
                "SELECT file_sha256 FROM blobs b WHERE NOT EXISTS "
                "(SELECT 1 FROM versions v WHERE v.file_sha256 = b.file_sha256)").fetchall()}
            return _remove_unused_blobs(cur, unused)

    def latest(self, tenant: str, name: str) -> int:
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT latest FROM current WHERE {_KEY}", (tenant, name)).fetchone()
        return 0 if row is None else int(row[0])

    def import_name(self, versions: list[tuple[InterventionRecord, bytes]], current: int, public: bool,
                    latest: int) -> None:
        """Insert a name's versions as they were elsewhere (numbers, pointer, flag kept): `reft-serve admin migrate`."""
        tenant, name = versions[0][0].tenant, versions[0][0].name
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            for record, payload in versions:
                cur.execute("INSERT INTO blobs VALUES (%s, %s) ON CONFLICT (file_sha256) DO NOTHING",
                            (record.file_sha256, payload))
                cur.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})", to_row(record))
            cur.execute("INSERT INTO current (tenant, name, version, public, latest) VALUES (%s, %s, %s, %s, %s)",
                        (tenant, name, current, public, latest))
            self._notify(cur, tenant, name)

    # -- training files --------------------------------------------------------------------------------------------
    def put_file(self, record: TrainingFileRecord, content: bytes, quota: StorageQuota | None) -> None:
        """Insert the file; the quota is checked under the tenant's lock, like `add_version`, so concurrent uploads
        and artifact writes of one tenant cannot together overshoot it."""
        with self.db.transaction(lock=f"tenant:{record.tenant}") as cur:
            if quota is not None:
                admit_file(record.size_bytes, _usage(cur, record.tenant), quota)
            cur.execute(f"INSERT INTO training_files ({_FILE_COLUMNS}, content) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        dataclasses.astuple(record) + (content,))

    def file(self, tenant: str, file_id: str) -> TrainingFileRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT {_FILE_COLUMNS} FROM training_files WHERE tenant=%s AND id=%s",
                              (tenant, file_id)).fetchone()
        return None if row is None else TrainingFileRecord(*row)

    def read_file(self, tenant: str, file_id: str) -> bytes | None:
        with self.db.transaction() as cur:
            row = cur.execute("SELECT content FROM training_files WHERE tenant=%s AND id=%s",
                              (tenant, file_id)).fetchone()
        return None if row is None else bytes(row[0])

    def list_files(self, tenant: str, purpose: str | None) -> list[TrainingFileRecord]:
        query = f"SELECT {_FILE_COLUMNS} FROM training_files WHERE tenant=%s"
        params: tuple[str, ...] = (tenant,)
        if purpose is not None:
            query, params = query + " AND purpose=%s", (tenant, purpose)
        with self.db.transaction() as cur:
            query += " ORDER BY created_at DESC, seq DESC"
            rows = cur.execute(query, params).fetchall()  # type: ignore[call-overload]  # our own constant SQL
        return [TrainingFileRecord(*row) for row in rows]

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self.db.transaction(lock=f"tenant:{tenant}") as cur:
            return bool(cur.execute("DELETE FROM training_files WHERE tenant=%s AND id=%s", (tenant, file_id)).rowcount)

    def subscribe(self, on_change: Callable[[str, str], None], on_reset: Callable[[], None]) -> ChangeListener:
        """Call `on_change(tenant, name)` when any replica changes that name, `on_reset()` when changes may have been
        missed (see `ChangeListener`); stops at `close`."""
        listener = ChangeListener(self.db.url, self.channel, on_change, on_reset)
        self._listeners.append(listener)
        return listener

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self.db.close()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _notify(self, cur: Cursor, tenant: str, name: str) -> None:
        """Tell every replica (at commit, not before) that this name changed."""
        cur.execute("SELECT pg_notify(%s, %s)", (self.channel, json.dumps({"tenant": tenant, "name": name})))

    def _one(self, query: str, params: tuple[Any, ...]) -> InterventionRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(query, params).fetchone()  # type: ignore[call-overload]
        return None if row is None else to_record(row)

    def _all(self, query: str, params: tuple[Any, ...]) -> list[InterventionRecord]:
        with self.db.transaction() as cur:
            return [to_record(row) for row in cur.execute(query, params).fetchall()]  # type: ignore[call-overload]


def _usage(cur: Cursor, tenant: str) -> tuple[int, int]:
    """(current interventions, bytes of every retained version and training file) of one tenant: what its quotas
    count."""
    count = cur.execute("SELECT COUNT(*) FROM current WHERE tenant=%s", (tenant,)).fetchone()
    size = cur.execute("SELECT (SELECT COALESCE(SUM(size_bytes), 0) FROM versions WHERE tenant=%s) + "
                       "(SELECT COALESCE(SUM(size_bytes), 0) FROM training_files WHERE tenant=%s)",
                       (tenant, tenant)).fetchone()
    assert count is not None and size is not None
    return int(count[0]), int(size[0])


def _outside_retention(keep: int) -> str:
    """SQL condition for one name's rows beyond its newest `keep` versions (parameters: tenant, name twice)."""
    return (f"{_KEY} AND version NOT IN "
            f"(SELECT version FROM versions WHERE {_KEY} ORDER BY version DESC LIMIT {int(keep)})")


def _pruned_bytes(cur: Cursor, request: WriteRequest) -> int:
    """Bytes of the versions that the write's pruning will drop (the new version takes one kept place)."""
    if request.keep_versions is None:
        return 0
    key = (request.tenant, request.name)
    row = cur.execute(f"SELECT COALESCE(SUM(size_bytes), 0) FROM versions WHERE "  # type: ignore[call-overload]
                      f"{_outside_retention(request.keep_versions - 1)}", key + key).fetchone()
    return int(row[0])


def _prune(cur: Cursor, request: WriteRequest) -> set[str]:
    if request.keep_versions is None:
        return set()
    key = (request.tenant, request.name)
    rows = cur.execute(f"DELETE FROM versions WHERE {_outside_retention(request.keep_versions)} "  # type: ignore[call-overload]
                       "RETURNING file_sha256", key + key).fetchall()
    return {row[0] for row in rows}


def _retained(cur: Cursor, tenant: str, name: str, version: int) -> int:
    """The name's current version number, after checking that `version` of it exists."""
    current = cur.execute(f"SELECT version FROM current WHERE {_KEY}", (tenant, name)).fetchone()
    found = cur.execute(f"SELECT 1 FROM versions WHERE {_KEY} AND version=%s", (tenant, name, version)).fetchone()
    if current is None or found is None:
        raise InterventionNotFoundError(name, version, tenant=tenant)
    return int(current[0])


def _remove_unused_blobs(cur: Cursor, candidates: set[str]) -> int:
    """Delete the candidate blobs no version references, in a savepoint: if another tenant's write references one
    meanwhile, the foreign key refuses the delete and only the savepoint rolls back (gc retries later)."""
    if not candidates:
        return 0
    try:
        with cur.connection.transaction():
            return cur.execute("DELETE FROM blobs b WHERE file_sha256 = ANY(%s) AND NOT EXISTS "
                               "(SELECT 1 FROM versions v WHERE v.file_sha256 = b.file_sha256)",
                               (sorted(candidates),)).rowcount
    except psycopg.errors.ForeignKeyViolation:
        return 0

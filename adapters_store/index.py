"""The SQLite index (`<root>/index.sqlite3`): every version of every intervention, and which version is current.

This module owns the connection and all SQL. One connection is shared by the server's threadpool workers
(`check_same_thread=False`), so every use holds `self._lock`. Writes run in explicit `BEGIN IMMEDIATE`
transactions: a new version row and the move of the name's "current" pointer commit together or not at all, and
the same transaction checks the tenant's quota and drops versions beyond the retention count, so concurrent
writers (threads or processes) can never together exceed a quota that each checked alone. The
`meta` table records the schema version; opening an older index migrates it, a newer one is refused. A read-only
root opens the index read-only, so serving keeps working when writes cannot.

Versions: `current` holds one row per name, so a name has exactly one current version whatever happens; promoting
an old version moves that pointer in one UPDATE (no new row, no new bytes). `current.latest` is the highest version
number ever given to the name, so deleting the newest (non-current) version never lets its number be reused: a
client pinned to `name@3` can never silently get another artifact.

The same database holds the tenants' uploaded training files (`training_files`: id, metadata and the bytes in
the row; files are small), so that their bytes and the artifacts' count against one quota, checked in one
transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import quote

from adapters_store import usage as usage_counters
from adapters_store.backend import WriteRequest, admit, admit_file, prefix_bounds
from adapters_store.errors import InterventionNotFoundError, StoreError, VersionIsCurrentError
from adapters_store.records import InterventionRecord, StorageQuota, TrainingFileRecord

SCHEMA_VERSION = 5
_CREATED_VERSION = 4  # what `_CREATE` makes; a fresh index then runs the migrations from there
# uploaded training files (OpenAI's /v1/files), in this database so a file and an artifact count against one
# tenant quota, checked in one transaction
TRAINING_FILES_TABLE = """CREATE TABLE IF NOT EXISTS training_files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, content BLOB NOT NULL)"""
_CREATE = (
    """CREATE TABLE versions (
        tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
        digest TEXT NOT NULL, file_sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, base_model_id TEXT NOT NULL,
        config TEXT NOT NULL, created_at TEXT NOT NULL, source TEXT NOT NULL, description TEXT NOT NULL,
        tags TEXT NOT NULL, training TEXT NOT NULL,
        PRIMARY KEY (tenant, name, version))""",
    """CREATE TABLE current (
        tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, public INTEGER NOT NULL DEFAULT 0,
        latest INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, name))""",
    TRAINING_FILES_TABLE,
)
# statements that take schema version N to N+1
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE current ADD COLUMN public INTEGER NOT NULL DEFAULT 0",),  # admins can share an intervention
    2: ("ALTER TABLE current ADD COLUMN latest INTEGER NOT NULL DEFAULT 0",  # version numbers are never reused
        "UPDATE current SET latest = (SELECT MAX(version) FROM versions v "
        "WHERE v.tenant = current.tenant AND v.name = current.name)"),
    3: (TRAINING_FILES_TABLE,),  # fine-tuning files, counted in the tenant's bytes
    # at 100k names: quota checks read counters instead of summing the tenant's rows (adapters_store.usage), and
    # the reads by artifact (gc after a delete, loads by digest) use an index instead of scanning every version
    4: usage_counters.SQLITE + ("CREATE INDEX IF NOT EXISTS versions_file ON versions (file_sha256)",
                                "CREATE INDEX IF NOT EXISTS versions_digest ON versions (digest)",
                                "CREATE INDEX IF NOT EXISTS current_public ON current (tenant, name) WHERE public=1"),
}
_COLUMNS = (
    "name, version, tenant, digest, file_sha256, size_bytes, base_model_id, config, created_at, source, "
    "description, tags, training"
)
_FILE_COLUMNS = "id, tenant, filename, purpose, size_bytes, created_at"  # TrainingFileRecord's fields, in order
_CURRENT = f"SELECT {_COLUMNS}, public FROM versions JOIN current USING (tenant, name, version)"
# any version of a name, with the name's public flag (it belongs to the name, not to one version)
_VERSIONS = (f"SELECT {_COLUMNS}, (SELECT public FROM current c WHERE c.tenant = versions.tenant "
             "AND c.name = versions.name) FROM versions")

Row = tuple[Any, ...]


def to_record(row: Row) -> InterventionRecord:
    """A `versions` row, optionally followed by `current.public`."""
    (name, version, tenant, digest, file_sha, size, base_id, config, created, source, description, tags, training) = row[:13]
    return InterventionRecord(
        name=name, version=version, tenant=tenant, digest=digest, file_sha256=file_sha, size_bytes=size,
        base_model_id=base_id, config=json.loads(config), created_at=created, source=source,
        description=description, tags=tuple(json.loads(tags)), training=json.loads(training),
        public=bool(row[13]) if len(row) > 13 else False,
    )


def to_row(record: InterventionRecord) -> Row:
    return (
        record.name, record.version, record.tenant, record.digest, record.file_sha256, record.size_bytes,
        record.base_model_id, json.dumps(record.config), record.created_at, record.source, record.description,
        json.dumps(list(record.tags)), json.dumps(record.training),
    )


class Index:
    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.read_only = not writable
        self._lock = threading.Lock()
        if writable:
            try:
                self._db = self._open_writable()
                return
            except sqlite3.OperationalError as exc:
                # the database file itself is read-only: still serve reads (a busy lock is not a reason)
                if "readonly" not in str(exc) and "unable to open" not in str(exc):
                    raise
                self.read_only = True
        self._db = self._open_read_only()

    # -- reads -----------------------------------------------------------------------------------------------------
    def current(self, tenant: str, name: str) -> InterventionRecord | None:
        with self._lock:
            row = self._db.execute(f"{_CURRENT} WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        return None if row is None else to_record(row)

    def version(self, tenant: str, name: str, version: int) -> InterventionRecord | None:
        with self._lock:
            row = self._db.execute(f"{_VERSIONS} WHERE tenant=? AND name=? AND version=?",
                                   (tenant, name, version)).fetchone()
        return None if row is None else to_record(row)

    def by_digest(self, digest: str) -> InterventionRecord | None:
        """Any version whose artifact has this content digest (every such version has the same weights)."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM versions WHERE digest = ? LIMIT 1", (digest,)).fetchone()
        return to_record(row) if row else None

    def history(self, tenant: str, name: str) -> tuple[list[InterventionRecord], int] | None:
        """Every retained version of the name, newest first, and the current version number (None: no such name).
        One read under the lock, so the list and the pointer agree."""
        with self._lock:
            current = self._db.execute("SELECT version FROM current WHERE tenant=? AND name=?",
                                       (tenant, name)).fetchone()
            if current is None:
                return None
            rows = self._db.execute(f"{_VERSIONS} WHERE tenant=? AND name=? ORDER BY version DESC",
                                    (tenant, name)).fetchall()
        return [to_record(row) for row in rows], int(current[0])

    def list_current(self, tenant: str, after: str = "", limit: int | None = None) -> list[InterventionRecord]:
        with self._lock:  # a page is a range of the primary key: its cost does not grow with the registry
            rows = self._db.execute(f"{_CURRENT} WHERE tenant=? AND name > ? ORDER BY name LIMIT ?",
                                    (tenant, after, -1 if limit is None else limit)).fetchall()
        return [to_record(row) for row in rows]

    def list_names(self) -> list[tuple[str, str]]:
        """(tenant, name) of every name with a current version."""
        with self._lock:
            return [(row[0], row[1]) for row in self._db.execute("SELECT tenant, name FROM current ORDER BY 1, 2")]

    def visible_names(self, tenant: str, prefix: str, limit: int) -> list[str]:
        low, high = prefix_bounds(prefix)
        with self._lock:
            own = self._db.execute("SELECT name FROM current WHERE tenant=? AND name >= ? AND name < ? "
                                   "ORDER BY name LIMIT ?", (tenant, low, high, limit)).fetchall()
            shared = self._db.execute("SELECT tenant || '/' || name FROM current WHERE public=1 AND tenant <> ? AND "
                                      "tenant >= ? AND tenant < ? ORDER BY tenant, name LIMIT ?",
                                      (tenant, low, high, limit)).fetchall()
        return [row[0] for row in own + shared]

    def list_public(self, after: tuple[str, str] = ("", ""), limit: int | None = None,
                    exclude: str = "") -> list[InterventionRecord]:
        with self._lock:
            rows = self._db.execute(f"{_CURRENT} WHERE public=1 AND tenant <> ? AND (tenant, name) > (?, ?) "
                                    "ORDER BY tenant, name LIMIT ?",
                                    (exclude, *after, -1 if limit is None else limit)).fetchall()
        return [to_record(row) for row in rows]

    def usage(self, tenant: str) -> tuple[int, int]:
        """(current interventions, bytes of every retained version) of one tenant: what its quotas count."""
        with self._lock:
            return self._usage(tenant)

    def _usage(self, tenant: str) -> tuple[int, int]:
        # every retained version counts, not just the current one: old versions occupy the disk too; and so do the
        # tenant's uploaded training files. Triggers keep these sums in `tenant_usage` (one row, not a scan).
        row = self._db.execute(usage_counters.READ.format("?"), (tenant,)).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def check_write(self, request: WriteRequest) -> None:
        """Raise what `add_version` would raise for the name's state or the tenant's quota (a read, no write)."""
        with self._lock:
            self._admit(request)

    def referenced_files(self, among: set[str] | None = None) -> set[str]:
        """Files some version references (only those in `among`, when given)."""
        if among is None:  # every version (gc): read beside the requests, which keep the shared connection
            with self._reader() as db:
                return {row[0] for row in db.execute("SELECT DISTINCT file_sha256 FROM versions")}
        with self._lock:
            candidates = sorted(among)
            marks = ", ".join("?" * len(candidates))
            query = f"SELECT DISTINCT file_sha256 FROM versions WHERE file_sha256 IN ({marks})"
            return {row[0] for row in self._db.execute(query, candidates)} if candidates else set()

    def counts(self) -> tuple[int, int, int]:
        """(current interventions, versions, bytes of distinct referenced files) over all tenants."""
        with self._reader() as db:
            return self._counts(db)

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own for a read that scans every version (100s of ms at 100k names), so requests
        never wait for it on the shared connection's lock (WAL: a reader waits for nobody). A read-only index
        has no WAL to read beside: there the shared connection serves, under its lock."""
        if self.read_only:
            with self._lock:
                yield self._db
            return
        with closing(sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True)) as db:
            yield db

    @staticmethod
    def _counts(db: sqlite3.Connection) -> tuple[int, int, int]:
        interventions = db.execute("SELECT COUNT(*) FROM current").fetchone()[0]
        versions = db.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
        # shared files are stored once, so count each address once: this is what the store occupies on disk
        size = db.execute(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM (SELECT DISTINCT file_sha256, size_bytes FROM versions)"
        ).fetchone()[0]
        return int(interventions), int(versions), int(size)

    # -- writes ----------------------------------------------------------------------------------------------------
    def add_version(
        self, request: WriteRequest, make: Callable[[int, InterventionRecord | None], InterventionRecord]
    ) -> tuple[InterventionRecord, set[str]]:
        """In one transaction: check the name's state and the quota, insert `make(next_version, current_record)`,
        make it current, and drop versions beyond `request.keep_versions`. Returns the record and the files of
        dropped versions."""
        tenant, name = request.tenant, request.name
        with self._transaction():
            self._admit(request)  # inside the write transaction: concurrent writers cannot all pass one check
            previous = self._db.execute(f"{_CURRENT} WHERE tenant=? AND name=?", (tenant, name)).fetchone()
            # the highest number ever given (not the current pointer, which a promote moves back): never reused
            latest = self._db.execute(
                "SELECT MAX(COALESCE((SELECT latest FROM current WHERE tenant=? AND name=?), 0), "
                "COALESCE((SELECT MAX(version) FROM versions WHERE tenant=? AND name=?), 0))", (tenant, name) * 2
            ).fetchone()[0]
            record = make(int(latest) + 1, None if previous is None else to_record(previous))
            self._insert(record)
            dropped = self._prune(request)
            public = self._db.execute("SELECT public FROM current WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        return dataclasses.replace(record, public=bool(public[0])), dropped

    def _admit(self, request: WriteRequest) -> None:
        tenant, name = request.tenant, request.name
        exists = self._db.execute("SELECT 1 FROM current WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        usage = None if request.quota is None else self._usage(tenant)
        admit(request, exists is not None, usage, lambda: self._pruned_bytes(request))

    @staticmethod
    def _outside_retention(keep: int) -> str:
        """SQL condition for one name's rows beyond its newest `keep` versions (parameters: tenant, name twice)."""
        return ("tenant=? AND name=? AND version NOT IN "
                f"(SELECT version FROM versions WHERE tenant=? AND name=? ORDER BY version DESC LIMIT {int(keep)})")

    def _pruned_bytes(self, request: WriteRequest) -> int:
        """Bytes of the versions that the write's pruning will drop (the new version takes one kept place)."""
        if request.keep_versions is None:
            return 0
        where = self._outside_retention(request.keep_versions - 1)
        key = (request.tenant, request.name)
        return int(self._db.execute(f"SELECT COALESCE(SUM(size_bytes), 0) FROM versions WHERE {where}",
                                    key + key).fetchone()[0])

    def _prune(self, request: WriteRequest) -> set[str]:
        if request.keep_versions is None:
            return set()
        where = self._outside_retention(request.keep_versions)
        key = (request.tenant, request.name)
        dropped = {row[0] for row in self._db.execute(f"SELECT file_sha256 FROM versions WHERE {where}", key + key)}
        self._db.execute(f"DELETE FROM versions WHERE {where}", key + key)
        return dropped

    def _insert(self, record: InterventionRecord) -> None:
        placeholders = ", ".join("?" * len(_COLUMNS.split(",")))
        self._db.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES ({placeholders})", to_row(record))
        current = (record.tenant, record.name, record.version)
        # a new version keeps the name's public flag
        self._db.execute("INSERT INTO current (tenant, name, version, latest) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (tenant, name) DO UPDATE SET version=excluded.version, latest=excluded.latest",
                         current + (record.version,))

    def promote(self, tenant: str, name: str, version: int) -> InterventionRecord:
        """Make a retained version current again: one UPDATE of the name's pointer (no new row, no new bytes)."""
        with self._transaction():
            self._retained(tenant, name, version)
            self._db.execute("UPDATE current SET version=? WHERE tenant=? AND name=?", (version, tenant, name))
            row = self._db.execute(f"{_CURRENT} WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        return to_record(row)

    def delete_version(self, tenant: str, name: str, version: int) -> set[str]:
        """Remove one non-current version; return its file (the caller removes it if nothing else references it)."""
        with self._transaction():
            current = self._retained(tenant, name, version)
            if current == version:
                raise VersionIsCurrentError(name, version, tenant=tenant)
            key = (tenant, name, version)
            files = {row[0] for row in self._db.execute(
                "SELECT file_sha256 FROM versions WHERE tenant=? AND name=? AND version=?", key)}
            self._db.execute("DELETE FROM versions WHERE tenant=? AND name=? AND version=?", key)
        return files

    def _retained(self, tenant: str, name: str, version: int) -> int:
        """The name's current version number, after checking that `version` of it exists (in a transaction)."""
        current = self._db.execute("SELECT version FROM current WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        found = self._db.execute("SELECT 1 FROM versions WHERE tenant=? AND name=? AND version=?",
                                 (tenant, name, version)).fetchone()
        if current is None or found is None:
            raise InterventionNotFoundError(name, version, tenant=tenant)
        return int(current[0])

    def set_public(self, tenant: str, name: str, public: bool) -> bool:
        """Mark the name public (or private); False when it has no current version."""
        with self._transaction():
            return bool(self._db.execute("UPDATE current SET public=? WHERE tenant=? AND name=?",
                                         (int(public), tenant, name)).rowcount)

    def delete(self, tenant: str, name: str) -> set[str] | None:
        """Remove every version of the name; return their files, or None when it had no current version."""
        with self._transaction():
            if not self._db.execute("DELETE FROM current WHERE tenant=? AND name=?", (tenant, name)).rowcount:
                return None
            rows = self._db.execute("SELECT file_sha256 FROM versions WHERE tenant=? AND name=?", (tenant, name))
            files = {row[0] for row in rows}
            self._db.execute("DELETE FROM versions WHERE tenant=? AND name=?", (tenant, name))
        return files

    def latest(self, tenant: str, name: str) -> int:
        """The highest version number ever given to the name (0: none)."""
        with self._lock:
            row = self._db.execute("SELECT latest FROM current WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        return 0 if row is None else int(row[0])

    def import_name(self, records: list[InterventionRecord], current: int, public: bool, latest: int) -> None:
        """Insert a name's versions as they were elsewhere (numbers, pointer, flag kept): `reft-serve admin migrate`."""
        tenant, name = records[0].tenant, records[0].name
        with self._transaction():
            for record in records:
                placeholders = ", ".join("?" * len(_COLUMNS.split(",")))
                self._db.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES ({placeholders})", to_row(record))
            self._db.execute("INSERT INTO current (tenant, name, version, public, latest) VALUES (?, ?, ?, ?, ?)",
                             (tenant, name, current, int(public), latest))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- training files --------------------------------------------------------------------------------------------
    def put_file(self, record: TrainingFileRecord, content: bytes, quota: StorageQuota | None) -> None:
        """Insert the file, after checking the tenant's bytes against `quota` in the same transaction."""
        with self._transaction():
            if quota is not None:
                admit_file(record.size_bytes, self._usage(record.tenant), quota)
            self._db.execute(f"INSERT INTO training_files ({_FILE_COLUMNS}, content) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             dataclasses.astuple(record) + (content,))

    def file(self, tenant: str, file_id: str) -> TrainingFileRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_FILE_COLUMNS} FROM training_files WHERE tenant=? AND id=?",
                                   (tenant, file_id)).fetchone()
        return None if row is None else TrainingFileRecord(*row)

    def read_file(self, tenant: str, file_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT content FROM training_files WHERE tenant=? AND id=?",
                                   (tenant, file_id)).fetchone()
        return None if row is None else bytes(row[0])

    def list_files(self, tenant: str, purpose: str | None) -> list[TrainingFileRecord]:
        """The tenant's files, newest first (ties in the same second: the later upload first)."""
        query = f"SELECT {_FILE_COLUMNS} FROM training_files WHERE tenant=?"
        params: tuple[str, ...] = (tenant,)
        if purpose is not None:
            query, params = query + " AND purpose=?", (tenant, purpose)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC, rowid DESC", params).fetchall()
        return [TrainingFileRecord(*row) for row in rows]

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._transaction():
            return bool(self._db.execute("DELETE FROM training_files WHERE tenant=? AND id=?",
                                         (tenant, file_id)).rowcount)

    # -- opening ---------------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock between processes
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _open_writable(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            db.execute("PRAGMA synchronous=FULL")  # a committed put survives power loss, like its file
            self._db = db
            with self._transaction():
                self._prepare_schema()
        except BaseException:
            db.close()
            raise
        return db

    def _prepare_schema(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        found = self._schema_version()
        if found is None:
            for statement in _CREATE:
                self._db.execute(statement)
            found = _CREATED_VERSION
        while found < SCHEMA_VERSION:
            for statement in _MIGRATIONS[found]:
                self._db.execute(statement)
            found += 1
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(found),))

    def _schema_version(self) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            return None
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store index {self.path} has schema version {version}, newer than this build's "
                f"{SCHEMA_VERSION}: upgrade reft-serve or use another data directory"
            )
        return version

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise StoreError(f"the store at {self.path.parent} is read-only and has no index to serve from")
        uri = f"file:{quote(str(self.path))}?mode=ro"
        # a WAL database needs its -shm file; when the last writer removed it and the directory is read-only it
        # cannot be created, so fall back to `immutable` (the WAL was checkpointed into the file at that close)
        for suffix in ("", "&immutable=1"):
            db = sqlite3.connect(uri + suffix, uri=True, check_same_thread=False, isolation_level=None)
            self._db = db
            try:
                version = self._schema_version()
            except sqlite3.OperationalError:
                db.close()
                continue
            if version != SCHEMA_VERSION:
                db.close()
                raise StoreError(f"the store index {self.path} needs a migration, which a read-only store cannot do")
            return db
        raise StoreError(f"cannot open the store index {self.path} read-only")

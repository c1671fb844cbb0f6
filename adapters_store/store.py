"""The artifact store: a SQLite index plus content-addressed artifact files under one root directory.

The store is the only writer under its root. A `put` validates the artifact completely in memory first (format,
digest, base model), writes the file atomically, and only then commits the index row, in one transaction that also
moves the name's "current" pointer: readers see the old version or the new one, never a half-written state. A
crash between the file write and the commit leaves an unreferenced file that `gc()` removes. Every read re-checks
the file's hash, so a corrupted file makes that one intervention unavailable (with the reason) and nothing else.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from adapters_store.errors import (
    ArtifactUnavailableError,
    InterventionExistsError,
    InterventionNotFoundError,
    StoreWriteError,
)
from adapters_store.files import ArtifactFiles
from adapters_store.records import InterventionRecord, validate_name
from reft_core.artifact import Artifact, decode_artifact
from reft_core.fingerprint import ModelFingerprint

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    digest TEXT NOT NULL, file_sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, base_model_id TEXT NOT NULL,
    config TEXT NOT NULL, created_at TEXT NOT NULL, source TEXT NOT NULL, description TEXT NOT NULL,
    tags TEXT NOT NULL, training TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version)
);
CREATE TABLE IF NOT EXISTS current (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (tenant, name)
);
"""
_COLUMNS = (
    "name, version, tenant, digest, file_sha256, size_bytes, base_model_id, config, created_at, source, "
    "description, tags, training"
)


@dataclass(frozen=True)
class StoreStats:
    interventions: int
    versions: int
    bytes: int


def _row_to_record(row: tuple) -> InterventionRecord:
    (name, version, tenant, digest, file_sha, size, base_id, config, created, source, description, tags, training) = row
    return InterventionRecord(
        name=name, version=version, tenant=tenant, digest=digest, file_sha256=file_sha, size_bytes=size,
        base_model_id=base_id, config=json.loads(config), created_at=created, source=source,
        description=description, tags=tuple(json.loads(tags)), training=json.loads(training),
    )


class ArtifactStore:
    def __init__(self, root: Path, base_model: ModelFingerprint) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self.files = ArtifactFiles(self.root)
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # a read-only root that already exists still serves reads
        self.read_only = not os.access(self.root, os.W_OK)
        database = self.root / "index.sqlite3"
        if self.read_only:
            self._db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- reads -----------------------------------------------------------------------------------------------------
    def get(self, name: str, tenant: str = "default") -> InterventionRecord:
        validate_name(name)
        row = self._one(
            f"SELECT {_COLUMNS} FROM versions JOIN current USING (tenant, name, version) WHERE tenant=? AND name=?",
            (tenant, name),
        )
        if row is None:
            raise InterventionNotFoundError(name)
        return _row_to_record(row)

    def get_version(self, name: str, version: int, tenant: str = "default") -> InterventionRecord:
        validate_name(name)
        row = self._one(f"SELECT {_COLUMNS} FROM versions WHERE tenant=? AND name=? AND version=?", (tenant, name, version))
        if row is None:
            raise InterventionNotFoundError(name, version)
        return _row_to_record(row)

    def list(self, tenant: str = "default") -> list[InterventionRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM versions JOIN current USING (tenant, name, version) WHERE tenant=? "
                "ORDER BY name",
                (tenant,),
            ).fetchall()
        return [_row_to_record(row) for row in rows]

    def read_artifact(self, record: InterventionRecord) -> bytes:
        import hashlib

        try:
            payload = self.files.read(record.file_sha256)
        except FileNotFoundError:
            raise ArtifactUnavailableError(f"artifact of '{record.name}' v{record.version} is unavailable: file missing") from None
        if hashlib.sha256(payload).hexdigest() != record.file_sha256:
            raise ArtifactUnavailableError(
                f"artifact of '{record.name}' v{record.version} is unavailable: corrupt on disk (digest mismatch)"
            )
        return payload

    def load(self, record: InterventionRecord) -> Artifact:
        return decode_artifact(self.read_artifact(record), base_model=self.base_model)

    def stats(self) -> StoreStats:
        with self._lock:
            current = self._db.execute("SELECT COUNT(*) FROM current").fetchone()[0]
            versions, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM versions").fetchone()
        return StoreStats(interventions=current, versions=versions, bytes=size)

    # -- writes ----------------------------------------------------------------------------------------------------
    def put(
        self,
        name: str,
        payload: bytes,
        *,
        tenant: str = "default",
        description: str = "",
        tags: Iterable[str] = (),
        source: str = "upload",
        replace: bool = False,
    ) -> InterventionRecord:
        """Validate and store an artifact as `name` (new name, or a new version when `replace`)."""
        validate_name(name)
        artifact = decode_artifact(payload, base_model=self.base_model)  # in memory, before touching disk
        self._check_writable()
        with self._writing():
            file_sha256 = self.files.write(payload)
        with self._lock, self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT version FROM current WHERE tenant=? AND name=?", (tenant, name)).fetchone()
                if row is None and replace:
                    raise InterventionNotFoundError(name)
                if row is not None and not replace:
                    raise InterventionExistsError(name)
                latest = self._db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM versions WHERE tenant=? AND name=?", (tenant, name)
                ).fetchone()[0]
                record = InterventionRecord(
                    name=name, version=latest + 1, tenant=tenant, digest=artifact.digest, file_sha256=file_sha256,
                    size_bytes=len(payload), base_model_id=artifact.base_model.id,
                    config=artifact.intervention.config.to_dict(),
                    created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), source=source,
                    description=description, tags=tuple(tags), training=artifact.training,
                )
                self._insert(record)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return record

    def _insert(self, record: InterventionRecord) -> None:
        self._db.execute(
            f"INSERT INTO versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.name, record.version, record.tenant, record.digest, record.file_sha256, record.size_bytes,
                record.base_model_id, json.dumps(record.config), record.created_at, record.source,
                record.description, json.dumps(list(record.tags)), json.dumps(record.training),
            ),
        )
        self._db.execute("INSERT OR REPLACE INTO current VALUES (?, ?, ?)", (record.tenant, record.name, record.version))

    def delete(self, name: str, tenant: str = "default") -> None:
        validate_name(name)
        self._check_writable()
        with self._lock, self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = self._db.execute("DELETE FROM current WHERE tenant=? AND name=?", (tenant, name)).rowcount
                if not gone:
                    raise InterventionNotFoundError(name)
                self._db.execute("DELETE FROM versions WHERE tenant=? AND name=?", (tenant, name))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def gc(self) -> int:
        """Remove artifact files no record references, and leftovers of interrupted writes."""
        self._check_writable()
        with self._lock:
            referenced = {row[0] for row in self._db.execute("SELECT DISTINCT file_sha256 FROM versions")}
        removed = 0
        for path in self.files.all_files():
            if path.stem not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        for path in self.files.temp_files():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _one(self, query: str, params: tuple) -> tuple | None:
        with self._lock:
            return self._db.execute(query, params).fetchone()

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreWriteError(f"the store at {self.root} is read-only: serving works, writes are refused")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            reason = "disk full" if getattr(exc, "errno", None) == errno.ENOSPC or "full" in str(exc) else str(exc)
            raise StoreWriteError(f"could not write to the store ({reason}); nothing stored was changed") from None

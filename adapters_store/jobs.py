"""Training jobs, persisted: what was asked, where it stands, and how it ended (SQLite, `<root>/jobs.sqlite3`).

A job is never silently lost: on start-up `recover_interrupted` marks jobs that were queued or running when the
previous process died as failed, with that reason.

The record grows additively: fields beyond the original columns (validation losses, evaluation, ...) are kept as
one JSON object in the `extra` column, added to older databases on open, so a new field needs no migration.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from adapters_store.errors import StoreError, StoreWriteError
from adapters_store.sqlite_db import open_database

JOB_INTERRUPTED = "job_interrupted"  # the error code of a job whose process (or replica) stopped while it ran


class JobStatus(str, Enum):
    """Where a training job stands; one value per state, stored and returned as its string."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


STATUSES = tuple(status.value for status in JobStatus)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, spec TEXT NOT NULL,
    progress TEXT NOT NULL, losses TEXT NOT NULL, error TEXT, created_at TEXT NOT NULL, started_at TEXT,
    finished_at TEXT, result_version INTEGER
);
"""
_COLUMNS = ("id", "tenant", "name", "status", "spec", "progress", "losses", "error", "created_at", "started_at",
            "finished_at", "result_version")


class JobNotFoundError(StoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"training job '{job_id}' does not exist")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    status: JobStatus
    spec: dict[str, Any]
    tenant: str = "default"
    progress: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    error: str | None = None
    created_at: str = field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    result_version: int | None = None
    # -- kept in the `extra` column (additive: a record written by an older build reads with their defaults) --
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each finished epoch
    validation_losses: list[float] = field(default_factory=list)  # one per finished epoch, with validation data
    auto_stop: dict[str, Any] | None = None  # epochs="auto": epochs_run, kept_epoch, reason, monitor
    evaluation: dict[str, Any] | None = None  # samples (prompt, persona, base) and validation_loss, at the end
    # why a failed job failed, as a code of the API's error table (server.generation: the same code a request gets
    # for the same cause), beside the human message in `error`
    error_code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobStore:
    def __init__(self, root: Path) -> None:
        self._db, self.read_only = open_database(Path(root) / "jobs.sqlite3", _SCHEMA)
        self._lock = threading.Lock()
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        self._has_extra = "extra" in columns
        if not self._has_extra and not self.read_only:  # a database from before the column existed
            self._db.execute("ALTER TABLE jobs ADD COLUMN extra TEXT NOT NULL DEFAULT '{}'")
            self._has_extra = True
        self._select = f"SELECT {', '.join(_COLUMNS)}{', extra' if self._has_extra else ''} FROM jobs"

    def save(self, job: JobRecord) -> None:
        assert job.status in STATUSES
        if self.read_only:
            raise StoreWriteError(f"cannot record training job {job.id}: the data directory is read-only")
        row = (job.id, job.tenant, job.name, JobStatus(job.status).value, json.dumps(job.spec), json.dumps(job.progress),
               json.dumps(job.losses), job.error, job.created_at, job.started_at, job.finished_at, job.result_version,
               extra_json(job))
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}, extra) VALUES "
                             f"({', '.join('?' * (len(_COLUMNS) + 1))})", row)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute(f"{self._select} WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return record_from_row(row)

    def list(self, tenant: str = "default") -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"{self._select} WHERE tenant=? ORDER BY created_at", (tenant,)).fetchall()
        return [record_from_row(row) for row in rows]

    def recover_interrupted(self) -> list[JobRecord]:
        """Mark jobs left queued/running by a previous process as failed; return them (none when read-only)."""
        if self.read_only:
            return []
        recovered = []
        for job in [j for j in self._all() if j.status.active]:
            failed = replace(job, status=JobStatus.FAILED, finished_at=now(), error_code=JOB_INTERRUPTED,
                             error=f"the server restarted while this job was {job.status.value}; submit it again")
            self.save(failed)
            recovered.append(failed)
        return recovered

    def all(self) -> list[JobRecord]:
        return self._all()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self) -> list[JobRecord]:
        with self._lock:
            return [record_from_row(row) for row in self._db.execute(self._select).fetchall()]


_KNOWN = {f.name for f in fields(JobRecord)}


def open_jobs(location: Path | str, *, lease_s: float | None = None) -> JobStore:
    """Jobs in a directory (`jobs.sqlite3`), or in the PostgreSQL database of a `postgresql://` store URL."""
    from adapters_store.backend import is_postgres_url, sqlite_path

    if is_postgres_url(location):
        from adapters_store.postgres.jobs import PostgresJobStore

        lease = {} if lease_s is None else {"lease_s": lease_s}
        return PostgresJobStore(str(location), **lease)  # type: ignore[return-value]  # same methods, duck-typed
    return JobStore(sqlite_path(location))


def extra_json(job: JobRecord) -> str:
    """The fields kept in the `extra` column, as JSON."""
    return json.dumps({name: value for name, value in job.to_dict().items() if name not in _COLUMNS})


def record_from_row(row: tuple) -> JobRecord:
    """A job from its 12 columns and, optionally, its `extra` JSON (the SQLite and PostgreSQL stores share it)."""
    (job_id, tenant, name, status, spec, progress, losses, error, created, started, finished, version) = row[:12]
    extra = json.loads(row[12]) if len(row) > 12 and row[12] else {}
    known = {k: v for k, v in extra.items() if k in _KNOWN}  # a field of a newer build is ignored, not an error
    return JobRecord(job_id, name, JobStatus(status), json.loads(spec), tenant, json.loads(progress), json.loads(losses), error,
                     created, started, finished, version, **known)

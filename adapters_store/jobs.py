"""Training jobs, persisted: what was asked, where it stands, and how it ended (SQLite, `<root>/jobs.sqlite3`).

A job is never silently lost: on start-up `recover_interrupted` marks jobs that were queued or running when the
previous process died as failed, with that reason.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from adapters_store.errors import StoreError, StoreWriteError
from adapters_store.sqlite_db import open_database

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobStore:
    def __init__(self, root: Path) -> None:
        self._db, self.read_only = open_database(Path(root) / "jobs.sqlite3", _SCHEMA)
        self._lock = threading.Lock()

    def save(self, job: JobRecord) -> None:
        assert job.status in STATUSES
        if self.read_only:
            raise StoreWriteError(f"cannot record training job {job.id}: the data directory is read-only")
        row = (job.id, job.tenant, job.name, JobStatus(job.status).value, json.dumps(job.spec), json.dumps(job.progress),
               json.dumps(job.losses), job.error, job.created_at, job.started_at, job.finished_at, job.result_version)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return _record(row)

    def list(self, tenant: str = "default") -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE tenant=? ORDER BY created_at", (tenant,)).fetchall()
        return [_record(row) for row in rows]

    def recover_interrupted(self) -> list[JobRecord]:
        """Mark jobs left queued/running by a previous process as failed; return them (none when read-only)."""
        if self.read_only:
            return []
        recovered = []
        for job in [j for j in self._all() if j.status.active]:
            failed = replace(job, status=JobStatus.FAILED, finished_at=now(),
                             error=f"the server restarted while this job was {job.status.value}; submit it again")
            self.save(failed)
            recovered.append(failed)
        return recovered

    def _all(self) -> list[JobRecord]:
        with self._lock:
            return [_record(row) for row in self._db.execute("SELECT * FROM jobs").fetchall()]


def _record(row: tuple) -> JobRecord:
    (job_id, tenant, name, status, spec, progress, losses, error, created, started, finished, version) = row
    return JobRecord(job_id, name, JobStatus(status), json.loads(spec), tenant, json.loads(progress), json.loads(losses), error,
                     created, started, finished, version)

"""Training jobs, persisted: what was asked, where it stands, and how it ended (SQLite, `<root>/jobs.sqlite3`).

A job is never silently lost: on start-up `recover_interrupted` marks jobs that were queued or running when the
previous process died as failed, with that reason (one process owns this store, so nothing else could run them).

The record grows additively: fields beyond the original columns (validation losses, evaluation, ...) are kept as
one JSON object in the `extra` column, added to older databases on open, so a new field needs no migration. The
job's training input (`input`: tokenized examples, validation, eval prompts; see server/training_input.py) is kept
in a column of its own while the job is active, so it is never part of the record that the API returns, and is
dropped when the job ends. The PostgreSQL store (adapters_store/postgres/jobs.py) has the same methods and more:
there the jobs are a queue that every replica claims from.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from adapters_store.errors import StoreError, StoreWriteError
from adapters_store.sqlite_db import open_database

JOB_INTERRUPTED = "job_interrupted"  # the error code of a job whose process (or replica) stopped while it ran
FINAL = ("succeeded", "failed", "cancelled")


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


class TooManyJobsError(StoreError):
    """Submitting would pass a limit on active (queued + running) jobs: all of them, or one tenant's."""

    def __init__(self, active: int, limit: int, *, tenant: bool) -> None:
        super().__init__(f"this tenant has {active} training jobs queued or running; its limit is {limit}" if tenant
                         else f"{active} training jobs are already queued or running; the limit is {limit}")


class JobLeaseLostError(StoreError):
    """This replica no longer holds the job (its lease ran out and another replica claimed it, or it ended): its
    run must stop and register nothing."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"training job '{job_id}' is no longer held by this replica")


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
    attempts: int = 0  # runs started (PostgreSQL: each claim by a replica, less those released by a clean shutdown;
    # a job is failed after job_max_attempts)
    replica: str | None = None  # the replica that claimed it last (PostgreSQL), for operators

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobResult:
    """The training job a new version is the result of: its id is recorded with the version. On PostgreSQL the
    version is written only while `owner` still holds the job, and the job's final record (`finish(version)`) is
    written in the same transaction, so a job that lost its lease registers nothing and one that registered is never
    run again. The local store has one process and no leases: its caller records the end itself."""

    job_id: str
    owner: str | None
    finish: Callable[[int], JobRecord]


class JobStore:
    shared = False  # one process: jobs run where they were submitted (PostgreSQL: a queue shared by replicas)
    owner = None

    def __init__(self, root: Path) -> None:
        self._db, self.read_only = open_database(Path(root) / "jobs.sqlite3", _SCHEMA)
        self._lock = threading.Lock()
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        self._has_extra = "extra" in columns
        if not self.read_only:  # a database from before a column existed
            if not self._has_extra:
                self._db.execute("ALTER TABLE jobs ADD COLUMN extra TEXT NOT NULL DEFAULT '{}'")
                self._has_extra = True
            if "input" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN input TEXT")
        self._select = f"SELECT {', '.join(_COLUMNS)}{', extra' if self._has_extra else ''} FROM jobs"

    def save(self, job: JobRecord) -> None:
        """Insert or update the record (its stored input is kept while the job is active, dropped when it ends)."""
        self._check_writable(job)
        with self._lock:
            self._write(job)

    def update(self, job: JobRecord) -> bool:
        """The running job's new state (True: still ours; always, with one process)."""
        self.save(job)
        return True

    def submit(self, job: JobRecord, training_input: dict[str, Any], max_active: int,
               max_for_tenant: int | None = None) -> None:
        """Insert a queued job with its input, unless the active jobs (all, or the tenant's) are at their limit
        (TooManyJobsError); the count and the insert hold the lock together (one process submits to this store)."""
        self._check_writable(job)
        with self._lock:
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(tenant=?), 0) FROM jobs WHERE status IN "
                                   "('queued', 'running')", (job.tenant,)).fetchone()
            admit_job(int(row[0]), int(row[1]), max_active, max_for_tenant)
            self._write(job, json.dumps(training_input))

    def _check_writable(self, job: JobRecord) -> None:
        assert job.status in STATUSES
        if self.read_only:
            raise StoreWriteError(f"cannot record training job {job.id}: the data directory is read-only")

    def _write(self, job: JobRecord, training_input: str | None = None) -> None:
        """Upsert the row (the caller holds the lock); `training_input` is set when given, kept otherwise, and
        dropped once the job has ended."""
        row = (job.id, job.tenant, job.name, JobStatus(job.status).value, json.dumps(job.spec), json.dumps(job.progress),
               json.dumps(job.losses), job.error, job.created_at, job.started_at, job.finished_at, job.result_version,
               extra_json(job), training_input)
        kept = "NULL" if JobStatus(job.status).value in FINAL else "COALESCE(excluded.input, input)"
        self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}, extra, input) VALUES "
                         f"({', '.join('?' * (len(_COLUMNS) + 2))}) ON CONFLICT (id) DO UPDATE SET "
                         + ", ".join(f"{c}=excluded.{c}" for c in (*_COLUMNS[1:], "extra")) + f", input={kept}", row)

    def request_cancel(self, job_id: str) -> JobRecord:
        """A cancel of a job this process does not run: with one process that is a job that has ended (or one
        between its insert and its start, which its submitter then runs): returned as it is."""
        return self.get(job_id)

    def release(self, job_id: str) -> None:
        """Nothing to do: another process never runs this store's jobs."""

    def abandon(self, job_id: str) -> None:
        """Nothing to do: a job whose end could not be stored is failed at the next start (recover_interrupted)."""

    def input(self, job_id: str) -> dict[str, Any] | None:
        """The stored training input of an active job (None once it ended, or for a job of an older build)."""
        with self._lock:
            row = self._db.execute("SELECT input FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return None if row[0] is None else json.loads(row[0])

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


def admit_job(active: int, tenant_active: int, max_active: int, max_for_tenant: int | None) -> None:
    """Raise TooManyJobsError if one more active job would pass a limit (counts read atomically with the insert)."""
    if active >= max_active:
        raise TooManyJobsError(active, max_active, tenant=False)
    if max_for_tenant is not None and tenant_active >= max_for_tenant:
        raise TooManyJobsError(tenant_active, max_for_tenant, tenant=True)


def open_jobs(location: Path | str, *, lease_s: float | None = None, max_attempts: int | None = None) -> JobStore:
    """Jobs in a directory (`jobs.sqlite3`), or in the PostgreSQL database of a `postgresql://` store URL
    (`lease_s`, `max_attempts`: see PostgresJobStore)."""
    from adapters_store.backend import is_postgres_url, sqlite_path

    if is_postgres_url(location):
        from adapters_store.postgres.jobs import PostgresJobStore

        options: dict[str, Any] = {} if lease_s is None else {"lease_s": lease_s}
        if max_attempts is not None:
            options["max_attempts"] = max_attempts
        return PostgresJobStore(str(location), **options)  # type: ignore[return-value]  # same methods, duck-typed
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

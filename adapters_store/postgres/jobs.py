"""Training jobs on PostgreSQL, shared by every replica, each active job held under a lease by the replica running it.

`save` of a queued or running job records this replica as its owner with a lease of `LEASE_S`; a background
thread renews the leases of the jobs this replica still runs every `LEASE_S / 3`. A replica that dies stops
renewing, so its jobs' leases expire; `recover_interrupted` (every replica runs it at start, and on every renewal
tick) fails only jobs whose lease has expired, never a job another live replica is running. Examples are not stored (only counted), so an
orphaned job cannot be re-run elsewhere: it is failed with the reason and can be submitted again.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import replace

from adapters_store.errors import StoreError
from adapters_store.jobs import JOB_INTERRUPTED, STATUSES, JobNotFoundError, JobRecord, extra_json, now, record_from_row
from adapters_store.postgres.db import Database

LEASE_S = 15.0
ACTIVE = ("queued", "running")
log = logging.getLogger("reft_serve.store")
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, spec TEXT NOT NULL,
            progress TEXT NOT NULL, losses TEXT NOT NULL, error TEXT, created_at TEXT NOT NULL, started_at TEXT,
            finished_at TEXT, result_version INTEGER, owner TEXT, lease_until TIMESTAMPTZ)""",
        "CREATE INDEX jobs_tenant ON jobs (tenant, created_at)",
        "CREATE INDEX jobs_active ON jobs (lease_until) WHERE status IN ('queued', 'running')",
    ),
    # fields added after the first columns (validation, auto stop, evaluation...) travel as one JSON object
    ("ALTER TABLE jobs ADD COLUMN extra TEXT NOT NULL DEFAULT '{}'",),
)
_FIELDS = ("id, tenant, name, status, spec, progress, losses, error, created_at, started_at, finished_at, "
           "result_version, extra")


class PostgresJobStore:
    read_only = False

    def __init__(self, url: str, *, lease_s: float = LEASE_S) -> None:
        self.db = Database(url, max_connections=2)
        self.owner = f"replica-{uuid.uuid4().hex[:12]}"
        self.lease_s = lease_s
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self.db.migrate("jobs", _MIGRATIONS)
        except BaseException:
            self.db.close()
            raise
        self._renewer = threading.Thread(target=self._renew_forever, name="job-leases", daemon=True)
        self._renewer.start()

    def save(self, job: JobRecord) -> None:
        assert job.status in STATUSES
        active = job.status in ACTIVE
        row = (job.id, job.tenant, job.name, job.status, json.dumps(job.spec), json.dumps(job.progress),
               json.dumps(job.losses), job.error, job.created_at, job.started_at, job.finished_at, job.result_version,
               extra_json(job), self.owner if active else None, self.lease_s if active else None)
        with self.db.transaction() as cur:
            cur.execute(
                f"INSERT INTO jobs ({_FIELDS}, owner, lease_until) VALUES ({', '.join(['%s'] * 14)}, "
                "now() + make_interval(secs => %s)) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c}=EXCLUDED.{c}" for c in _FIELDS.split(", ")[1:]) + ", owner=EXCLUDED.owner, "
                "lease_until=EXCLUDED.lease_until", row)
        with self._lock:
            (self._running.add if active else self._running.discard)(job.id)

    def get(self, job_id: str) -> JobRecord:
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT {_FIELDS} FROM jobs WHERE id=%s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return record_from_row(row)

    def list(self, tenant: str = "default") -> list[JobRecord]:
        with self.db.transaction() as cur:
            rows = cur.execute(f"SELECT {_FIELDS} FROM jobs WHERE tenant=%s ORDER BY created_at", (tenant,)).fetchall()
        return [record_from_row(row) for row in rows]

    def all(self) -> list[JobRecord]:
        with self.db.transaction() as cur:
            return [record_from_row(row) for row in cur.execute(f"SELECT {_FIELDS} FROM jobs ORDER BY created_at").fetchall()]

    def recover_interrupted(self) -> list[JobRecord]:
        """Fail the active jobs whose replica stopped renewing their lease (claimed with SKIP LOCKED: two replicas
        starting together never both handle one job); return them."""
        with self.db.transaction() as cur:
            rows = cur.execute(f"SELECT {_FIELDS} FROM jobs WHERE status IN ('queued', 'running') "
                               "AND lease_until < now() FOR UPDATE SKIP LOCKED").fetchall()
            failed = [replace(job, status="failed", finished_at=now(), error_code=JOB_INTERRUPTED,
                              error=f"the replica running this job stopped or restarted while it was {job.status}; "
                                    "submit it again")
                      for job in map(record_from_row, rows)]
            for job in failed:
                cur.execute("UPDATE jobs SET status=%s, finished_at=%s, error=%s, extra=%s, owner=NULL, "
                            "lease_until=NULL WHERE id=%s",
                            (job.status, job.finished_at, job.error, extra_json(job), job.id))
        return failed

    def close(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=5)
        self.db.close()

    def _renew_forever(self) -> None:
        """Renew our leases, and fail other replicas' jobs whose leases ran out (their replica died)."""
        while not self._stop.wait(max(self.lease_s / 3, 0.05)):
            with self._lock:
                running = sorted(self._running)
            try:
                if running:
                    with self.db.transaction() as cur:
                        cur.execute("UPDATE jobs SET lease_until = now() + make_interval(secs => %s) "
                                    "WHERE id = ANY(%s) AND owner=%s", (self.lease_s, running, self.owner))
                for job in self.recover_interrupted():
                    log.warning("failed a training job whose replica stopped", extra={"job": job.id})
            except StoreError as exc:  # the database is away: keep trying; the lease may lapse meanwhile
                log.warning("could not renew training job leases", extra={"reason": str(exc)})



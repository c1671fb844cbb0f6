"""Training jobs on PostgreSQL: a queue shared by every replica, each job run under a lease by the replica holding it.

`submit` inserts a queued job with its training input (tokenized examples..., see server/training_input.py) and
NOTIFYs the replicas. A replica with training capacity `claim`s the oldest claimable job (queued and unowned, or
active with an expired lease) with `FOR UPDATE SKIP LOCKED`, so two replicas never take the same one; the claim sets
the owner, a lease of `lease_s` and the attempt count. A background thread renews the leases of the jobs this
replica runs every `lease_s / 3`; a replica that dies stops renewing, its job's lease runs out and another replica
claims it and runs it again from the start (training is deterministic for a seed: the same artifact). A job claimed
`max_attempts` times whose lease ran out again is failed with `job_interrupted`, naming the attempts.

A replica only writes a job it still owns (`update` checks the owner in its UPDATE); the result's version is written
in the same transaction as the job's end (`finish_job`, called by the artifact backend), so a replica that lost its
lease registers nothing and a job that registered a version is never run again. Lost leases are reported to the
replica (`on_lost`) so it stops the run.

Cancel from any replica: `request_cancel` cancels a job nobody runs at once; otherwise it sets `cancel_requested` and
NOTIFYs, and the owner's listener hears it within milliseconds (the lease renewal reads the flag too, as a fallback).
The input is dropped when a job ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from adapters_store.errors import StoreError
from adapters_store.jobs import (
    FINAL, JOB_INTERRUPTED, STATUSES, JobNotFoundError, JobRecord, admit_job, extra_json, now, record_from_row,
)
from adapters_store.postgres.changes import ChangeListener
from adapters_store.postgres.db import Cursor, Database

LEASE_S = 15.0
MAX_ATTEMPTS = 3
# A replica frozen (SIGSTOP, a stuck VM) inside one of this pool's transactions would hold the job's row lock for
# good: claims skip locked rows, so nobody could take the job over. The server ends such a session after this long
# idle in its transaction. The longest of these transactions is a few statements with no work between them
# (milliseconds; the artifact bytes of a finished job are written on the artifact store's own pool), so a few
# seconds leaves a wide margin for a slow machine.
IDLE_IN_TRANSACTION_S = 5.0
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
    (  # the queue: the job's training input (so any replica can run it) and a cancel any replica can ask for
        "ALTER TABLE jobs ADD COLUMN input TEXT",
        "ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false",
        "CREATE INDEX jobs_queue ON jobs (created_at) WHERE status IN ('queued', 'running')",
    ),
)
_FIELDS = ("id, tenant, name, status, spec, progress, losses, error, created_at, started_at, finished_at, "
           "result_version, extra")
_SET = ", ".join(f"{c}=%s" for c in _FIELDS.split(", ")[1:])  # every field but the id, in _FIELDS order
# active, and nobody holds it: never claimed (or released at a shutdown), or its owner stopped renewing
_UNHELD = "status IN ('queued', 'running') AND (owner IS NULL OR lease_until < now())"


def _values(job: JobRecord) -> tuple[Any, ...]:
    """The record's fields after the id, in _FIELDS order."""
    return (job.tenant, job.name, job.status, json.dumps(job.spec), json.dumps(job.progress), json.dumps(job.losses),
            job.error, job.created_at, job.started_at, job.finished_at, job.result_version, extra_json(job))


def finish_job(cur: Cursor, job: JobRecord, owner: str | None) -> bool:
    """Write the job's final record if `owner` still holds it (in the caller's transaction); False if not."""
    assert job.status in FINAL
    return bool(cur.execute(f"UPDATE jobs SET {_SET}, owner=NULL, lease_until=NULL, input=NULL, "
                            "cancel_requested=false WHERE id=%s AND owner=%s AND status IN ('queued', 'running')",
                            (*_values(job), job.id, owner)).rowcount)


def jobs_channel(cur: Cursor) -> str:
    schema = cur.execute("SELECT current_schema()").fetchone()
    return f"reft_jobs_{(schema[0] if schema else 'public')}"[:63]


class JobListener(ChangeListener):
    """LISTENs on the jobs channel: `{"queued": id}` wakes claimers, `{"cancel": id}` reaches the job's owner."""

    def __init__(self, url: str, channel: str, on_note: Callable[[dict[str, str]], None],
                 on_reset: Callable[[], None]) -> None:
        self._on_note = on_note
        super().__init__(url, channel, lambda tenant, name: None, on_reset, recheck_s=5.0)

    def _deliver(self, payload: str) -> None:
        try:
            self._on_note(json.loads(payload))
        except (ValueError, TypeError, AttributeError):
            self._on_reset()


class PostgresJobStore:
    read_only = False
    shared = True

    def __init__(self, url: str, *, lease_s: float = LEASE_S, max_attempts: int = MAX_ATTEMPTS,
                 idle_in_transaction_s: float | None = IDLE_IN_TRANSACTION_S) -> None:
        assert max_attempts >= 1
        self.db = Database(url, max_connections=4, idle_in_transaction_timeout_s=idle_in_transaction_s)
        # host and pid first: an operator (or a test) can tell which process runs a job
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_s, self.max_attempts = lease_s, max_attempts
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_cancel: Callable[[str], None] = lambda job_id: None
        self._on_lost: Callable[[str], None] = lambda job_id: None
        self._on_queued: Callable[[], None] = lambda: None
        self._listener: JobListener | None = None
        try:
            self.db.migrate("jobs", _MIGRATIONS)
            with self.db.transaction() as cur:
                self.channel = jobs_channel(cur)
        except BaseException:
            self.db.close()
            raise
        self._renewer = threading.Thread(target=self._renew_forever, name="job-leases", daemon=True)
        self._renewer.start()

    # -- reads -----------------------------------------------------------------------------------------------------
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

    def input(self, job_id: str) -> dict[str, Any] | None:
        with self.db.transaction() as cur:
            row = cur.execute("SELECT input FROM jobs WHERE id=%s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return None if row[0] is None else json.loads(row[0])

    # -- writes ----------------------------------------------------------------------------------------------------
    def save(self, job: JobRecord) -> None:
        """Insert or overwrite a record as it is (admin migrate, tests): an active one is held by this replica."""
        assert job.status in STATUSES
        active = job.status in ACTIVE
        with self.db.transaction() as cur:
            cur.execute(
                f"INSERT INTO jobs ({_FIELDS}, owner, lease_until) VALUES ({', '.join(['%s'] * 14)}, "
                "now() + make_interval(secs => %s)) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c}=EXCLUDED.{c}" for c in _FIELDS.split(", ")[1:]) + ", owner=EXCLUDED.owner, "
                "lease_until=EXCLUDED.lease_until, input=CASE WHEN EXCLUDED.status IN ('queued', 'running') "
                "THEN jobs.input END",  # an ended job's input is dropped
                (job.id, *_values(job), self.owner if active else None, self.lease_s if active else None))
        self._hold(job.id, active)

    def submit(self, job: JobRecord, training_input: dict[str, Any], max_active: int,
               max_for_tenant: int | None = None) -> None:
        """Queue a job with its input (nobody holds it yet) and wake the replicas; the limits on active jobs are
        checked under one advisory lock, so replicas submitting together cannot pass them."""
        assert job.status == "queued"
        with self.db.transaction(lock="jobs:admission") as cur:
            row = cur.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE tenant=%s) FROM jobs WHERE status IN "
                              "('queued', 'running')", (job.tenant,)).fetchone()
            assert row is not None
            admit_job(int(row[0]), int(row[1]), max_active, max_for_tenant)
            cur.execute(f"INSERT INTO jobs ({_FIELDS}, input) VALUES ({', '.join(['%s'] * 14)})",
                        (job.id, *_values(job), json.dumps(training_input)))
            self._notify(cur, {"queued": job.id})

    def update(self, job: JobRecord) -> bool:
        """Write the state of a job this replica runs (and renew its lease); False when it no longer holds it."""
        active = job.status in ACTIVE
        lease = ("lease_until=now() + make_interval(secs => %s)" if active
                 else "owner=NULL, lease_until=NULL, input=NULL, cancel_requested=false")
        with self.db.transaction() as cur:
            held = bool(cur.execute(
                f"UPDATE jobs SET {_SET}, {lease} WHERE id=%s AND owner=%s AND status IN ('queued', 'running')",
                (*_values(job), *((self.lease_s,) if active else ()), job.id, self.owner)).rowcount)
        self._hold(job.id, held and active)
        return held

    def abandon(self, job_id: str) -> None:
        """Stop renewing a job's lease without writing (its end could not be stored): it runs again elsewhere."""
        self._hold(job_id, False)

    def claim(self) -> tuple[JobRecord, dict[str, Any]] | None:
        """Take the oldest claimable job (with its input) for this replica, or None. Jobs that cannot run again are
        ended on the way: cancelled when a cancel was asked, failed when out of attempts or without input."""
        with self.db.transaction() as cur:
            while True:
                row = cur.execute(f"SELECT {_FIELDS}, owner IS NOT NULL, cancel_requested, input FROM jobs WHERE "
                                  f"{_UNHELD} ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED").fetchone()
                if row is None:
                    return None
                job, interrupted, cancel, stored = record_from_row(row[:13]), row[13], row[14], row[15]
                ended = self._unrunnable(job, interrupted, cancel, stored is not None)
                if ended is not None:
                    cur.execute(f"UPDATE jobs SET {_SET}, owner=NULL, lease_until=NULL, input=NULL WHERE id=%s",
                                (*_values(ended), job.id))
                    log.warning("ended a training job that cannot run again", extra={"job": job.id, "status": ended.status})
                    continue
                claimed = replace(job, attempts=job.attempts + 1, replica=self.owner)
                cur.execute(f"UPDATE jobs SET {_SET}, owner=%s, lease_until=now() + make_interval(secs => %s) "
                            "WHERE id=%s", (*_values(claimed), self.owner, self.lease_s, job.id))
                self._hold(job.id, True)
                return claimed, json.loads(stored)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a job nobody runs at once; ask the owner of a running one (it hears it within ~1 s). Returns the
        job as it is after the request."""
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT {_FIELDS}, owner IS NULL OR lease_until < now() FROM jobs WHERE id=%s "
                              "FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(job_id)
            job = record_from_row(row[:13])
            if job.status not in ACTIVE:
                return job
            if row[13]:  # unheld: nobody would hear the request
                cancelled = replace(job, status="cancelled", finished_at=now())
                cur.execute(f"UPDATE jobs SET {_SET}, owner=NULL, lease_until=NULL, input=NULL WHERE id=%s",
                            (*_values(cancelled), job_id))
                return cancelled
            cur.execute("UPDATE jobs SET cancel_requested=true WHERE id=%s", (job_id,))
            self._notify(cur, {"cancel": job_id})
        return job

    def release(self, job_id: str) -> None:
        """Give up a job this replica holds (it is shutting down): another replica claims it at once. A clean
        shutdown is not a failed attempt: the claim it took back is not counted, so rolling restarts never use up
        `max_attempts`."""
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT {_FIELDS} FROM jobs WHERE id=%s AND owner=%s FOR UPDATE",
                              (job_id, self.owner)).fetchone()
            if row is not None:
                job = record_from_row(row)
                released = replace(job, attempts=max(job.attempts - 1, 0))
                cur.execute(f"UPDATE jobs SET {_SET}, owner=NULL, lease_until=NULL WHERE id=%s",
                            (*_values(released), job_id))
                self._notify(cur, {"queued": job_id})
        self._hold(job_id, False)

    def recover_interrupted(self) -> list[JobRecord]:
        """End the jobs of stopped replicas that cannot run again (out of attempts, or without a stored input);
        the others are claimed and run again. Every replica runs this at start and on each renewal tick."""
        ended = []
        with self.db.transaction() as cur:
            # only the rows it will end: a row locked here is skipped by a replica claiming at the same moment
            rows = cur.execute(f"SELECT {_FIELDS}, owner IS NOT NULL, cancel_requested, input IS NOT NULL FROM jobs "
                               f"WHERE {_UNHELD} AND owner IS NOT NULL AND (cancel_requested OR input IS NULL OR "
                               "COALESCE((extra::jsonb->>'attempts')::int, 0) >= %s) FOR UPDATE SKIP LOCKED",
                               (self.max_attempts,)).fetchall()
            for row in rows:
                job = self._unrunnable(record_from_row(row[:13]), row[13], row[14], row[15])
                if job is not None:
                    cur.execute(f"UPDATE jobs SET {_SET}, owner=NULL, lease_until=NULL, input=NULL WHERE id=%s",
                                (*_values(job), job.id))
                    ended.append(job)
        return ended

    # -- this replica's jobs ---------------------------------------------------------------------------------------
    def watch(self, *, on_queued: Callable[[], None], on_cancel: Callable[[str], None],
              on_lost: Callable[[str], None]) -> JobListener:
        """Call `on_queued()` when a job may have become claimable, `on_cancel(id)` when a cancel of a job this
        replica runs was asked, `on_lost(id)` when this replica no longer holds a job it ran (stop it)."""
        self._on_queued, self._on_cancel, self._on_lost = on_queued, on_cancel, on_lost
        self._listener = JobListener(self.db.url, self.channel, self._heard, on_queued)
        return self._listener

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        self._renewer.join(timeout=5)
        self.db.close()

    def _heard(self, note: dict[str, str]) -> None:
        if "queued" in note:
            self._on_queued()
        job_id = note.get("cancel")
        with self._lock:
            ours = job_id in self._running
        if job_id is not None and ours:
            self._on_cancel(job_id)

    def _unrunnable(self, job: JobRecord, interrupted: bool, cancel: bool, has_input: bool) -> JobRecord | None:
        """The job's end if it must not run again (None: claim it)."""
        if cancel:
            return replace(job, status="cancelled", finished_at=now())
        if not interrupted:
            return None if has_input else self._interrupted(job, "its examples were not stored (it was submitted to an "
                                                                 "older version)")
        if not has_input:
            return self._interrupted(job, f"the replica running this job stopped or restarted while it was "
                                          f"{job.status}, and its examples were not stored (it was submitted to an "
                                          "older version)")
        if job.attempts >= self.max_attempts:
            return self._interrupted(job, f"the replica running this job stopped {job.attempts} times (attempt "
                                          f"{job.attempts} of job_max_attempts={self.max_attempts})")
        return None

    def _interrupted(self, job: JobRecord, why: str) -> JobRecord:
        return replace(job, status="failed", finished_at=now(), error_code=JOB_INTERRUPTED,
                       error=f"{why}; submit it again")

    def _hold(self, job_id: str, held: bool) -> None:
        with self._lock:
            (self._running.add if held else self._running.discard)(job_id)

    def _notify(self, cur: Cursor, note: dict[str, str]) -> None:
        cur.execute("SELECT pg_notify(%s, %s)", (self.channel, json.dumps(note)))

    def _renew_forever(self) -> None:
        """Renew our leases (learning of lost ones and of asked cancels), and end stopped replicas' jobs that
        cannot run again."""
        while not self._stop.wait(max(self.lease_s / 3, 0.05)):
            with self._lock:
                running = sorted(self._running)
            try:
                if running:
                    with self.db.transaction() as cur:
                        rows = cur.execute("UPDATE jobs SET lease_until = now() + make_interval(secs => %s) WHERE "
                                           "id = ANY(%s) AND owner=%s AND status IN ('queued', 'running') "
                                           "RETURNING id, cancel_requested", (self.lease_s, running, self.owner)).fetchall()
                    held = {row[0] for row in rows}
                    for job_id in sorted(set(running) - held):
                        self._hold(job_id, False)
                        log.warning("lost the lease of a training job: stopping its run", extra={"job": job_id})
                        self._on_lost(job_id)
                    for job_id in sorted(row[0] for row in rows if row[1]):
                        self._on_cancel(job_id)
                for job in self.recover_interrupted():
                    log.warning("ended a training job whose replica stopped", extra={"job": job.id,
                                                                                      "reason": job.error})
            except StoreError as exc:  # the database is away: keep trying; the lease may lapse meanwhile
                log.warning("could not renew training job leases", extra={"reason": str(exc)})


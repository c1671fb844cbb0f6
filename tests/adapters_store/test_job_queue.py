"""The job queue on PostgreSQL (claims, leases, attempts, cancel, the version written with the job's end), and the
training input stored with a job on both backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from adapters_store import ArtifactStore
from adapters_store.errors import InterventionNotFoundError, StoreUnavailableError
from adapters_store.jobs import JobLeaseLostError, JobRecord, JobResult, TooManyJobsError, open_jobs
from adapters_store.postgres.jobs import PostgresJobStore

from .conftest import make_payload

INPUT = {"format": 1, "examples": [[[1, 2], [3, 4]]], "validation": [], "prompts": [], "description": None,
         "replace": False}


def queued(job_id: str, tenant: str = "default", created_at: str | None = None) -> JobRecord:
    job = JobRecord(id=job_id, name="p", status="queued", spec={"examples": 1}, tenant=tenant)
    return job if created_at is None else replace(job, created_at=created_at)


@pytest.fixture
def url(postgres) -> Iterator[str]:  # noqa: ANN001
    url = postgres.new_schema()
    yield url
    postgres.close_connections(url)


@pytest.fixture
def replicas(url: str) -> Iterator[list[PostgresJobStore]]:
    """Three replicas' job stores on one database, with a short lease and 2 attempts."""
    stores = [PostgresJobStore(url, lease_s=0.6, max_attempts=2) for _ in range(3)]
    yield stores
    for store in stores:
        store.close()


def stop_renewing(store: PostgresJobStore) -> None:
    """What a replica that died (or froze) does to its leases: nothing more."""
    store._stop.set()
    store._renewer.join()


def expire(store: PostgresJobStore, job_id: str) -> None:
    """The job's lease has run out (as if its replica froze)."""
    with store.db.transaction() as cur:
        cur.execute("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id=%s", (job_id,))


def test_input_is_stored_with_the_job_and_dropped_when_it_ends(root) -> None:  # noqa: ANN001 - both backends
    jobs = open_jobs(root)
    try:
        jobs.submit(queued("j1"), INPUT, max_active=8)
        assert jobs.input("j1") == INPUT and "input" not in jobs.get("j1").to_dict()  # never in the API's record
        jobs.save(replace(jobs.get("j1"), status="running", progress={"step": 1}))
        assert jobs.input("j1") == INPUT  # a progress write keeps it
        jobs.save(replace(jobs.get("j1"), status="succeeded"))
        assert jobs.input("j1") is None
    finally:
        jobs.close()


def test_submit_refuses_past_the_active_limits(root) -> None:  # noqa: ANN001 - both backends
    jobs = open_jobs(root)
    try:
        jobs.submit(queued("a1", "acme"), INPUT, max_active=3, max_for_tenant=1)
        with pytest.raises(TooManyJobsError, match="this tenant has 1"):
            jobs.submit(queued("a2", "acme"), INPUT, max_active=3, max_for_tenant=1)
        jobs.submit(queued("g1", "globex"), INPUT, max_active=2)
        with pytest.raises(TooManyJobsError, match="2 training jobs are already"):
            jobs.submit(queued("g2", "globex"), INPUT, max_active=2)
        jobs.save(replace(jobs.get("a1"), status="cancelled"))  # an ended job frees its place
        jobs.submit(queued("a3", "acme"), INPUT, max_active=3, max_for_tenant=1)
    finally:
        jobs.close()


def test_claims_take_the_oldest_job_once(replicas) -> None:  # noqa: ANN001
    a, b, _ = replicas
    for index in range(6):
        a.submit(queued(f"j{index}", created_at=f"2026-01-01T00:00:0{index}"), INPUT | {"n": index}, max_active=8)
    first = b.claim()
    assert first is not None and first[0].id == "j0" and first[1]["n"] == 0
    assert (first[0].attempts, first[0].replica) == (1, b.owner) and b.get("j0").replica == b.owner
    claimed: list[str] = []
    start = threading.Barrier(10)

    def claim(store: PostgresJobStore) -> None:
        start.wait()
        got = store.claim()
        if got is not None:
            claimed.append(got[0].id)

    threads = [threading.Thread(target=claim, args=(replicas[i % 3],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == ["j1", "j2", "j3", "j4", "j5"]  # each exactly once, whatever raced


def test_a_dead_replicas_job_is_claimed_again_and_its_writes_are_refused(replicas, url) -> None:  # noqa: ANN001
    a, b, _ = replicas
    a.submit(queued("j"), INPUT, max_active=8)
    job, _ = a.claim()  # type: ignore[misc]
    assert a.update(replace(job, status="running", losses=[2.0]))
    assert b.claim() is None  # A holds it (and renews its lease)
    time.sleep(1.0)
    assert b.claim() is None  # still renewed after more than a lease
    stop_renewing(a)
    time.sleep(0.8)
    retried, stored = b.claim()  # type: ignore[misc]
    assert (retried.id, retried.attempts, retried.replica, retried.losses, stored) == ("j", 2, b.owner, [2.0], INPUT)
    assert not a.update(replace(job, status="running", losses=[9.0]))  # A woke up: it no longer holds the job
    assert b.get("j").losses == [2.0]
    assert b.update(replace(retried, status="cancelled"))  # the owner's end: nobody holds it any more
    assert (b.get("j").status, b.input("j")) == ("cancelled", None)
    assert not b.update(replace(retried, status="failed")) and b.claim() is None


def test_a_replica_frozen_inside_a_transaction_does_not_hold_the_job_forever(url: str) -> None:
    """A holds the job's row lock in an open transaction and stops (frozen): B's claims skip the locked row until
    PostgreSQL ends A's session after its idle-in-transaction timeout; then B claims the job, and A, resumed,
    writes nothing. The same hold without the timeout still blocks B afterwards (the timeout is what frees it)."""
    frozen = PostgresJobStore(url, idle_in_transaction_s=1.0)
    forever = PostgresJobStore(url, idle_in_transaction_s=None)
    b = PostgresJobStore(url)
    try:
        for job_id, holder in (("kept", forever), ("freed", frozen)):
            holder.submit(queued(job_id), INPUT, max_active=8)
        with forever.db.transaction() as held:
            held.execute("SELECT id FROM jobs WHERE id='kept' FOR UPDATE")
            with pytest.raises(StoreUnavailableError):
                with frozen.db.transaction() as cur:
                    cur.execute("SELECT id FROM jobs WHERE id='freed' FOR UPDATE")  # then nothing: frozen
                    assert b.claim() is None  # both rows are locked
                    started = time.monotonic()
                    claimed = None
                    while claimed is None:
                        assert time.monotonic() - started < 10, "the frozen holder's lock was never released"
                        time.sleep(0.1)
                        claimed = b.claim()
                    assert claimed[0].id == "freed" and time.monotonic() - started >= 0.9
                    cur.execute("UPDATE jobs SET status='failed' WHERE id='freed'")  # resumed: its session is gone
            assert b.claim() is None  # "kept" stays locked: its holder has no timeout
        assert b.get("freed").status == "queued" and b.get("freed").replica == b.owner
        assert b.claim()[0].id == "kept"  # type: ignore[index]  # released with its transaction's end
    finally:
        for store in (frozen, forever, b):
            store.close()


def test_a_job_out_of_attempts_is_failed_with_the_reason(replicas) -> None:  # noqa: ANN001
    a, b, c = replicas
    a.submit(queued("j"), INPUT, max_active=8)
    for store in (a, b):  # two attempts, each on a replica that then died
        assert store.claim() is not None
        stop_renewing(store)
        time.sleep(0.8)  # past its lease
    assert c.claim() is None
    failed = c.get("j")
    assert (failed.status, failed.error_code, failed.attempts) == ("failed", "job_interrupted", 2)
    assert "stopped 2 times" in failed.error and "job_max_attempts=2" in failed.error
    assert c.input("j") is None


def test_stopped_replicas_jobs_out_of_attempts_fail_even_when_nobody_claims(replicas) -> None:  # noqa: ANN001
    a, b, c = replicas
    a.submit(queued("j"), INPUT, max_active=8)
    for store in (a, b):
        assert store.claim() is not None
        stop_renewing(store)
        time.sleep(0.8)
    deadline = time.monotonic() + 5  # C's renewal tick ends it; C never claims
    while c.get("j").status != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_lost_lease_is_reported_to_the_replica_that_held_it(replicas, url) -> None:  # noqa: ANN001
    a, b, _ = replicas
    lost: list[str] = []
    a.watch(on_queued=lambda: None, on_cancel=lambda job_id: None, on_lost=lost.append)
    a.submit(queued("j"), INPUT, max_active=8)
    assert a.claim() is not None
    for _ in range(50):  # A froze past its lease (its renewer, still running here, may renew it in between: again)
        expire(b, "j")
        if b.claim() is not None:
            break
    assert b.get("j").replica == b.owner
    deadline = time.monotonic() + 3
    while lost != ["j"]:
        assert time.monotonic() < deadline, lost
        time.sleep(0.05)


def test_cancel_from_any_replica(replicas) -> None:  # noqa: ANN001
    a, b, c = replicas
    heard: list[tuple[str, float]] = []
    listener = a.watch(on_queued=lambda: None, on_cancel=lambda job_id: heard.append((job_id, time.monotonic())),
                       on_lost=lambda job_id: None)
    assert listener.connected.wait(10)
    b.submit(queued("waiting"), INPUT, max_active=8)
    b.submit(queued("running", created_at="0"), INPUT, max_active=8)  # older: claimed first
    assert a.claim()[0].id == "running"  # type: ignore[index]
    asked = time.monotonic()
    assert c.request_cancel("running").status == "queued"  # asked, not yet done: the owner cancels it
    deadline = time.monotonic() + 1
    while not heard:
        assert time.monotonic() < deadline, "the owner did not hear the cancel within 1 s"
        time.sleep(0.01)
    assert heard[0][0] == "running" and heard[0][1] - asked < 1
    assert c.request_cancel("waiting").status == "cancelled"  # nobody runs it: cancelled at once
    assert b.claim() is None  # neither is claimable any more


def test_a_version_is_written_only_by_the_jobs_owner_and_ends_the_job(replicas, url, fingerprint) -> None:  # noqa: ANN001
    a, b, _ = replicas
    store = ArtifactStore(url, fingerprint)
    try:
        a.submit(queued("j"), INPUT, max_active=8)
        job, _ = a.claim()  # type: ignore[misc]
        running = replace(job, status="running")

        def finish(version: int) -> JobRecord:
            return replace(running, status="succeeded", result_version=version)

        with pytest.raises(JobLeaseLostError):  # B never held it
            store.put("p", make_payload(fingerprint), job=JobResult("j", b.owner, finish))
        with pytest.raises(InterventionNotFoundError):
            store.get("p")  # rolled back with the refused job end
        record = store.put("p", make_payload(fingerprint), job=JobResult("j", a.owner, finish))
        assert record.training["job_id"] == "j"
        ended = a.get("j")
        assert (ended.status, ended.result_version) == ("succeeded", record.version)
        with pytest.raises(JobLeaseLostError):  # ended: it can never register a second version
            store.put("p", make_payload(fingerprint, 1), job=JobResult("j", a.owner, finish), upsert=True)
        assert store.versions("p")[1] == 1
    finally:
        store.close()


def test_a_clean_shutdown_does_not_use_up_an_attempt(replicas) -> None:  # noqa: ANN001
    """Replicas that stop cleanly release their job: however many rolling restarts it sees, a later crash still
    leaves it every attempt but the crashed one."""
    a, b, c = replicas
    a.submit(queued("j"), INPUT, max_active=8)
    for store in (a, b, a, b):  # four clean stops (max_attempts is 2)
        claimed, _ = store.claim()
        assert claimed.attempts == 1
        store.release("j")
    assert a.get("j").status == "queued" and a.get("j").attempts == 0
    assert c.claim()[0].attempts == 1  # type: ignore[index]
    stop_renewing(c)  # a crash: that one counts
    time.sleep(0.8)
    assert b.claim()[0].attempts == 2  # type: ignore[index]  # its last attempt, not failed

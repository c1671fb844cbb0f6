"""`JobWorker`: this replica's hand in the shared job queue (PostgreSQL store): claim a job when idle, run it here.

One thread. It claims the oldest claimable job (adapters_store.postgres.jobs: queued, or run by a replica whose
lease ran out) whenever this replica runs none (its engine trains one job at a time), and hands it to the
TrainingManager with its stored input. It wakes when a job is queued or released (NOTIFY), when a job here ends,
and every `POLL_S` besides (an expired lease sends no notification). The store's listener also relays a cancel
asked on any replica, and the lease renewal a lease this replica lost, to the manager.
"""

from __future__ import annotations

import logging
import threading

from adapters_store.errors import StoreError
from adapters_store.jobs import JobRecord
from server.training import TrainingManager
from server.training_input import TrainingInput, job_configs

log = logging.getLogger("reft_serve.training")
POLL_S = 1.0


class JobWorker:
    def __init__(self, manager: TrainingManager, poll_s: float = POLL_S) -> None:
        self.manager, self.jobs, self.poll_s = manager, manager.jobs, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        manager.on_idle = self.wake
        self.jobs.watch(on_queued=self.wake, on_cancel=manager.engine.cancel_training,  # type: ignore[attr-defined]
                        on_lost=manager.lose)
        self._thread = threading.Thread(target=self._run, name="job-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Claim nothing more (a job running here is released when the engine stops)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set() or self.manager.busy:
                continue
            try:
                claimed = self.jobs.claim()  # type: ignore[attr-defined]  # the shared store's method
            except StoreError as exc:  # the database is away: try again on the next tick
                log.warning("could not claim a training job", extra={"reason": str(exc)})
                continue
            if claimed is not None:
                self._start(*claimed)

    def _start(self, job: JobRecord, stored: dict) -> None:
        try:
            work = TrainingInput.from_json(stored)
            job_configs(job.spec)  # the spec must read too, before the job counts as running here
        except Exception as exc:  # noqa: BLE001 - written by another build, or damaged: fail it, with why
            log.error("cannot read a training job's input", extra={"job": job.id, "reason": str(exc)})
            self.manager.fail_unreadable(job, f"this replica cannot read the job's stored input ({exc})")
            return
        log.info("running a training job from the queue", extra={"job": job.id, "attempt": job.attempts})
        self.manager.run(job, work)

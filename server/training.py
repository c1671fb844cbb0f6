"""Training jobs over HTTP: validate, queue, run on the engine, track progress, register the result.

The engine runs training in short slices between serving steps (see `TrainingTask`), so generation keeps flowing
while a persona trains. This module owns the records of the jobs this process runs: their state in memory (guarded
by a lock, since engine callbacks arrive on the engine thread), their persistence in the job store (at most every
`PROGRESS_WRITE_S`, and at each epoch's end and status change), and each one's event log (training_events.py) with
the clients watching it; a job leaves memory once its end is stored. A job registers its intervention only on
success; a failed or cancelled job registers nothing. Between the last step and success the job is evaluated
(evaluation.py) on a worker thread: validation loss, and greedy answers of the persona and the bare model.

Submit stores the job with its input (training_input.py). With the local store the job goes straight to this
process's engine. With PostgreSQL the store is a queue: any replica's `JobWorker` (job_worker.py) claims it and
calls `run`; cancel reaches the owner through the store, and other replicas stream its events from the stored record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from adapters_store import InterventionExistsError, InterventionNotFoundError, validate_name
from adapters_store.jobs import (
    JobLeaseLostError, JobNotFoundError, JobRecord, JobResult, JobStatus, JobStore, TooManyJobsError, now,
)
from adapters_store.records import InterventionRecord
from reft_core import recipe
from reft_core.artifact import encode_artifact
from reft_core.config import InterventionConfig, check_rank
from reft_core.early_stop import auto_stop_summary
from reft_core.frozen_context import ModelDims
from reft_core.intervention import Intervention
from reft_core.trainer import ReftTrainer, TrainingConfig, TrainingProgress, training_metadata
from server.engine.engine import TrainingTask
from server.engine.types import TrainingEnd, TrainingFailure
from server.engine.remote import EngineHandle
from server.engine.types import InterventionRef
from server.errors import APIError
from server.evaluation import evaluate
from server.generation import JOB_SAVE_FAILED, job_error_code
from server.metrics import Metrics
from server.registry import InterventionRegistry
from server.settings import Settings
from server.training_events import (
    MOVED, Event, auto_stop_event, epoch_event, evaluation_event, is_final, job_events, status_event, step_event,
    stored_events,
)
from server.training_input import TrainingInput, admit_memory, eval_prompts, job_configs, tokenize
from server.training_request import TrainingRequest, split_validation

log = logging.getLogger("reft_serve.training")
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
# How an engine-side ending becomes the job's record: a cancelled job has no error; a failed or shut-down one says why
_ENDED_AS: dict[TrainingEnd, JobStatus] = {
    TrainingEnd.FAILED: JobStatus.FAILED, TrainingEnd.SHUTDOWN: JobStatus.FAILED, TrainingEnd.CANCELLED: JobStatus.CANCELLED,
}
PROGRESS_WRITE_S = 0.5  # a running job's progress reaches the store at most this often (plus epoch ends and statuses)


class TrainingManager:
    def __init__(
        self, engine: EngineHandle, registry: InterventionRegistry, tokenizer: Any, jobs: JobStore, settings: Settings,
        dims: ModelDims, *, unavailable: str | None = None, metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.unavailable = unavailable  # why this deployment cannot train (every submit answers 501), or None
        self.engine, self.registry, self.tokenizer, self.jobs, self.settings = engine, registry, tokenizer, jobs, settings
        self.dims = dims  # the model's sizes (config numbers only), for admission estimates
        self.num_layers, self.hidden_size = dims.num_layers, dims.hidden_size
        self._lock = threading.Lock()
        self._live: dict[str, JobRecord] = {}  # the jobs this process runs, until their end is stored
        self._logs: dict[str, list[Event]] = {}  # live jobs' events (an ended job's are rebuilt from its record)
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[int, Event]]]]] = {}
        self._started: dict[str, float] = {}
        self._written: dict[str, float] = {}  # when each live job's progress was last stored
        self._lost: set[str] = set()  # jobs another replica now holds: their run here stops, writes nothing
        self.on_idle: Callable[[], None] = lambda: None  # a job ended here (the JobWorker claims the next)
        self.worker: Any = None  # the JobWorker claiming from a shared (PostgreSQL) queue, set by the app factory
        for job in jobs.recover_interrupted():
            log.warning("marked interrupted training job failed", extra={"job": job.id, "intervention": job.name})

    # -- requests (each acts on one tenant's jobs; another tenant's job is a 404) ------------------------------------
    async def submit(
        self, body: TrainingRequest, tenant: str = "default", max_for_tenant: int | None = None,
        fine_tuning: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Validate and queue; `max_for_tenant` caps the tenant's queued + running jobs (None: no cap).
        `fine_tuning`: what a `POST /v1/fine_tuning/jobs` asked (files, suffix, ...), kept in the job's spec for
        that API's view of the job (server/fine_tuning.py)."""
        if self.unavailable is not None:
            raise APIError(501, self.unavailable, type="server_error", code="training_unavailable")
        validate_name(body.name)
        s = self.settings
        if len(body.examples) > s.max_training_examples:
            raise APIError(400, f"{len(body.examples)} examples; the limit is {s.max_training_examples}", param="examples")
        epochs = body.hyperparameters.epochs
        if isinstance(epochs, int) and epochs > s.max_training_epochs:
            raise APIError(400, f"epochs is limited to {s.max_training_epochs}", param="hyperparameters.epochs")
        if body.validation_examples is not None and len(body.validation_examples) > s.max_training_examples:
            raise APIError(400, f"{len(body.validation_examples)} validation examples; the limit is "
                           f"{s.max_training_examples}", param="validation_examples")
        spec = body.intervention
        layers = tuple(spec.layers) if spec.layers else recipe.default_layers(self.num_layers)
        config = InterventionConfig(layers=layers, rank=spec.rank, positions=spec.positions, type=spec.type,
                                    share_weights=spec.share_weights)
        config.check_against_model(self.hidden_size, self.num_layers)
        check_rank(config.rank, self.hidden_size, s.max_intervention_rank)
        h = body.hyperparameters
        training = TrainingConfig(epochs=h.epochs, learning_rate=h.learning_rate, batch_size=h.batch_size, seed=h.seed)
        if not body.replace:  # fail before the job runs (the write checks again: a name may appear meanwhile)
            await run_in_threadpool(self._check_new_name, tenant, body.name)
        train_in, validation_in = split_validation(body)
        examples = await run_in_threadpool(tokenize, self.tokenizer, train_in, body.chat_template, "examples",
                                           s.max_example_tokens)
        validation = await run_in_threadpool(tokenize, self.tokenizer, validation_in, body.chat_template,
                                             "validation_examples", s.max_example_tokens)
        prompts = await run_in_threadpool(eval_prompts, self.tokenizer, body, validation_in, validation,
                                          s.training_eval_max_tokens, min(s.max_example_tokens, self.engine.max_context))
        memory = admit_memory(self.dims, config, examples + validation, training.batch_size, s)
        steps_per_epoch = -(-len(examples) // training.batch_size)
        job = JobRecord(id=f"ftjob-{uuid.uuid4().hex[:24]}", name=body.name, status=JobStatus.QUEUED, tenant=tenant,
                        spec={"intervention": config.to_dict(), "hyperparameters": training.to_dict(),
                              "examples": len(examples), "validation_examples": len(validation),
                              "eval_prompts": len(prompts), "steps_per_epoch": steps_per_epoch,
                              "planned_steps": steps_per_epoch * training.max_epochs,
                              "description": body.description,
                              "tokens": sum(len(e.input_ids) for e in examples),  # per epoch
                              "memory": {"kept_bytes": memory.kept_bytes, "working_bytes": memory.working_bytes},
                              **({"fine_tuning": fine_tuning} if fine_tuning is not None else {})})
        work = TrainingInput(tuple(examples), tuple(validation), tuple(prompts), body.description, body.replace)
        try:  # the limits on active jobs are checked in the store, atomically with the insert (every replica's)
            await run_in_threadpool(self.jobs.submit, job, work.to_json(), s.max_queued_trainings, max_for_tenant)
        except TooManyJobsError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="too_many_trainings",
                           headers={"Retry-After": "30"}) from None
        self.metrics.training_jobs.labels(status=JobStatus.QUEUED.value).inc()
        if not self.jobs.shared:  # one process: run it here (PostgreSQL: whichever replica claims it runs it)
            self.run(job, work)
        return job

    def run(self, job: JobRecord, work: TrainingInput) -> None:
        """Run a stored job on this process's engine (submitted here, or claimed from the shared queue: then it may
        be a retry, whose record already holds the events of the earlier attempt)."""
        config, training = job_configs(job.spec)
        with self._lock:
            self._live[job.id] = job
            self._logs[job.id] = job_events(job)
        self.engine.submit_training(self._task(job.id, job.tenant, job.name, work, config, training))

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def fail_unreadable(self, job: JobRecord, why: str) -> None:
        """End a claimed job whose input this build cannot read (it holds the job: the write is its own)."""
        self.jobs.update(replace(job, status=JobStatus.FAILED, finished_at=now(), error=why,
                                 error_code="training_failed"))

    @property
    def busy(self) -> bool:
        """Whether this process runs a job (its engine trains one at a time: a replica claims one when idle)."""
        with self._lock:
            return bool(self._live)

    def lose(self, job_id: str) -> None:
        """Another replica now holds this job (our lease ran out): stop its run here, write nothing more."""
        with self._lock:
            if job_id not in self._live:
                return
            self._lost.add(job_id)
        self.engine.cancel_training(job_id)

    def get(self, job_id: str, tenant: str = "default") -> JobRecord:
        with self._lock:
            live = self._live.get(job_id)
        job = live or self.jobs.get(job_id)
        if job.tenant != tenant:
            raise JobNotFoundError(job_id)
        return job

    def _stored(self, job_id: str) -> JobRecord:
        """The job as this process has it: live, else its stored record (e.g. just ended and left memory)."""
        with self._lock:
            live = self._live.get(job_id)
        return live or self.jobs.get(job_id)

    def list(self, tenant: str = "default") -> list[JobRecord]:
        stored = {j.id: j for j in self.jobs.list(tenant)}
        with self._lock:
            stored.update({k: j for k, j in self._live.items() if j.tenant == tenant})
        return sorted(stored.values(), key=lambda j: j.created_at)

    def jobs_by_version(self, versions: Sequence[InterventionRecord]) -> dict[int, JobRecord]:
        """The job that trained each of these versions (of one name), by the job id recorded with the version
        (uploads have none; nor does a version of a name deleted and created again that a job's old number matches):
        its id, and the evaluation shown with the version (kept in the job record: it is not part of the weights)."""
        found = {}
        for record in versions:  # point reads: listing the tenant's every job made each read grow with its history
            job_id = record.training.get("job_id")
            if not job_id:
                continue
            try:
                found[record.version] = self.get(job_id, record.tenant)
            except JobNotFoundError:  # removed with its name, or another tenant's id: shown without evaluation
                continue
        return found

    def cancel(self, job_id: str, tenant: str = "default") -> JobRecord:
        """Cancel a job this process runs on its engine; one in the shared queue through the store (cancelled at
        once if nobody runs it, else its owner hears the request)."""
        job = self.get(job_id, tenant)
        if job.status not in ACTIVE:
            return job
        with self._lock:
            local = job_id in self._live
        if local:
            self.engine.cancel_training(job_id)
            return job
        return self.jobs.request_cancel(job_id)

    def snapshot(self, job_id: str, tenant: str = "default") -> tuple[JobRecord, int]:
        """The job now and the id of the last event it reflects (a watcher continues after it)."""
        job = self.get(job_id, tenant)
        with self._lock:
            log = self._logs.get(job_id)
            if log is not None:
                return self._live[job_id], len(log)
        return job, len(job_events(job))

    async def events(self, job_id: str, tenant: str = "default", after: int = 0,
                     keepalive_s: float | None = None) -> AsyncGenerator[tuple[int, Event] | None, None]:
        """(id, event) for the job's events after id `after`, then each new one until the job ends; None after
        `keepalive_s` without one (a keep-alive: the caller sends a comment)."""
        await run_in_threadpool(self.get, job_id, tenant)  # 404 for another tenant's job
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:  # the backlog and the registration together: no event falls between them
            log = self._logs.get(job_id)
            if log is not None:
                backlog = list(enumerate(log, start=1))[after:]
                self._watchers.setdefault(job_id, []).append(entry)
        last = after
        if log is not None:
            try:
                for item in backlog:
                    last = item[0]
                    yield item
                    if is_final(item[1]):
                        return
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), keepalive_s)
                    except TimeoutError:
                        yield None
                        continue
                    if item[1] is MOVED:  # another replica took the job over: follow its stored record
                        break
                    if item[0] <= last:
                        continue
                    last = item[0]
                    yield item
                    if is_final(item[1]):
                        return
            finally:
                with self._lock:
                    self._watchers.get(job_id, []).remove(entry)
        # not run here (another replica's, or ended): from the stored record, with the ids the live log gave
        async for item in stored_events(functools.partial(run_in_threadpool, self._stored, job_id), last, keepalive_s):
            yield item

    # -- engine callbacks (engine thread) --------------------------------------------------------------------------
    def _task(self, job_id: str, tenant: str, name: str, work: TrainingInput, config: InterventionConfig,
              training: TrainingConfig) -> TrainingTask:
        # a partial, not a closure: it crosses to the engine process, which calls it with its model
        s = self.settings
        make_trainer = functools.partial(
            ReftTrainer, config=config, examples=list(work.examples), training=training,
            validation=list(work.validation), micro_batch_tokens=s.training_micro_batch_tokens,
            head_chunk_tokens=s.training_head_chunk_tokens, context_budget_bytes=s.training_context_budget_bytes,
            max_micro_batch_tokens=s.training_max_micro_batch_tokens,
        )

        def on_start(total: int) -> None:
            self._started[job_id] = time.perf_counter()
            progress = {"step": 0, "total_steps": total, "epoch": 0}
            if self._get_live(job_id).started_at is None:
                self._update(job_id, persist=True, status=JobStatus.RUNNING, started_at=now(), progress=progress)
            else:  # a retry: the record (and its events) already say running
                self._update(job_id, persist=True, progress=progress)

        def on_progress(p: TrainingProgress) -> None:
            with self._lock:
                job = self._live.get(job_id)
            if job is None or job_id not in self._started:  # lost to another replica; its cancel is on the way
                return
            elapsed = time.perf_counter() - self._started[job_id]
            remaining = elapsed / p.step * (p.total_steps - p.step)
            progress = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "loss": p.loss,
                        "elapsed_s": round(elapsed, 2), "remaining_s": round(remaining, 2)}
            self.metrics.training_steps.inc(max(0, p.step - job.progress.get("step", 0)))
            self.metrics.training_step_rate.set(p.step / max(elapsed, 1e-9))
            # A retry overwrites the earlier attempt's values in place (the same, for a seed) and adds events only
            # past them: the record's history, and so the event ids, never go back.
            fields: dict[str, Any] = {"progress": progress, "losses": _put(job.losses, p.step, p.loss)}
            events = [step_event(p.step, p.epoch, p.loss)] if p.step > len(job.losses) else []
            end = p.epoch_end
            if end is not None:
                new_epoch = end.epoch > len(job.epoch_losses)
                fields["epoch_losses"] = _put(job.epoch_losses, end.epoch, end.train_loss)
                if end.validation_loss is not None:
                    fields["validation_losses"] = _put(job.validation_losses, end.epoch, end.validation_loss)
                events += [epoch_event(end.epoch, end.train_loss, end.validation_loss)] if new_epoch else []
                if end.decision is not None and end.decision.stop:
                    fields["auto_stop"] = auto_stop_summary(end, validated=end.validation_loss is not None)
                    events += [auto_stop_event(fields["auto_stop"])] if new_epoch else []
            due = time.monotonic() - self._written.get(job_id, 0.0) >= PROGRESS_WRITE_S
            self._update(job_id, persist=end is not None or due, events=events, **fields)

        def on_finish(result: Intervention | None, losses: list[float], failure: TrainingFailure | None) -> None:
            self.metrics.training_step_rate.set(0)
            with self._lock:
                gone = job_id not in self._live
            if gone or self._drop_if_lost(job_id):
                return
            if result is None:
                assert failure is not None, "the engine ends a job without a result only with a failure"
                if failure.kind is TrainingEnd.SHUTDOWN and self.jobs.shared:
                    self._release(job_id)  # this replica is stopping: another one runs the job again
                    return
                status = _ENDED_AS[failure.kind]
                failed = status is not JobStatus.CANCELLED
                self._update(job_id, persist=True, status=status, finished_at=now(),
                             error=failure.message if failed else None,
                             error_code=job_error_code(failure.kind) if failed else None)
                return
            # evaluating waits on the engine: never on its thread (nor the reader thread that relays its callbacks)
            threading.Thread(target=self._complete, args=(job_id, tenant, name, work, training, result, losses),
                             name=f"reft-eval-{job_id}", daemon=True).start()

        return TrainingTask(job_id, make_trainer, on_start, on_progress, on_finish)

    def _complete(self, job_id: str, tenant: str, name: str, work: TrainingInput, training: TrainingConfig,
                  result: Intervention, losses: list[float]) -> None:
        """Evaluate the trained intervention, store it as a new version, end the job with its evaluation."""
        metadata = training_metadata(training, len(work.examples), losses) | _epoch_metadata(self._get_live(job_id))
        max_tokens = self.settings.training_eval_max_tokens
        evaluation: dict[str, Any] = {"samples": [], "validation_loss": metadata.get("validation_loss"),
                                      "max_tokens": max_tokens}
        if work.prompts:
            key = encode_artifact(result, self.registry.fingerprint, metadata)[1].digest  # the version's digest
            try:
                evaluation["samples"] = evaluate(self.engine, list(work.prompts), InterventionRef(name, key, result),
                                                 max_tokens=max_tokens, timeout_s=self.settings.request_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the persona is still good; say why there are no samples
                log.warning("evaluation failed", extra={"job": job_id, "error": str(exc)})
                evaluation["error"] = str(exc)
        ended = {"evaluation": evaluation, "status": JobStatus.SUCCEEDED, "finished_at": now()}

        def finish(version: int) -> JobRecord:  # the job's final record, written with the version (PostgreSQL)
            return replace(self._get_live(job_id), **ended, result_version=version)

        try:  # without `replace` the name must still be new when the job ends: a name created meanwhile fails it
            record = self.registry.put_intervention(
                tenant, name, result, metadata, description=work.description, upsert=work.replace,
                job=JobResult(job_id, self.jobs.owner, finish))
        except JobLeaseLostError:  # another replica holds the job now: it registers the result, not us
            self.lose(job_id)
            self._drop_if_lost(job_id)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. disk full: the job fails, nothing is half-registered
            self._update(job_id, persist=True, status="failed", finished_at=now(), error=f"saving failed: {exc}",
                         error_code=JOB_SAVE_FAILED)
            return
        # PostgreSQL wrote the job's end in the version's transaction; the local store records it now
        self._update(job_id, persist=not self.jobs.shared, events=[evaluation_event(evaluation)], **ended,
                     result_version=record.version)

    def _check_new_name(self, tenant: str, name: str) -> None:
        try:
            self.registry.store.get(name, tenant)
        except InterventionNotFoundError:
            return
        raise InterventionExistsError(name, tenant=tenant)

    def _get_live(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._live[job_id]

    def _update(self, job_id: str, *, persist: bool, events: Sequence[Event] = (), **fields: Any) -> None:
        """Change a live job's record; append `events` to its log (and a status event when the status changes) and
        hand them to its watchers. The log of a job that ended is dropped: its record rebuilds it; the job leaves
        memory once its end is stored. A write refused because another replica holds the job stops it here."""
        if "status" in fields:
            self.metrics.training_jobs.labels(status=JobStatus(fields["status"]).value).inc()
        with self._lock:
            if job_id in self._lost or job_id not in self._live:
                return
            job = replace(self._live[job_id], **fields)
            self._live[job_id] = job
            log = self._logs.get(job_id)
            new = [*events, status_event(job)] if "status" in fields else list(events)
            items = []
            if log is not None:
                items = [(len(log) + i, event) for i, event in enumerate(new, start=1)]
                log.extend(new)
                if job.status not in ACTIVE:
                    del self._logs[job_id]
            watchers = list(self._watchers.get(job_id, []))
        self._tell(watchers, items)
        if persist:
            self._written[job_id] = time.monotonic()
            try:
                held = self.jobs.update(job)
            except Exception:
                if job.status in ACTIVE:
                    raise  # the next progress write tries again
                # the end cannot be stored (the database is away): leave the job, so it is not stuck on this replica;
                # on PostgreSQL its lease lapses and another replica runs it again (the same result, for a seed)
                log.exception("could not store the end of a training job", extra={"job": job_id})
                self.jobs.abandon(job_id)
                self._forget(job_id)
                return
            if not held:
                self.lose(job_id)
                self._drop_if_lost(job_id)
                return
        if job.status not in ACTIVE:  # stored (or, on PostgreSQL, stored with its version): leave memory
            self._forget(job_id)

    def _tell(self, watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[int, Event]]]],
              items: Sequence[tuple[int, Event]]) -> None:
        for loop, queue in watchers:
            for item in items:
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _drop_if_lost(self, job_id: str) -> bool:
        """If another replica took the job over, forget it here (its watchers follow the stored record)."""
        with self._lock:
            if job_id not in self._lost:
                return False
            self._lost.discard(job_id)
        log.warning("stopped a training job another replica took over", extra={"job": job_id})
        self._forget(job_id)
        return True

    def _release(self, job_id: str) -> None:
        try:
            self.jobs.release(job_id)  # type: ignore[attr-defined]  # the shared store's method
        except Exception as exc:  # noqa: BLE001 - its lease runs out instead; another replica takes it then
            log.warning("could not release a training job", extra={"job": job_id, "reason": str(exc)})
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._live.pop(job_id, None)
            self._logs.pop(job_id, None)
            self._started.pop(job_id, None)
            self._written.pop(job_id, None)
            watchers = list(self._watchers.get(job_id, []))
        self._tell(watchers, [(0, MOVED)])  # a watcher still waiting here continues from the stored record
        self.on_idle()


def _put(values: list[float], position: int, value: float) -> list[float]:
    """`values` with `value` at 1-based `position`: appended past the end, else replacing (a retry's step)."""
    return [*values, value] if position > len(values) else [*values[:position - 1], value, *values[position:]]


def _epoch_metadata(job: JobRecord) -> dict[str, Any]:
    """The epoch fields of a trained version's metadata, as the library trainer writes them (epoch_metadata)."""
    out: dict[str, Any] = {}
    if job.validation_losses:
        kept = job.auto_stop["kept_epoch"] if job.auto_stop else len(job.validation_losses)
        out |= {"validation_losses": job.validation_losses, "validation_loss": job.validation_losses[kept - 1]}
    if job.auto_stop is not None:
        out["auto_stop"] = job.auto_stop
    return out

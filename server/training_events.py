"""A training job's event log: small deltas (status, step, epoch, auto_stop, evaluation), numbered from 1.

Clients follow a job by these deltas instead of receiving the whole record (and its growing loss history) on every
step. While a job is live the manager appends them to an in-memory log as they happen; once it has ended, the log is
rebuilt from the record by `job_events`, which orders the same facts the same way, so an event keeps its id across
the two (a client resuming with `Last-Event-ID` gets exactly what followed). The builders below are the only place
an event's shape is written, for both paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from adapters_store.jobs import JobRecord

Event = dict[str, Any]
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
MOVED: Event = {"type": "moved"}  # never sent: tells a watcher the job left this process (follow the stored record)
POLL_S = 0.5  # how often a watcher of a job run elsewhere reads its record (the owner writes it about this often)


def status_event(job: JobRecord) -> Event:
    event: Event = {"type": "status", "status": job.status}
    if job.status == "running":
        event["total_steps"] = job.spec.get("planned_steps")
    elif job.status in FINAL_STATUSES:
        event |= {"result_version": job.result_version, "error": job.error}
    return event


def step_event(step: int, epoch: int, loss: float) -> Event:
    return {"type": "step", "step": step, "epoch": epoch, "loss": loss}


def epoch_event(epoch: int, train_loss: float, validation_loss: float | None) -> Event:
    return {"type": "epoch", "epoch": epoch, "train_loss": train_loss, "validation_loss": validation_loss}


def auto_stop_event(auto_stop: dict[str, Any]) -> Event:
    return {"type": "auto_stop", **auto_stop}


def evaluation_event(evaluation: dict[str, Any]) -> Event:
    return {"type": "evaluation", "evaluation": evaluation}


def is_final(event: Event) -> bool:
    return event["type"] == "status" and event["status"] in FINAL_STATUSES


def job_events(job: JobRecord) -> list[Event]:
    """The job's events as the live log recorded them, rebuilt from the record (ids: position + 1)."""
    events = [{"type": "status", "status": "queued"}]
    if job.started_at is not None:
        events.append(status_event(_as(job, "running")))
    per_epoch = int(job.spec.get("steps_per_epoch") or 0)
    for step, loss in enumerate(job.losses, start=1):
        epoch = (step - 1) // per_epoch + 1 if per_epoch else 0
        events.append(step_event(step, epoch, loss))
        if per_epoch and step % per_epoch == 0 and epoch <= len(job.epoch_losses):
            validation = job.validation_losses[epoch - 1] if epoch <= len(job.validation_losses) else None
            events.append(epoch_event(epoch, job.epoch_losses[epoch - 1], validation))
            if job.auto_stop is not None and job.auto_stop.get("epochs_run") == epoch:
                events.append(auto_stop_event(job.auto_stop))
    if job.evaluation is not None:
        events.append(evaluation_event(job.evaluation))
    if job.status in FINAL_STATUSES:
        events.append(status_event(job))
    return events


def _as(job: JobRecord, status: str) -> JobRecord:
    return replace(job, status=status)


async def stored_events(read: Callable[[], Awaitable[JobRecord]], after: int, keepalive_s: float | None,
                        poll_s: float = POLL_S) -> AsyncGenerator[tuple[int, Event] | None, None]:
    """(id, event) after id `after` from the job's stored record, read every `poll_s` until the job ends (its
    owner may be another replica); None after `keepalive_s` without an event (a keep-alive). The ids are the live
    log's: the record rebuilds the same events in the same order, and a retried job's history never goes back."""
    last, quiet = after, 0.0
    while True:
        events = job_events(await read())
        for item in list(enumerate(events, start=1))[last:]:
            last, quiet = item[0], 0.0
            yield item
            if is_final(item[1]):
                return
        if events and is_final(events[-1]):  # ended, and the client has every event already
            return
        await asyncio.sleep(poll_s)
        quiet += poll_s
        if keepalive_s is not None and quiet >= keepalive_s:
            quiet = 0.0
            yield None

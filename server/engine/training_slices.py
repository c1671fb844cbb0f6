"""Training jobs inside the serving loop: the model is the engine's, so a job runs on the engine thread in slices
between serving steps.

While requests are being served, a slice gets `share` of a decode step's time (inter-token latency grows by about
that fraction) and the trainer splits its work finely; with nothing to serve it runs `idle_slice_s` at a time,
which bounds how long a newly arrived request waits for its prefill. One job runs at a time, the rest queue.

`TrainingSlices` owns the queued jobs and the running one; the engine calls it from its thread only.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from reft_core.intervention import Intervention
from reft_core.trainer import ReftTrainer, TrainingProgress
from server.engine.types import CANCELLED_JOB, SHUTDOWN_BEFORE_JOB_ENDED, TrainingEnd, TrainingFailure

log = logging.getLogger("reft_serve.engine")


@dataclass(frozen=True)
class TrainingTask:
    """A training job handed to the engine: it runs in short slices between serving steps.

    Callbacks run on the engine thread and must be quick. `on_finish(intervention, losses, failure)`: intervention is
    None when the job did not succeed, and `failure` says how it ended (failed, cancelled, shut down) and why.
    """

    job_id: str
    # Called with the engine's model on the engine thread (its set-up runs the model). Picklable (e.g. a
    # functools.partial of ReftTrainer) when the engine runs in its own process.
    make_trainer: Callable[[nn.Module], ReftTrainer]
    on_start: Callable[[int], None]  # total steps
    on_progress: Callable[[TrainingProgress], None]
    on_finish: Callable[[Intervention | None, list[float], TrainingFailure | None], None]


class TrainingSlices:
    def __init__(self, model: nn.Module, share: float, idle_slice_s: float) -> None:
        self._model, self._share, self._idle_slice_s = model, share, idle_slice_s
        self._queued: deque[TrainingTask] = deque()
        self._current: tuple[TrainingTask, ReftTrainer] | None = None

    @property
    def idle(self) -> bool:
        return self._current is None and not self._queued

    def add(self, task: TrainingTask) -> None:
        self._queued.append(task)

    def cancel(self, job_id: str) -> None:
        if self._current is not None and self._current[0].job_id == job_id:
            task, trainer = self._current
            self._current = None
            call_quietly(task.on_finish, None, trainer.losses, CANCELLED_JOB)
            return
        for task in [t for t in self._queued if t.job_id == job_id]:
            self._queued.remove(task)
            call_quietly(task.on_finish, None, [], CANCELLED_JOB)

    def close(self) -> None:
        """The engine is stopping: every job, running or queued, ends as shut down."""
        pending = [self._current[0]] if self._current is not None else []
        self._current = None
        for task in pending + list(self._queued):
            call_quietly(task.on_finish, None, [], SHUTDOWN_BEFORE_JOB_ENDED)
        self._queued.clear()

    def run_slice(self, serving: bool, decode_step_s: float) -> None:
        """Run the current job for a bounded time (starting the next queued one if needed). `serving`: requests
        are running or waiting; `decode_step_s`: what a decode step takes now."""
        if self._current is None:
            if not self._queued:
                return
            task = self._queued.popleft()
            try:
                trainer = task.make_trainer(self._model)
            except Exception as exc:  # noqa: BLE001 - a bad job fails alone
                log.exception("training set-up failed", extra={"job": task.job_id})
                call_quietly(task.on_finish, None, [], _failed(f"training could not start: {exc}"))
                return
            self._current = (task, trainer)
            call_quietly(task.on_start, trainer.total_steps)
        task, trainer = self._current
        budget = self._share * decode_step_s if serving else self._idle_slice_s
        trainer.fine_slices = serving  # alone, whole buckets are faster; a request arriving waits one slice at most
        try:
            progress = trainer.advance(deadline=time.perf_counter() + budget)
            if progress is not None and not math.isfinite(progress.loss):
                raise FloatingPointError(f"loss became {progress.loss} at step {progress.step}")
        except Exception as exc:  # noqa: BLE001
            log.exception("training step failed", extra={"job": task.job_id})
            self._current = None
            call_quietly(task.on_finish, None, trainer.losses, _failed(f"training failed: {exc}"))
            return
        if progress is None:
            return
        call_quietly(task.on_progress, progress)
        if trainer.done:
            self._current = None
            try:
                result = trainer.result()
            except Exception as exc:  # noqa: BLE001
                log.exception("training result failed", extra={"job": task.job_id})
                call_quietly(task.on_finish, None, trainer.losses, _failed(f"training failed: {exc}"))
                return
            call_quietly(task.on_finish, result, trainer.losses, None)


def _failed(message: str) -> TrainingFailure:
    return TrainingFailure(TrainingEnd.FAILED, message)


def call_quietly(callback: Callable[..., Any], *args: Any) -> Any:
    """Run a job or detokenizer callback; its failure is logged, never raised into the engine loop."""
    try:
        return callback(*args)
    except Exception:  # noqa: BLE001
        log.exception("engine callback failed")
        return None

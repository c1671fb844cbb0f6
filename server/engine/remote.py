"""The engine in a process of its own: `RemoteEngine` (in the API process) and `engine_process_main` (the child).

Why a process: in one process the engine thread shares the GIL with the event loop, so every torch op it waits on
can be followed by a wait for the GIL while the loop serves HTTP; measured, its forwards ran ~1.4x slower than
alone. The child owns the model, the bank, the KV cache and the engine loop; the API process keeps HTTP,
tokenization, the store and the job records, and never loads the weights.

The boundary is one duplex pipe carrying small picklable messages:
  API -> engine: ("submit", GenerationRequest) | ("cancel", id) | ("train", job_id, make_trainer) |
                 ("cancel_training", job_id) | ("drain",) | ("stop",)
  engine -> API: ("ready", ModelInfo) | ("load_failed", reason) |
                 ("batch", [outbox items], [metric ops], failure)  -- one per engine iteration
Outbox items keep their order: ("event", request_id, GenerationEvent) or ("training", job_id, callback, args).

`RemoteEngine` has the interface of `Engine` that the rest of the server uses (submit, cancel, submit_training,
cancel_training, drain, stop, running, failure, max_context). If the child dies, every pending request and job
fails at once and `failure` says why (so `/health` turns 503); if the API process dies, the child sees the pipe
close and exits.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from reft_core.fingerprint import ModelFingerprint
from reft_core.frozen_context import ModelDims
from server.engine.engine import Engine, TrainingTask, closed_reason
from server.engine.launch import EngineLaunch, EngineProcessSpec, launch  # EngineProcessSpec: re-exported
from server.engine.metrics_relay import MetricsRecorder, replay
from server.engine.sequence import EventSink
from server.engine.types import (
    SHUTDOWN_BEFORE_JOB_ENDED, ErrorKind, FinishReason, GenerationEvent, GenerationRequest,
)
from server.metrics import Metrics

log = logging.getLogger("reft_serve.engine_process")


@dataclass(frozen=True)
class ModelInfo:
    """What the API process learns about the model from the child (it never loads the weights itself)."""

    fingerprint: ModelFingerprint
    dims: ModelDims
    max_context: int
    device: str
    dtype: str
    model_dir: Path | None = None  # the local HF directory the child loaded (the API process's tokenizer is there)


class EngineStartError(RuntimeError):
    pass


class RemoteEngine:
    def __init__(self, process: EngineProcessSpec | EngineLaunch, metrics: Metrics) -> None:
        """`process`: one started already (`server.engine.launch.launch`, which `reft-serve serve` calls before its
        heavy imports), or the spec of one to start in `start`."""
        self.metrics = metrics
        self._spec = process if isinstance(process, EngineProcessSpec) else None
        self._launched = process if isinstance(process, EngineLaunch) else None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()  # guards the maps below and `_closed`
        self._sinks: dict[str, EventSink] = {}
        self._tasks: dict[str, TrainingTask] = {}
        self._closed = False
        self._stopping = False
        self._failure: str | None = None
        self._reader: threading.Thread | None = None
        self.info: ModelInfo | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> ModelInfo:
        """Start the child (unless it was launched already) and wait until its model is loaded; raises
        EngineStartError if it cannot load."""
        if self._launched is None:
            assert self._spec is not None
            self._launched = launch(self._spec)
        if not self._conn.poll(timeout):
            self._process.kill()
            raise EngineStartError(f"the engine process did not load the model within {timeout:g} s")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineStartError(f"the engine process exited while loading (code {self._process.exitcode})") from None
        if message[0] != "ready":
            self._process.join(5)
            raise EngineStartError(message[1])
        self.info = message[1]
        self._reader = threading.Thread(target=self._read, name="reft-engine-reader", daemon=True)
        self._reader.start()
        return self.info

    def stop(self, timeout: float = 10.0) -> None:
        if self._launched is None:  # never started
            return
        self._stopping = True
        self._send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(timeout)
        self._on_exit()

    @property
    def running(self) -> bool:
        return self.info is not None and self._process.is_alive() and not self._closed

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def max_context(self) -> int:
        assert self.info is not None, "start() first"
        return self.info.max_context

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._launched is not None else None

    @property
    def _process(self) -> BaseProcess:
        assert self._launched is not None, "start() first"
        return self._launched.process

    @property
    def _conn(self) -> Connection:
        assert self._launched is not None, "start() first"
        return self._launched.conn

    # -- the Engine interface --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        with self._state_lock:
            accepted = not self._closed
            if accepted:
                self._sinks[request.request_id] = sink
        if accepted and self._send(("submit", request)):
            return
        with self._state_lock:
            still_ours = self._sinks.pop(request.request_id, None) is not None
        if accepted and not still_ours:
            return  # the exit handler already failed it
        kind, error = self._closed_reason()
        sink(GenerationEvent(text="", token_ids=(), finish_reason=FinishReason.ERROR, error=error, error_kind=kind,
                             prompt_tokens=len(request.prompt_ids)))

    def cancel(self, request_id: str) -> None:
        self._send(("cancel", request_id))

    def submit_training(self, task: TrainingTask) -> None:
        with self._state_lock:
            accepted = not self._closed
            if accepted:
                self._tasks[task.job_id] = task
        if not (accepted and self._send(("train", task.job_id, task.make_trainer))):
            with self._state_lock:
                self._tasks.pop(task.job_id, None)
            task.on_finish(None, [], SHUTDOWN_BEFORE_JOB_ENDED)

    def cancel_training(self, job_id: str) -> None:
        self._send(("cancel_training", job_id))

    def drain(self) -> None:
        self._send(("drain",))

    # -- the API process's side of the pipe ------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> bool:
        with self._send_lock:
            try:
                self._conn.send(message)
                return True
            except (OSError, ValueError, EOFError):  # the child is gone (or the pipe closed)
                return False

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(message)
            except Exception:  # noqa: BLE001 - one bad delivery must not stop every other request's events
                log.exception("could not deliver engine output")
        self._on_exit()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        _, items, metric_ops, failure = message
        replay(self.metrics, metric_ops)
        if failure is not None:
            self._failure = failure
        for item in items:
            if item[0] == "event":
                self._deliver(item[1], item[2])
            else:
                self._training_callback(*item[1:])

    def _deliver(self, request_id: str, event: GenerationEvent) -> None:
        with self._state_lock:
            sink = self._sinks.get(request_id) if event.finish_reason is None else self._sinks.pop(request_id, None)
        if sink is not None:
            sink(event)

    def _training_callback(self, job_id: str, callback: str, args: tuple[Any, ...]) -> None:
        with self._state_lock:
            task = self._tasks.pop(job_id, None) if callback == "on_finish" else self._tasks.get(job_id)
        if task is not None:
            getattr(task, callback)(*args)

    def _closed_reason(self) -> tuple[ErrorKind, str]:
        return closed_reason(self._failure)

    def _on_exit(self) -> None:
        """The child is gone: whatever was pending fails now (once)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            if not self._stopping and self._failure is None:
                self._process.join(1)
                self._failure = f"the engine process exited (exit code {self._process.exitcode})"
            sinks, self._sinks = self._sinks, {}
            tasks, self._tasks = self._tasks, {}
        if self._failure is not None:
            log.critical("engine process ended", extra={"reason": self._failure})
        kind, error = self._closed_reason()
        for sink in sinks.values():
            sink(GenerationEvent(text="", token_ids=(), finish_reason=FinishReason.ERROR, error=error, error_kind=kind))
        for task in tasks.values():
            task.on_finish(None, [], SHUTDOWN_BEFORE_JOB_ENDED)


class EngineHandle(Protocol):
    """What the rest of the server holds: the engine on a thread of this process (`Engine`), in a process of its
    own (`RemoteEngine`), or replicas on Ray Serve (`server.ray_serve.RayEngine`)."""

    @property
    def running(self) -> bool: ...
    @property
    def failure(self) -> str | None: ...
    @property
    def max_context(self) -> int: ...
    def submit(self, request: GenerationRequest, sink: EventSink) -> None: ...
    def cancel(self, request_id: str) -> None: ...
    def submit_training(self, task: TrainingTask) -> None: ...
    def cancel_training(self, job_id: str) -> None: ...
    def drain(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...


# -- the engine process ------------------------------------------------------------------------------------------

class _Outbox:
    """Everything the engine produced in one iteration, sent as one message (thread-safe: the engine thread
    produces, and the command thread too once the engine has stopped)."""

    def __init__(self, conn: Connection, engine: Engine, recorder: MetricsRecorder) -> None:
        self._conn, self._engine, self._recorder = conn, engine, recorder
        self._items: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def sink(self, request_id: str) -> EventSink:
        def sink(event: GenerationEvent) -> None:
            with self._lock:
                self._items.append(("event", request_id, event))
        return sink

    def training(self, job_id: str, make_trainer: Callable[..., Any]) -> TrainingTask:
        def relay(callback: str) -> Callable[..., None]:
            def record(*args: Any) -> None:
                with self._lock:
                    self._items.append(("training", job_id, callback, args))
            return record
        return TrainingTask(job_id, make_trainer, relay("on_start"), relay("on_progress"), relay("on_finish"))

    def flush(self) -> None:
        with self._lock:
            ops = self._recorder.take()
            if not self._items and not ops and self._engine.failure is None:
                return
            items, self._items = self._items, []
            try:
                self._conn.send(("batch", items, ops, self._engine.failure))
            except (OSError, ValueError):
                pass  # the API process is gone; the command loop sees EOF and stops the engine


def engine_process_main(spec: EngineProcessSpec, conn: Connection) -> None:
    """Entry point of the engine process: load the model, run the engine, apply commands until told to stop or
    until the API process goes away."""
    from reft_core.base_model import load_base_model, resolve_model_dir
    from server.logging_setup import configure_logging

    configure_logging(spec.log_level, spec.log_format)
    try:
        model_dir = resolve_model_dir(spec.model, spec.model_cache_dir)  # a GGUF file is converted once, here
        base = load_base_model(model_dir, device=spec.device, dtype=spec.dtype)
    except Exception as exc:  # noqa: BLE001 - reported to the API process, which reports it on /ready
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    recorder = MetricsRecorder()
    engine = Engine(base.model, base.tokenizer, spec.engine, recorder)  # type: ignore[arg-type]
    outbox = _Outbox(conn, engine, recorder)
    engine.after_iteration = outbox.flush
    info = ModelInfo(base.fingerprint, ModelDims.from_model(base.model), engine.max_context, str(base.device),
                     str(base.dtype), model_dir)
    conn.send(("ready", info))
    log.info("engine process ready", extra={"pid": os.getpid(), "device": str(base.device)})
    # The loop gets the main thread and commands arrive on another one: measured side by side on the 2-core CPU
    # (16 clients, mixed lengths, 3 rounds each), forwards ran 88-96 ms a step on the main thread against 104-117 ms
    # on a second thread (throughput 111-124 vs 94-106 tok/s). In-process the same holds for `ModelRunner.decode`
    # (~10%); plain matmuls show no difference, and the cause is not pinned down (a second thread also took more
    # page faults per forward in some runs: glibc gives it a malloc arena of its own).
    commands = threading.Thread(target=_serve_commands, args=(conn, engine, outbox), name="reft-engine-commands",
                                daemon=True)
    commands.start()
    engine.run_here()
    commands.join()  # a dead engine still answers commands (refusals) until the API process stops or goes away
    outbox.flush()
    conn.close()


def _serve_commands(conn: Connection, engine: Engine, outbox: _Outbox) -> None:
    try:
        _apply_commands(conn, engine, outbox)
    finally:
        engine.stop()


def _apply_commands(conn: Connection, engine: Engine, outbox: _Outbox) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the API process is gone
        kind = message[0]
        if kind == "submit":
            engine.submit(message[1], outbox.sink(message[1].request_id))
        elif kind == "cancel":
            engine.cancel(message[1])
        elif kind == "train":
            engine.submit_training(outbox.training(message[1], message[2]))
        elif kind == "cancel_training":
            engine.cancel_training(message[1])
        elif kind == "drain":
            engine.drain()
        elif kind == "stop":
            return
        if not engine.running:
            outbox.flush()  # the engine thread is gone: what the command produced (a refusal) goes out now

"""Training jobs over HTTP: validate, queue on the engine, track progress, register the result.

The engine runs training in short slices between serving steps (see `TrainingTask`), so generation keeps flowing
while a persona trains. This module owns the job records: their state in memory (guarded by a lock, since
engine callbacks arrive on the engine thread), their persistence in the job store, and the event streams of
clients watching a job. A job registers its intervention only on success; a failed or cancelled job registers
nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from adapters_store import InterventionExistsError, InterventionNotFoundError, validate_name
from adapters_store.jobs import JobNotFoundError, JobRecord, JobStatus, JobStore, now
from reft_core import recipe
from reft_core.config import MAX_RANK, InterventionConfig, check_rank
from reft_core.examples import ChatExample, Example, TokenizedExample, encode_chat_prompt, encode_prompt
from reft_core.frozen_context import ModelDims
from reft_core.intervention import Intervention
from reft_core.trainer import ReftTrainer, TrainingConfig, TrainingProgress, training_metadata
from reft_core.training_memory import TrainingMemory, estimate_training_memory
from server.engine.engine import TrainingTask
from server.engine.types import TrainingEnd, TrainingFailure
from server.engine.remote import EngineHandle
from server.errors import APIError
from server.metrics import Metrics
from server.registry import InterventionRegistry
from server.settings import TRAINING_EXAMPLES_CEILING, Settings

log = logging.getLogger("reft_serve.training")
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
# How an engine-side ending becomes the job's record: a cancelled job has no error; a failed or shut-down one says why
_ENDED_AS: dict[TrainingEnd, JobStatus] = {
    TrainingEnd.FAILED: JobStatus.FAILED, TrainingEnd.SHUTDOWN: JobStatus.FAILED, TrainingEnd.CANCELLED: JobStatus.CANCELLED,
}


class ExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ExampleIn:
        if self.messages is None and (not self.prompt or not self.completion):
            raise ValueError("each example needs a non-empty prompt and completion, or messages")
        if self.messages is not None:
            if len(self.messages) < 2 or self.messages[-1].get("role") != "assistant":
                raise ValueError("messages must end with the assistant turn to learn")
            if not all(isinstance(m.get("content"), str) and m.get("content") for m in self.messages):
                raise ValueError("every message needs non-empty text content")
        return self

    def as_chat(self) -> ChatExample:
        assert self.messages is not None
        return ChatExample(tuple((m.get("role", "user"), m["content"]) for m in self.messages))

    def as_example(self) -> Example | ChatExample:
        """The library's form of this example (what `reft_core.examples.tokenize_examples` takes)."""
        return self.as_chat() if self.messages is not None else Example(self.prompt or "", self.completion or "")


class InterventionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["loreft", "direft", "noreft"] = recipe.TYPE
    layers: list[int] | None = None  # default: the recipe's, relative to the model's depth
    rank: int = Field(recipe.RANK, ge=1, le=MAX_RANK)  # and at most the server's max_intervention_rank (at submit)
    positions: str = recipe.POSITIONS
    share_weights: bool = recipe.SHARE_WEIGHTS


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(recipe.EPOCHS, ge=1)
    learning_rate: float = Field(recipe.LEARNING_RATE, gt=0, le=1)
    batch_size: int = Field(recipe.BATCH_SIZE, ge=1, le=1024)
    seed: int = Field(recipe.SEED, ge=0)


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # max_length is checked on the raw list before its items are validated (the configured limit comes after)
    examples: list[ExampleIn] = Field(min_length=1, max_length=TRAINING_EXAMPLES_CEILING)
    intervention: InterventionSpec = InterventionSpec()
    hyperparameters: Hyperparameters = Hyperparameters()
    chat_template: bool = True
    description: str | None = Field(None, max_length=2000)  # None: empty, or the current version's when replacing
    replace: bool = False  # store a new version if the name exists; otherwise an existing name is a 409 at submit


class TrainingManager:
    def __init__(
        self, engine: EngineHandle, registry: InterventionRegistry, tokenizer: Any, jobs: JobStore, settings: Settings,
        dims: ModelDims, *, metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.engine, self.registry, self.tokenizer, self.jobs, self.settings = engine, registry, tokenizer, jobs, settings
        self.dims = dims  # the model's sizes (config numbers only), for admission estimates
        self.num_layers, self.hidden_size = dims.num_layers, dims.hidden_size
        self._lock = threading.Lock()
        self._live: dict[str, JobRecord] = {}
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[JobRecord]]]] = {}
        self._started: dict[str, float] = {}
        for job in jobs.recover_interrupted():
            log.warning("marked interrupted training job failed", extra={"job": job.id, "intervention": job.name})

    # -- requests (each acts on one tenant's jobs; another tenant's job is a 404) ------------------------------------
    async def submit(self, body: TrainingRequest, tenant: str = "default", max_for_tenant: int | None = None) -> JobRecord:
        """Validate and queue; `max_for_tenant` caps the tenant's queued + running jobs (None: no cap)."""
        validate_name(body.name)
        s = self.settings
        if len(body.examples) > s.max_training_examples:
            raise APIError(400, f"{len(body.examples)} examples; the limit is {s.max_training_examples}", param="examples")
        if body.hyperparameters.epochs > s.max_training_epochs:
            raise APIError(400, f"epochs is limited to {s.max_training_epochs}", param="hyperparameters.epochs")
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
        examples = await run_in_threadpool(self._tokenize, body)
        memory = self._admit_memory(config, examples, training.batch_size)
        with self._lock:
            active = [j for j in self._live.values() if j.status in ACTIVE]
            if len(active) >= s.max_queued_trainings:
                raise APIError(429, f"{len(active)} training jobs are already queued or running; the limit is "
                               f"{s.max_queued_trainings}", type="rate_limit_error", code="too_many_trainings",
                               headers={"Retry-After": "30"})
            own = sum(1 for j in active if j.tenant == tenant)
            if max_for_tenant is not None and own >= max_for_tenant:
                raise APIError(429, f"this tenant has {own} training jobs queued or running; its limit is "
                               f"{max_for_tenant}", type="rate_limit_error", code="too_many_trainings",
                               headers={"Retry-After": "30"})
            job = JobRecord(id=f"ftjob-{uuid.uuid4().hex[:24]}", name=body.name, status=JobStatus.QUEUED, tenant=tenant,
                            spec={"intervention": config.to_dict(), "hyperparameters": training.to_dict(),
                                  "examples": len(examples), "description": body.description,
                                  "memory": {"kept_bytes": memory.kept_bytes, "working_bytes": memory.working_bytes}})
            self._live[job.id] = job
        self.metrics.training_jobs.labels(status=JobStatus.QUEUED.value).inc()
        try:
            await run_in_threadpool(self.jobs.save, job)
        except Exception:  # e.g. a read-only data directory: the job was never accepted
            with self._lock:
                self._live.pop(job.id, None)
            raise
        self.engine.submit_training(self._task(job.id, tenant, body, config, training, examples))
        return job

    def _admit_memory(self, config: InterventionConfig, examples: list[TokenizedExample], batch_size: int) -> TrainingMemory:
        """The job's memory estimate; 400 when even recomputing every context leaves too much working memory.

        The kept part needs no check: the context budget caps it (recomputation replaces the rest).
        """
        s = self.settings
        memory = estimate_training_memory(self.dims, config, examples, batch_size=batch_size,
                                          context_budget_bytes=s.training_context_budget_bytes,
                                          max_micro_batch_tokens=s.training_max_micro_batch_tokens)
        if memory.working_bytes > s.max_training_working_bytes:
            raise APIError(400, f"this job's largest micro-batch needs about {_mib(memory.working_bytes)} of working "
                           f"memory; the limit (max_training_working_bytes) is {_mib(s.max_training_working_bytes)}: "
                           "use shorter examples, a smaller batch_size, or a higher lowest layer (fewer layers to run)",
                           param="examples", code="training_memory_exceeded")
        return memory

    def _tokenize(self, body: TrainingRequest) -> list[TokenizedExample]:
        tokenized = []
        eos = self.tokenizer.eos_token_id
        for index, example in enumerate(body.examples):
            if example.messages is not None:
                chat = example.as_chat()
                prompt_ids, completion = encode_chat_prompt(self.tokenizer, chat), chat.completion
            else:
                prompt_ids = encode_prompt(self.tokenizer, example.prompt or "", chat_template=body.chat_template)
                completion = example.completion or ""
            completion_ids = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eos]
            if len(prompt_ids) + len(completion_ids) > self.settings.max_example_tokens:
                raise APIError(400, f"example {index} has {len(prompt_ids) + len(completion_ids)} tokens; the limit "
                               f"is {self.settings.max_example_tokens}", param=f"examples.{index}")
            tokenized.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids)))
        return tokenized

    def get(self, job_id: str, tenant: str = "default") -> JobRecord:
        with self._lock:
            live = self._live.get(job_id)
        job = live or self.jobs.get(job_id)
        if job.tenant != tenant:
            raise JobNotFoundError(job_id)
        return job

    def list(self, tenant: str = "default") -> list[JobRecord]:
        stored = {j.id: j for j in self.jobs.list(tenant)}
        with self._lock:
            stored.update({k: j for k, j in self._live.items() if j.tenant == tenant})
        return sorted(stored.values(), key=lambda j: j.created_at)

    def jobs_by_version(self, tenant: str, name: str) -> dict[int, str]:
        """The id of the job that trained each version of one of the tenant's names (uploads have none)."""
        return {j.result_version: j.id for j in self.jobs.list(tenant) if j.name == name and j.result_version}

    def cancel(self, job_id: str, tenant: str = "default") -> JobRecord:
        job = self.get(job_id, tenant)
        if job.status in ACTIVE:
            self.engine.cancel_training(job_id)
        return job

    async def events(self, job_id: str, tenant: str = "default") -> AsyncGenerator[JobRecord, None]:
        """The job now, then every update until it ends."""
        queue: asyncio.Queue[JobRecord] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._watchers.setdefault(job_id, []).append(entry)
        try:
            job = self.get(job_id, tenant)
            while True:
                yield job
                if job.status not in ACTIVE:
                    return
                job = await queue.get()
        finally:
            with self._lock:
                self._watchers.get(job_id, []).remove(entry)

    # -- engine callbacks (engine thread) --------------------------------------------------------------------------
    def _task(self, job_id: str, tenant: str, body: TrainingRequest, config: InterventionConfig,
              training: TrainingConfig, examples: list[TokenizedExample]) -> TrainingTask:
        # a partial, not a closure: it crosses to the engine process, which calls it with its model
        s = self.settings
        make_trainer = functools.partial(
            ReftTrainer, config=config, examples=examples, training=training,
            micro_batch_tokens=s.training_micro_batch_tokens, head_chunk_tokens=s.training_head_chunk_tokens,
            context_budget_bytes=s.training_context_budget_bytes, max_micro_batch_tokens=s.training_max_micro_batch_tokens,
        )

        def on_start(total: int) -> None:
            self._started[job_id] = time.perf_counter()
            self._update(job_id, persist=True, status=JobStatus.RUNNING, started_at=now(),
                         progress={"step": 0, "total_steps": total, "epoch": 0})

        def on_progress(p: TrainingProgress) -> None:
            elapsed = time.perf_counter() - self._started[job_id]
            remaining = elapsed / p.step * (p.total_steps - p.step)
            progress = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "loss": p.loss,
                        "elapsed_s": round(elapsed, 2), "remaining_s": round(remaining, 2)}
            with self._lock:
                losses = [*self._live[job_id].losses, p.loss]
                done = self._live[job_id].progress.get("step", 0)
            self.metrics.training_steps.inc(max(0, p.step - done))
            self.metrics.training_step_rate.set(p.step / max(elapsed, 1e-9))
            self._update(job_id, persist=p.step % 10 == 0, progress=progress, losses=losses)

        def on_finish(result: Intervention | None, losses: list[float], failure: TrainingFailure | None) -> None:
            self.metrics.training_step_rate.set(0)
            if result is None:
                assert failure is not None, "the engine ends a job without a result only with a failure"
                status = _ENDED_AS[failure.kind]
                self._update(job_id, persist=True, status=status, finished_at=now(),
                             error=None if status is JobStatus.CANCELLED else failure.message)
                return
            try:
                metadata = training_metadata(training, len(examples), losses)
                record = self._register(tenant, body, result, metadata)
            except Exception as exc:  # noqa: BLE001 - e.g. disk full: the job fails, nothing is half-registered
                self._update(job_id, persist=True, status=JobStatus.FAILED, finished_at=now(), error=f"saving failed: {exc}")
                return
            self._update(job_id, persist=True, status=JobStatus.SUCCEEDED, finished_at=now(), result_version=record.version)

        return TrainingTask(job_id, make_trainer, on_start, on_progress, on_finish)

    def _check_new_name(self, tenant: str, name: str) -> None:
        try:
            self.registry.store.get(name, tenant)
        except InterventionNotFoundError:
            return
        raise InterventionExistsError(name, tenant=tenant)

    def _register(self, tenant: str, body: TrainingRequest, result: Intervention, metadata: dict[str, Any]):  # noqa: ANN202
        # without `replace` the name must still be new when the job ends: a name created meanwhile fails the job
        return self.registry.put_intervention(tenant, body.name, result, metadata, description=body.description,
                                              upsert=body.replace)

    def _get_live(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._live[job_id]

    def _update(self, job_id: str, *, persist: bool, **fields: Any) -> None:
        if "status" in fields:
            self.metrics.training_jobs.labels(status=JobStatus(fields["status"]).value).inc()
        with self._lock:
            job = replace(self._live[job_id], **fields)
            self._live[job_id] = job
            watchers = list(self._watchers.get(job_id, []))
        for loop, queue in watchers:
            loop.call_soon_threadsafe(queue.put_nowait, job)
        if persist:
            self.jobs.save(job)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"

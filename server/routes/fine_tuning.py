"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API over the same training jobs as `/v1/trainings`.

A job is created from uploaded files (`/v1/files`), parsed again under today's limits, and submitted to the
training manager like any other job; every object returned is a view of the job's record (server/fine_tuning.py).
Lists are newest first with OpenAI's cursor pagination. Another tenant's job is a 404 like a missing one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from adapters_store import TrainingFileNotFoundError
from adapters_store.jobs import JobRecord
from server.auth import Principal, principal
from server.dependencies import Services, services
from server.errors import APIError
from server.fine_tuning import (
    FineTuningJobCreate,
    checkpoint_objects,
    fine_tuning_spec,
    intervention_name,
    openai_events,
    job_object,
    training_request,
)
from server.jsonl import parse_examples
from server.pagination import cursor_page, list_body
from server.training import ACTIVE
from server.training_request import ExampleIn

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
CANCEL_WAIT_S = 5.0  # a cancel answers once the job has stopped (a running step finishes first), or after this


async def _examples(svc: Services, tenant: str, file_id: str, param: str) -> list[ExampleIn]:
    try:
        payload = await run_in_threadpool(svc.store.training_files.read, tenant, file_id)
    except TrainingFileNotFoundError:
        raise APIError(400, f"{param}: file '{file_id:.80}' does not exist", param=param,
                       code="file_not_found") from None
    return parse_examples(payload, svc.settings.max_training_examples, source=f"{param} '{file_id}'", param=param)


@router.post("")
async def create_job(
    body: FineTuningJobCreate, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Create a fine-tuning job: a persona named by `suffix`, trained on `training_file`, servable when done."""
    if body.model != svc.model_id:
        raise APIError(400, f"model '{body.model:.200}' cannot be fine-tuned here: use the served base model "
                       f"'{svc.model_id}'", param="model", code="model_not_available")
    name = intervention_name(body.suffix)
    examples = await _examples(svc, who.tenant, body.training_file, "training_file")
    validation = None
    if body.validation_file is not None:
        validation = await _examples(svc, who.tenant, body.validation_file, "validation_file")
    try:
        request = training_request(body, name, examples, validation)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    cap = None if who.admin else svc.settings.limit("max_trainings_per_tenant", who.limits)
    spec = fine_tuning_spec(body, None if validation is None else len(validation))
    job = await svc.training.submit(request, who.tenant, cap, fine_tuning=spec)
    return job_object(job, svc.model_id)


@router.get("")
async def list_jobs(
    after: str | None = Query(None, description="the last job id of the previous page"),
    limit: int = Query(20, ge=1, le=100), who: Principal = Depends(principal), svc: Services = Depends(services),
) -> dict[str, Any]:
    """List your training jobs, newest first (jobs created through /v1/trainings too)."""
    jobs = list(reversed(await run_in_threadpool(svc.training.list, who.tenant)))
    page, has_more = cursor_page(jobs, lambda job: job.id, after, limit)
    return list_body([job_object(job, svc.model_id) for job in page], has_more)


@router.get("/{job_id}")
async def retrieve_job(
    job_id: str, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """One job: status, hyperparameters, `fine_tuned_model` once it succeeded."""
    return job_object(await run_in_threadpool(svc.training.get, job_id, who.tenant), svc.model_id)


@router.post("/{job_id}/cancel")
async def cancel_job(
    job_id: str, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Cancel a queued or running job; answers with the job once it has stopped (a finished job, unchanged)."""
    job = await run_in_threadpool(svc.training.cancel, job_id, who.tenant)
    return job_object(await _settled(svc, job), svc.model_id)


async def _settled(svc: Services, job: JobRecord) -> JobRecord:
    """The job once it leaves queued/running, or as it is after CANCEL_WAIT_S (polled: the record is in memory)."""
    deadline = time.monotonic() + CANCEL_WAIT_S
    while job.status in ACTIVE and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        job = await run_in_threadpool(svc.training.get, job.id, job.tenant)
    return job


@router.get("/{job_id}/events")
async def list_events(
    job_id: str, after: str | None = Query(None, description="the last event id of the previous page"),
    limit: int = Query(20, ge=1, le=1000), who: Principal = Depends(principal), svc: Services = Depends(services),
) -> dict[str, Any]:
    """The job's events, newest first: messages, and a `metrics` event per step (`step`, `train_loss`)."""
    return await _job_list(svc, who, job_id, lambda job: list(reversed(openai_events(job))), after, limit)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(
    job_id: str, after: str | None = Query(None, description="the last checkpoint id of the previous page"),
    limit: int = Query(10, ge=1, le=100), who: Principal = Depends(principal), svc: Services = Depends(services),
) -> dict[str, Any]:
    """The job's checkpoints: once it succeeded, the version it stored, as a pinned model `name@N`."""
    return await _job_list(svc, who, job_id, checkpoint_objects, after, limit)


async def _job_list(svc: Services, who: Principal, job_id: str, objects: Callable[[JobRecord], list[dict[str, Any]]],
                    after: str | None, limit: int) -> dict[str, Any]:
    """One page of a list derived from the caller's job (a 404 for another tenant's), by object id."""
    job = await run_in_threadpool(svc.training.get, job_id, who.tenant)
    page, has_more = cursor_page(objects(job), lambda item: item["id"], after, limit)
    return list_body(page, has_more)

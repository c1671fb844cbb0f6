"""`/v1/trainings`: create a persona from examples while the server keeps serving; watch, list, cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.auth import Principal, principal
from server.dependencies import services
from server.errors import APIError
from server.jsonl import parse_examples
from server.pagination import MAX_PAGE, cursor_page, list_body, page_size
from server.training import TrainingManager
from server.training_request import TrainingRequest

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])


def manager(request: Request) -> TrainingManager:
    return services(request).training


def _job(job: Any) -> dict[str, Any]:
    body = job.to_dict()
    return {"object": "training.job", **body, "intervention": body["name"]}


async def _submit(who: Principal, trainings: TrainingManager, body: TrainingRequest) -> JSONResponse:
    cap = None if who.admin else trainings.settings.limit("max_trainings_per_tenant", who.limits)
    return JSONResponse(_job(await trainings.submit(body, who.tenant, cap)), status_code=202)


@router.post("", status_code=202)
async def create_training(
    body: TrainingRequest, who: Principal = Depends(principal),
    trainings: TrainingManager = Depends(manager),
) -> JSONResponse:
    """Queue a training job; the intervention is stored and servable when it succeeds."""
    return await _submit(who, trainings, body)


@router.post("/upload", status_code=202)
async def create_training_from_file(
    name: str = Form(..., description="name of the intervention to create (or, with replace, a new version of)"),
    file: UploadFile = File(..., description="JSONL: one example per line, {prompt, completion} or {messages}"),
    intervention: str | None = Form(None, description="JSON object, as `intervention` in POST /v1/trainings"),
    hyperparameters: str | None = Form(None, description="JSON object, as `hyperparameters` in POST /v1/trainings"),
    chat_template: bool = Form(True),
    description: str | None = Form(None),
    replace: bool = Form(False, description="store a new version if the name exists (otherwise 409)"),
    who: Principal = Depends(principal),
    trainings: TrainingManager = Depends(manager),
) -> JSONResponse:
    """Queue a training job whose examples come from an uploaded JSONL file."""
    limit = trainings.settings.max_upload_bytes
    payload = await file.read(limit + 1)
    if len(payload) > limit:
        raise APIError(413, f"upload is larger than the {limit} byte limit", code="payload_too_large", param="file")
    fields: dict[str, Any] = {"name": name, "chat_template": chat_template, "description": description,
                              "replace": replace,
                              "examples": parse_examples(payload, trainings.settings.max_training_examples)}
    for key, text in (("intervention", intervention), ("hyperparameters", hyperparameters)):
        if text:
            fields[key] = _json_object(text, key)
    try:
        body = TrainingRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return await _submit(who, trainings, body)


def _json_object(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{param} is not valid JSON: {exc.msg}", param=param, code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param} must be a JSON object", param=param, code="invalid_value")
    return value


@router.get("")
async def list_trainings(
    after: str | None = Query(None, max_length=200, description="the last job id of the previous page"),
    limit: int | None = Query(None, ge=1, le=MAX_PAGE, description=f"at most this many jobs (default and maximum "
                                                                   f"{MAX_PAGE}; page on with `after`)"),
    who: Principal = Depends(principal), trainings: TrainingManager = Depends(manager),
) -> dict[str, Any]:
    """List your training jobs, oldest first; cursor pagination with `after` and `limit`, as the other lists."""
    jobs = await run_in_threadpool(trainings.list, who.tenant)
    page, has_more = cursor_page(jobs, lambda job: job.id, after, page_size(limit))
    return list_body([_job(j) for j in page], has_more)


@router.get("/{job_id}")
async def get_training(
    job_id: str, who: Principal = Depends(principal), trainings: TrainingManager = Depends(manager)
) -> dict[str, Any]:
    """One job: status, progress, loss history, timing, resulting intervention."""
    return _job(await run_in_threadpool(trainings.get, job_id, who.tenant))


@router.delete("/{job_id}")
async def cancel_training(
    job_id: str, who: Principal = Depends(principal), trainings: TrainingManager = Depends(manager)
) -> dict[str, Any]:
    """Cancel a queued or running job (a finished job is returned unchanged)."""
    return _job(await run_in_threadpool(trainings.cancel, job_id, who.tenant))


async def _events_after(
    job_id: str, last_event_id: str | None = Header(None, description="resume after this event id (SSE reconnect)"),
    who: Principal = Depends(principal), trainings: TrainingManager = Depends(manager),
) -> int | None:
    """The id to resume after (None: a new watcher; 0: replay the whole log); checked before the stream starts, so
    errors are JSON bodies."""
    await run_in_threadpool(trainings.get, job_id, who.tenant)  # 404 for an unknown (or another tenant's) job
    if last_event_id is None or not last_event_id.strip():
        return None
    if not last_event_id.strip().isdigit() or len(last_event_id.strip()) > 12:
        raise APIError(400, f"Last-Event-ID must be an event id from this stream, got {last_event_id[:40]!r}",
                       param="Last-Event-ID", code="invalid_value")
    return int(last_event_id)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
async def training_events(
    job_id: str, after: int | None = Depends(_events_after), who: Principal = Depends(principal),
    trainings: TrainingManager = Depends(manager),
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: a snapshot of the job, then its deltas (status, step, epoch, evaluation) until it ends."""
    if after is None:  # a new watcher starts from the record as it is now, not from a replay of every step
        job, after = await run_in_threadpool(trainings.snapshot, job_id, who.tenant)
        yield ServerSentEvent(id=str(after), data={"type": "snapshot", "job": _job(job)})
    keepalive = trainings.settings.training_events_keepalive_s
    async for item in trainings.events(job_id, who.tenant, after, keepalive):
        if item is None:
            yield ServerSentEvent(comment="keep-alive")
        else:
            yield ServerSentEvent(id=str(item[0]), data=item[1])

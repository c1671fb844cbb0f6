"""`/v1/trainings`: create a persona from examples while the server keeps serving; watch, list, cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.dependencies import services
from server.training import TrainingManager, TrainingRequest

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])


def manager(request: Request) -> TrainingManager:
    return services(request).training


def _job(job: Any) -> dict[str, Any]:
    body = job.to_dict()
    return {"object": "training.job", **body, "intervention": body["name"]}


@router.post("", status_code=202)
async def create_training(body: TrainingRequest, trainings: TrainingManager = Depends(manager)) -> JSONResponse:
    """Queue a training job; the intervention is stored and servable when it succeeds."""
    return JSONResponse(_job(await trainings.submit(body)), status_code=202)


@router.get("")
async def list_trainings(trainings: TrainingManager = Depends(manager)) -> dict[str, Any]:
    """List training jobs, oldest first."""
    return {"object": "list", "data": [_job(j) for j in await run_in_threadpool(trainings.list)]}


@router.get("/{job_id}")
async def get_training(job_id: str, trainings: TrainingManager = Depends(manager)) -> dict[str, Any]:
    """One job: status, progress, loss history, timing, resulting intervention."""
    return _job(await run_in_threadpool(trainings.get, job_id))


@router.delete("/{job_id}")
async def cancel_training(job_id: str, trainings: TrainingManager = Depends(manager)) -> dict[str, Any]:
    """Cancel a queued or running job (a finished job is returned unchanged)."""
    return _job(await run_in_threadpool(trainings.cancel, job_id))


@router.get("/{job_id}/events")
async def training_events(job_id: str, trainings: TrainingManager = Depends(manager)) -> StreamingResponse:
    """Server-sent events: the job record on every update until it ends."""
    await run_in_threadpool(trainings.get, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        async for job in trainings.events(job_id):
            yield f"data: {json.dumps(_job(job))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")

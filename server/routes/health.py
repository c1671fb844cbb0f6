"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from adapters_store.errors import StoreUnavailableError

router = APIRouter(tags=["health"])
STORE_GAUGES_MAX_AGE_S = 5.0  # the store's gauges are recounted at most this often (Prometheus scrapes every 15 s)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """The process is alive and its engine is running (503 once the engine has died: restart the process)."""
    svc = getattr(request.app.state, "services", None)
    failure = svc.engine.failure if svc is not None else None
    if failure is not None:
        return JSONResponse({"status": "unhealthy", "reason": f"the generation engine stopped: {failure}"},
                            status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """The model is loaded, the engine is running and the server is not draining (503 otherwise)."""
    svc = getattr(request.app.state, "services", None)
    if request.app.state.draining:
        return JSONResponse({"status": "not_ready", "reason": "draining"}, status_code=503)
    if svc is None or not svc.engine.running:
        failure = svc.engine.failure if svc is not None else None
        load_error = getattr(request.app.state, "load_error", None)
        reason = failure or load_error or ("loading" if svc is None else "no generation engine is running")
        return JSONResponse({"status": "not_ready", "reason": str(reason)}, status_code=503)
    return JSONResponse({"status": "ready", "model": svc.model_id})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    registry_metrics = request.app.state.metrics
    svc = getattr(request.app.state, "services", None)
    if svc is not None and time.monotonic() - request.app.state.store_gauges_at >= STORE_GAUGES_MAX_AGE_S:
        try:  # counting scans every version (100s of ms at 100k personas): off the event loop, and not per scrape
            stats = await run_in_threadpool(svc.store.stats)
        except StoreUnavailableError:  # the database is away: the other metrics still answer (the gauges keep their last values)
            pass
        else:
            request.app.state.store_gauges_at = time.monotonic()
            registry_metrics.store_interventions.set(stats.interventions)
            registry_metrics.store_bytes.set(stats.bytes)
    return Response(generate_latest(registry_metrics.registry), media_type=CONTENT_TYPE_LATEST)

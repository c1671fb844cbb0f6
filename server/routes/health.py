"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters_store.errors import StoreUnavailableError

router = APIRouter(tags=["health"])


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
    if svc is not None:
        try:
            stats = svc.store.stats()
        except StoreUnavailableError:  # the database is away: the other metrics still answer (the gauges keep their last values)
            pass
        else:
            registry_metrics.store_interventions.set(stats.interventions)
            registry_metrics.store_bytes.set(stats.bytes)
    return Response(generate_latest(registry_metrics.registry), media_type=CONTENT_TYPE_LATEST)

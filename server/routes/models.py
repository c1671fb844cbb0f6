"""`GET /v1/models`: the base model and every intervention (each with `parent` = the base model id)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server.dependencies import Services, services
from server.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _created(iso: str, fallback: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return fallback


@router.get("/models", response_model=ModelList)
async def list_models(svc: Services = Depends(services)) -> ModelList:
    """List the base model and all servable interventions."""
    records = await run_in_threadpool(svc.store.list)
    cards = [ModelCard(id=svc.model_id, created=svc.created, root=svc.model_id)]
    cards += [
        ModelCard(id=r.name, created=_created(r.created_at, svc.created), parent=svc.model_id, root=svc.model_id)
        for r in records
    ]
    return ModelList(data=cards)

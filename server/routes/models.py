"""`GET /v1/models`: the base model, the caller's interventions, and public ones as `tenant/name`."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from adapters_store import InterventionRecord

from server.auth import Principal, principal
from server.dependencies import Services, services
from server.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _created(iso: str, fallback: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return fallback


@router.get("/models", response_model=ModelList)
async def list_models(who: Principal = Depends(principal), svc: Services = Depends(services)) -> ModelList:
    """List the base model and every intervention the caller may use."""
    own = await run_in_threadpool(svc.store.list, who.tenant)
    shared = [r for r in await run_in_threadpool(svc.store.list_public) if r.tenant != who.tenant]
    cards = [ModelCard(id=svc.model_id, created=svc.created, root=svc.model_id)]
    cards += [
        ModelCard(id=model_name(r, who.tenant), created=_created(r.created_at, svc.created), parent=svc.model_id,
                  root=svc.model_id)
        for r in own + shared
    ]
    return ModelList(data=cards)


def model_name(record: InterventionRecord, tenant: str) -> str:
    """What the caller puts in `model`: the bare name for its own, `owner/name` for another tenant's public one."""
    return record.name if record.tenant == tenant else f"{record.tenant}/{record.name}"

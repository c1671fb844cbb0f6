"""`/v1/models`: the base model, the caller's interventions and public ones as `tenant/name`; one model by its
`model` string (`GET`), and deleting one of the caller's own (`DELETE`, OpenAI's way to delete a fine-tuned model).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from adapters_store import InterventionNotFoundError, InterventionRecord, InvalidNameError
from server.auth import Principal, principal
from server.dependencies import Services, services
from server.errors import APIError
from server.pagination import MAX_PAGE, page_size
from server.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _created(iso: str, fallback: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return fallback


def _card(svc: Services, record: InterventionRecord, model_id: str) -> ModelCard:
    return ModelCard(id=model_id, created=_created(record.created_at, svc.created), owned_by=record.tenant,
                     parent=svc.model_id, root=svc.model_id)


def _base_card(svc: Services) -> ModelCard:
    return ModelCard(id=svc.model_id, created=svc.created, root=svc.model_id)


def _not_found(model: str) -> APIError:
    # the same 404 as a generation request naming an unknown model: never says whether another tenant has it
    return APIError(404, f"The model '{model:.200}' does not exist", type="not_found_error", param="model",
                    code="model_not_found")


@router.get("/models", response_model=ModelList)
async def list_models(
    limit: int | None = Query(None, ge=1, le=MAX_PAGE, description=f"at most this many interventions (default and "
                                                                    f"maximum {MAX_PAGE}; page on with `after`)"),
    after: str | None = Query(None, max_length=200, description="the `id` of the previous page's last model"),
    who: Principal = Depends(principal), svc: Services = Depends(services),
) -> ModelList:
    """List the base model and every intervention the caller may use (cursor pagination with `after` and
    `limit`: the base model comes first, on the first page, beside `limit` interventions)."""
    base = [_base_card(svc)] if after is None else []
    after = None if after == svc.model_id else after  # the base model's id: the interventions from the first
    records, has_more = await run_in_threadpool(svc.registry.visible, who.tenant, after, page_size(limit))
    return ModelList(data=base + [_card(svc, r, model_name(r, who.tenant)) for r in records], has_more=has_more)


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, who: Principal = Depends(principal), svc: Services = Depends(services)) -> ModelCard:
    """One model the caller may use, by its `model` string (base id, `name`, `owner/name`, with `@N` a version)."""
    try:
        record = await run_in_threadpool(svc.registry.record, model, who.tenant)
    except (InterventionNotFoundError, InvalidNameError):
        raise _not_found(model) from None
    return _base_card(svc) if record is None else _card(svc, record, model)


@router.delete("/models/{model:path}")
async def delete_model(model: str, who: Principal = Depends(principal), svc: Services = Depends(services)) -> dict[str, Any]:
    """Delete one of your interventions (`name`: every version; `name@N`: that non-current version)."""
    if model == svc.model_id:
        raise APIError(403, "the base model cannot be deleted", type="permission_error", param="model",
                       code="model_not_deletable")
    try:
        await run_in_threadpool(svc.registry.delete_model, model, who.tenant)
    except (InterventionNotFoundError, InvalidNameError):
        raise _not_found(model) from None
    return {"id": model, "object": "model", "deleted": True}


def model_name(record: InterventionRecord, tenant: str) -> str:
    """What the caller puts in `model`: the bare name for its own, `owner/name` for another tenant's public one."""
    return record.name if record.tenant == tenant else f"{record.tenant}/{record.name}"

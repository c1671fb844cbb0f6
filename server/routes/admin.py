"""`/v1/admin`: tenants, their API keys and quota overrides, and public interventions (admin key only).

A key is returned once, by the call that creates it; afterwards only its id is known. The same operations are
available offline as `reft-serve admin ...` on the data directory.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from adapters_store.tenants import TenantStore
from server.auth import Principal, admin
from server.dependencies import Services, services

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class Limits(BaseModel):
    """Per-tenant overrides of the server's quota settings (omitted: the server default)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_interventions_per_tenant: int | None = Field(None, ge=0)
    max_bytes_per_tenant: int | None = Field(None, ge=0)
    max_trainings_per_tenant: int | None = Field(None, ge=0)

    def overrides(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    limits: Limits = Limits()


class PublicIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public: bool


def tenants(request: Request) -> TenantStore:
    return request.app.state.tenants


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantIn, _: Principal = Depends(admin), store: TenantStore = Depends(tenants)) -> JSONResponse:
    """Create a tenant (names follow the intervention-name rules)."""
    tenant = await run_in_threadpool(store.create_tenant, body.name, body.limits.overrides())
    return JSONResponse({"object": "tenant", **tenant.to_dict()}, status_code=201)


@router.get("/tenants")
async def list_tenants(_: Principal = Depends(admin), store: TenantStore = Depends(tenants)) -> dict[str, Any]:
    return {"object": "list", "data": [{"object": "tenant", **t.to_dict()} for t in await run_in_threadpool(store.list_tenants)]}


@router.put("/tenants/{tenant}/limits")
async def set_limits(
    tenant: str, body: Limits, _: Principal = Depends(admin), store: TenantStore = Depends(tenants)
) -> dict[str, Any]:
    """Replace the tenant's quota overrides."""
    return {"object": "tenant", **(await run_in_threadpool(store.set_limits, tenant, body.overrides())).to_dict()}


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(tenant: str, _: Principal = Depends(admin), store: TenantStore = Depends(tenants)) -> JSONResponse:
    """A new API key for the tenant; `key` is in this response only."""
    record, key = await run_in_threadpool(store.create_key, tenant)
    return JSONResponse({"object": "api_key", **record.to_dict(), "key": key}, status_code=201)


@router.get("/tenants/{tenant}/keys")
async def list_keys(tenant: str, _: Principal = Depends(admin), store: TenantStore = Depends(tenants)) -> dict[str, Any]:
    await run_in_threadpool(store.get_tenant, tenant)
    keys = await run_in_threadpool(store.list_keys, tenant)
    return {"object": "list", "data": [{"object": "api_key", **k.to_dict()} for k in keys]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, _: Principal = Depends(admin), store: TenantStore = Depends(tenants)) -> dict[str, Any]:
    """Revoke a key at once (requests already admitted finish)."""
    return {"object": "api_key", **(await run_in_threadpool(store.revoke_key, key_id)).to_dict()}


@router.put("/tenants/{tenant}/interventions/{name}/public")
async def set_public(
    tenant: str, name: str, body: PublicIn, _: Principal = Depends(admin), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Share a tenant's intervention with every tenant (as `tenant/name`), or stop sharing it."""
    record = await run_in_threadpool(svc.registry.set_public, tenant, name, body.public)
    return {"object": "intervention", **record.to_dict(), "id": f"{record.tenant}/{record.name}", "owner": record.tenant}

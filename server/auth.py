"""Who is calling: `Authorization: Bearer <key>` -> a `Principal` (tenant, admin or not), plus the request quota.

With auth off (the default on loopback) every caller is the admin of the `default` tenant, which is what a
single-user local server means. With auth on, a tenant key acts as its tenant; the admin key (from settings) acts
as the `default` tenant, or as any tenant named in `X-Reft-Tenant`, and may call the admin endpoints. Keys are
checked in constant time (`hmac.compare_digest`); see `adapters_store.tenants` for how they are stored.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from adapters_store import InvalidNameError, validate_tenant
from adapters_store.tenants import TenantNotFoundError, TenantStore
from server.errors import APIError, rate_limited
from server.generation import Caller
from server.settings import Settings

DEFAULT_TENANT = "default"
ACT_AS_HEADER = "x-reft-tenant"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False
    limits: dict[str, object] = field(default_factory=dict, compare=False)  # the tenant's quota overrides


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, type="authentication_error", code=code, headers={"WWW-Authenticate": "Bearer"})


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("no API key: send `Authorization: Bearer <key>`", "missing_api_key")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("the Authorization header must be `Bearer <key>`", "invalid_authorization_header")
    return key.strip()


async def principal(request: Request) -> Principal:
    """FastAPI dependency for every /v1 route: authenticate, then charge one request to the tenant's quota."""
    settings: Settings = request.app.state.settings
    tenants: TenantStore = request.app.state.tenants
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if not settings.auth_enabled:
        who = Principal(DEFAULT_TENANT, admin=True)
    else:
        key = _bearer(request)
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
        if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
            who = Principal(_acting_tenant(request), admin=True)
        else:
            found = await run_in_threadpool(_tenant_and_limits, tenants, key)  # one hop for both reads
            if found is None:
                raise _unauthorized("invalid API key", "invalid_api_key")
            who = Principal(found[0], limits=found[1])
    if not who.admin:
        limit = settings.limit("requests_per_minute", who.limits)
        wait = request.app.state.rate_limiter.take(who.tenant, "requests", 1, limit)
        if wait:
            raise rate_limited(f"rate limit of {limit} requests per minute reached", wait, "requests_per_minute")
    return who


def _acting_tenant(request: Request) -> str:
    name = request.headers.get(ACT_AS_HEADER, DEFAULT_TENANT)
    try:
        return validate_tenant(name)
    except InvalidNameError as exc:
        raise APIError(400, str(exc), param=ACT_AS_HEADER, code="invalid_tenant") from None


def _tenant_and_limits(tenants: TenantStore, key: str) -> tuple[str, dict[str, object]] | None:
    tenant = tenants.authenticate(key)
    return None if tenant is None else (tenant, tenant_limits(tenants, tenant))


def tenant_limits(tenants: TenantStore, tenant: str) -> dict[str, object]:
    try:
        return tenants.get_tenant(tenant).limits
    except TenantNotFoundError:  # the default tenant, or keys outliving a tenant row: server defaults
        return {}


async def admin(request: Request) -> Principal:
    """Dependency for admin-only routes (403 for tenant keys)."""
    who = await principal(request)
    if not who.admin:
        raise APIError(403, "this endpoint needs the admin key", type="permission_error", code="admin_only")
    return who


async def caller(request: Request, who: Principal = Depends(principal)) -> Caller:
    """The generation-side view of the principal: its tenant and tokens-per-minute quota (none for the admin)."""
    if who.admin:
        return Caller(who.tenant, None)
    settings: Settings = request.app.state.settings
    return Caller(who.tenant, settings.limit("tokens_per_minute", who.limits))

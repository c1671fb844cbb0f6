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
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters_store import InvalidNameError, validate_tenant
from adapters_store.tenants import TenantNotFoundError, TenantStore
from server.errors import APIError, classify, rate_limited, send_error
from server.generation import Caller
from server.metrics import Metrics
from server.settings import Settings

DEFAULT_TENANT = "default"
ACT_AS_HEADER = "x-reft-tenant"
PRINCIPAL_STATE = "principal"  # where AuthenticateFirst leaves the caller in the ASGI scope's state


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False
    limits: dict[str, object] = field(default_factory=dict, compare=False)  # the tenant's quota overrides


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, type="authentication_error", code=code, headers={"WWW-Authenticate": "Bearer"})


def _bearer(headers: Headers) -> str:
    header = headers.get("authorization")
    if not header:
        raise _unauthorized("no API key: send `Authorization: Bearer <key>`", "missing_api_key")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("the Authorization header must be `Bearer <key>`", "invalid_authorization_header")
    return key.strip()


async def authenticate(headers: Headers, settings: Settings, tenants: TenantStore) -> Principal:
    """Who the headers say is calling (401 without a valid key); reads nothing but the headers."""
    if not settings.auth_enabled:
        return Principal(DEFAULT_TENANT, admin=True)
    key = _bearer(headers)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        return Principal(_acting_tenant(headers), admin=True)
    found = await run_in_threadpool(_tenant_and_limits, tenants, key)  # one hop for both reads
    if found is None:
        raise _unauthorized("invalid API key", "invalid_api_key")
    return Principal(found[0], limits=found[1])


class AuthenticateFirst:
    """Pure ASGI middleware: authenticates every /v1 request from its headers before anything reads the body, so
    a caller without a key cannot make the server buffer, spool or decode an upload or a JSON body just to be
    told 401. The Principal goes into the scope's state, where `principal` picks it up without a second lookup.
    (Not BaseHTTPMiddleware: that wraps `receive` and the response in extra tasks and streams.)"""

    def __init__(self, app: ASGIApp, settings: Settings, tenants: TenantStore, metrics: Metrics) -> None:
        self.app, self.settings, self.tenants, self.metrics = app, settings, tenants, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        try:
            who = await authenticate(Headers(scope=scope), self.settings, self.tenants)
        except Exception as exc:  # noqa: BLE001 - domain errors (401, 400, a store error) answered here
            error = classify(exc)
            if error is None:
                raise
            self.metrics.errors.labels(type=error.type).inc()
            await send_error(send, error)  # closes the connection: the unread body is never read
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE] = who
        await self.app(scope, receive, send)


async def principal(request: Request) -> Principal:
    """FastAPI dependency for every /v1 route: the caller `AuthenticateFirst` found, charged one request from
    its tenant's quota."""
    settings: Settings = request.app.state.settings
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    who: Principal | None = getattr(request.state, PRINCIPAL_STATE, None)
    if who is None:  # an app without the middleware (it is always added by create_app)
        who = await authenticate(request.headers, settings, request.app.state.tenants)
    if not who.admin:
        limit = settings.limit("requests_per_minute", who.limits)
        wait = request.app.state.rate_limiter.take(who.tenant, "requests", 1, limit)
        if wait:
            raise rate_limited(f"rate limit of {limit} requests per minute reached", wait, "requests_per_minute")
    return who


def _acting_tenant(headers: Headers) -> str:
    name = headers.get(ACT_AS_HEADER, DEFAULT_TENANT)
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

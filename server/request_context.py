"""The request context: each HTTP request's id (`X-Request-Id`), its log lines, its HTTP metrics and its trace span.

`RequestContext` is the outermost middleware, so every response, errors and SSE streams included, carries the id,
and every log line written while the request is handled names it (a contextvar read by `RequestIdFilter`; the
threadpool copies contextvars, the engine gets the id in the request it is sent). A client's own id is kept if it
is short and plain (it ends up in logs: no control characters), else a new one is generated.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics
from server.tracing import Tracing

REQUEST_ID: ContextVar[str | None] = ContextVar("reft_request_id", default=None)
HEADER = "x-request-id"
SCOPE_KEY = "reft.request_id"  # the id in the ASGI scope, for handlers that run after the contextvar is reset
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def request_id_of(scope: Scope) -> str | None:
    return scope.get(SCOPE_KEY)


def _request_id(headers: Headers) -> str:
    given = headers.get(HEADER)
    return given if given is not None and _ACCEPTED_ID.fullmatch(given) else uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label values), or "unmatched" for 404s and middleware answers."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestContext:
    """Pure ASGI middleware (no extra tasks around streams): id in, id out, metrics and span around the call."""

    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing) -> None:
        self.app, self.metrics, self.tracing = app, metrics, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        scope[SCOPE_KEY] = request_id
        token = REQUEST_ID.set(request_id)
        status = 500  # if the app raises before answering, Starlette's outermost handler answers 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in sent):  # the 500 handler sets its own
                    message = {**message, "headers": [*sent, (b"x-request-id", request_id.encode())]}
            await send(message)

        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        try:
            with self.tracing.request_span(method, headers) as span:
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    _annotate(span, method, route_template(scope), status, request_id)
        finally:
            REQUEST_ID.reset(token)
            route = route_template(scope)
            self.metrics.http_requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.http_latency.labels(route=route).observe(time.perf_counter() - started)


def _annotate(span: Any | None, method: str, route: str, status: int, request_id: str) -> None:
    if span is None:
        return
    span.update_name(f"{method} {route}")
    span.set_attributes({"http.request.method": method, "http.route": route, "http.response.status_code": status,
                         "reft.request_id": request_id})


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record written inside a request (unless the caller set one explicitly)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = REQUEST_ID.get()
            if request_id is not None:
                record.request_id = request_id
        return True

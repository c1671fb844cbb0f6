"""One table from errors to HTTP: status, OpenAI error `type` and `code`, and the JSON body clients see.

Domain code raises typed exceptions (reft_core, adapters_store) or `APIError`; nothing else in the server picks a
status code. Every error body has the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import errors as store_errors
from adapters_store import tenants as tenant_errors
from adapters_store.jobs import JobNotFoundError
from reft_core import errors as core_errors
from server.request_context import request_id_of

log = logging.getLogger("reft_serve.errors")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
        param: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers


def rate_limited(message: str, retry_after_s: float, code: str) -> APIError:
    """429 with `Retry-After` (whole seconds, rounded up, at least 1)."""
    seconds = max(1, int(-(-retry_after_s // 1)))
    return APIError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": str(seconds)})


# (exception class, status, type, code). First match wins: list subclasses before their bases.
ERROR_TABLE: list[tuple[type[Exception], int, str, str]] = [
    (store_errors.InterventionNotFoundError, 404, "not_found_error", "intervention_not_found"),
    (JobNotFoundError, 404, "not_found_error", "training_job_not_found"),
    (store_errors.TrainingFileNotFoundError, 404, "not_found_error", "file_not_found"),
    (tenant_errors.TenantNotFoundError, 404, "not_found_error", "tenant_not_found"),
    (tenant_errors.KeyNotFoundError, 404, "not_found_error", "api_key_not_found"),
    (tenant_errors.TenantExistsError, 409, "conflict_error", "tenant_exists"),
    (store_errors.InterventionExistsError, 409, "conflict_error", "intervention_exists"),
    (store_errors.VersionIsCurrentError, 409, "conflict_error", "version_is_current"),
    (store_errors.InvalidNameError, 400, "invalid_request_error", "invalid_name"),
    (store_errors.InvalidMetadataError, 400, "invalid_request_error", "invalid_metadata"),
    (store_errors.QuotaExceededError, 403, "permission_error", "storage_quota_exceeded"),
    (store_errors.ArtifactUnavailableError, 503, "server_error", "artifact_unavailable"),
    (store_errors.StoreUnavailableError, 503, "server_error", "store_unavailable"),  # retry: the database is back soon
    (store_errors.StoreWriteError, 507, "server_error", "storage_unavailable"),
    (core_errors.IncompatibleBaseModelError, 409, "invalid_request_error", "incompatible_base_model"),
    (core_errors.UnsupportedFormatVersionError, 422, "invalid_request_error", "unsupported_format_version"),
    (core_errors.ArtifactIntegrityError, 422, "invalid_request_error", "invalid_artifact"),
    (core_errors.PyreftImportError, 422, "invalid_request_error", "invalid_pyreft_archive"),
    (core_errors.ArtifactFormatError, 422, "invalid_request_error", "invalid_artifact"),
    (core_errors.RankLimitError, 400, "invalid_request_error", "rank_limit_exceeded"),
    (core_errors.InvalidConfigError, 400, "invalid_request_error", "invalid_config"),
    (core_errors.ReftError, 400, "invalid_request_error", "invalid_request"),
    (store_errors.StoreError, 500, "server_error", "store_error"),
]


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_error(send: Any, error: APIError) -> None:
    """Answer `error` from ASGI middleware, below the exception handlers, and close the connection: the request's
    body may be unread, and keeping the connection would make the server read (and discard) all of it."""
    body = json.dumps(error_body(error.message, error.type, error.code, error.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def classify(exc: Exception) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    for cls, status, type_, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return APIError(status, str(exc), type=type_, code=code)
    return None


def _respond(request: Request, error: APIError) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(type=error.type).inc()
    headers = dict(error.headers or {})
    request_id = request_id_of(request.scope)
    if request_id is not None:  # the 500 handler answers outside RequestContext, which would otherwise add it
        headers["X-Request-Id"] = request_id
    return JSONResponse(error_body(error.message, error.type, error.code, error.param), status_code=error.status,
                        headers=headers or None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(location) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


async def _body_error(request: Request, exc: RequestValidationError) -> APIError | None:
    """The two body mistakes a person makes with curl, said so they can fix them: malformed JSON (with its line and
    column, not a byte offset) and a JSON body sent without `Content-Type: application/json` (curl -d sends
    `application/x-www-form-urlencoded`, and the body then arrives as a string, not an object)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        try:
            json.loads(await request.body())
        except json.JSONDecodeError as bad:
            return APIError(400, f"the request body is not valid JSON: {bad.msg} at line {bad.lineno}, column "
                            f"{bad.colno}", code="invalid_json")
        except UnicodeDecodeError:
            return APIError(400, "the request body is not UTF-8 JSON", code="invalid_json")
    content_type = request.headers.get("content-type", "")
    body_not_object = tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type",
                                                                                         "dict_type")
    if body_not_object and "json" not in content_type.lower():
        return APIError(400, f"the request body must be a JSON object sent with `Content-Type: application/json` "
                        f"(got {content_type or 'no Content-Type'}; with curl add -H 'Content-Type: application/json')",
                        code="invalid_content_type")
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = await _body_error(request, exc)
        if error is None:
            message, param = _validation_message(exc)
            error = APIError(400, message, param=param, code="invalid_value")
        return _respond(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _respond(request, APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers))

    async def _on_domain(request: Request, exc: Exception) -> JSONResponse:
        error = classify(exc)
        assert error is not None, f"{type(exc).__name__} is missing from ERROR_TABLE"
        return _respond(request, error)

    for domain_error in (APIError, core_errors.ReftError, store_errors.StoreError):
        app.add_exception_handler(domain_error, _on_domain)

    @app.exception_handler(Exception)
    async def _on_any(request: Request, exc: Exception) -> JSONResponse:
        error = classify(exc)
        if error is None:
            log.exception("unhandled error", extra={"path": request.url.path})
            error = APIError(500, "internal server error", type="server_error")
        return _respond(request, error)

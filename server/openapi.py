"""The error statuses each route can send, written into the OpenAPI schema (FastAPI lists only 200 and 422, and
this server answers validation errors with 400, never 422 for them).

Statuses come from where they are decided: every /v1 route authenticates (401), charges the tenant's request quota
(429), refuses while draining or loading (503) and validates its input (400); a body can be too large (413); a
path that names something can name nothing (404); the rest depends on the resource (the `tags` of its router).
Answers given before routing (408, 431, 503 from server/connections.py) are not per route and are documented in
the README instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.errors import error_body

_MEANING = {
    400: "Invalid request (OpenAI-style error body; `param` names the field)",
    401: "Missing or invalid API key",
    403: "Not allowed (admin only, or a storage quota)",
    404: "Not found (or not visible to this tenant)",
    409: "Conflict (the name or version exists, is current, or the artifact is for another base model)",
    413: "Request body or upload too large",
    422: "Artifact or archive is malformed or of an unsupported format",
    429: "Rate limit or capacity reached (see `Retry-After`)",
    500: "Internal error",
    503: "Loading, shutting down, or the engine stopped",
    504: "The generation timed out",
    507: "The store cannot be written",
}
# by router tag: what that resource's handlers can answer besides the common statuses
_BY_TAG: dict[str, set[int]] = {
    "generation": {404, 504},
    "interventions": {403, 404, 409, 422, 507},
    "trainings": {404, 409, 507},
    "files": {403, 404, 507},  # 403: the tenant's storage quota (files count in its bytes)
    "fine-tuning": {404, 409, 507},  # 409: the persona's name (the suffix) exists
    "models": {403, 404, 409, 507},  # DELETE: 403 the base model, 409 the current version
    "admin": {403, 404, 409},
}


def statuses_for(path: str, method: str, tags: list[str]) -> set[int]:
    codes = {500}
    if path.startswith("/v1"):
        codes |= {400, 401, 429, 503}
    if method.upper() in ("POST", "PUT", "PATCH"):
        codes |= {400, 413}
    if "{" in path:
        codes.add(404)
    for tag in tags:
        codes |= _BY_TAG.get(tag, set())
    if path in ("/health", "/ready"):
        codes.add(503)
    return codes


def document_errors(app: FastAPI) -> None:
    """Each operation in the schema lists its error statuses (with the error body's shape); FastAPI's 422 goes."""
    example = error_body("what went wrong and how to fix it", "invalid_request_error", "invalid_value", "field")
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)  # never sent: invalid requests get 400
                    for status in sorted(statuses_for(path, method, operation.get("tags", []))):
                        responses.setdefault(str(status), {
                            "description": _MEANING[status], "content": {"application/json": {"example": example}},
                        })
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""Request body size caps, enforced while the body streams in (before any parsing or buffering of the excess).

Uploads (artifacts, pyreft archives, JSONL examples) may be up to `max_upload_bytes` plus room for the multipart
framing and form fields, training files (`POST /v1/files`) up to `max_file_bytes` plus that room; every other body
is capped at `max_request_bytes`. A declared Content-Length over the cap is refused before reading anything; a body
that streams past it (chunked, or a lying header) is cut off there.
"""

from __future__ import annotations

import re
from typing import Any

from server.errors import APIError, send_error
from server.settings import Settings

UPLOAD_ROUTES = re.compile(r"^/v1/(interventions(/[^/]+)?|trainings/upload)/?$")
FILE_ROUTE = "/v1/files"
MULTIPART_ROOM = 1 << 20  # form fields and multipart boundaries around the file


class BodyTooLargeError(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the {limit} byte limit", code="payload_too_large")


class BodySizeLimit:
    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, scope: dict[str, Any]) -> int:
        path = scope.get("path", "")
        if scope.get("method") == "POST" and path.rstrip("/") == FILE_ROUTE:
            return self.settings.max_file_bytes + MULTIPART_ROOM
        if scope.get("method") in ("POST", "PUT") and UPLOAD_ROUTES.match(path):
            return self.settings.max_upload_bytes + MULTIPART_ROOM
        return self.settings.max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, APIError(400, "invalid Content-Length header", code="invalid_header"))
                return
            if int(declared) > limit:
                await send_error(send, BodyTooLargeError(limit))
                return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError as exc:  # raised where no exception handler could answer
            if started:
                raise
            await send_error(send, exc)

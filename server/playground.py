"""The playground page: static files shipped inside the package (`server/static/`), served at `/playground/`.

The page is plain HTML, CSS and JavaScript modules: no build step, no CDN, nothing fetched from anywhere but this
server, so it works offline. The files hold no data and no secrets, so they are served without auth (they are
outside `/v1`); everything the page shows comes from `/v1` calls the browser makes with the user's API key. The
Content-Security-Policy limits the page to this origin, so it cannot come to depend on an external URL unnoticed,
and `no-cache` makes browsers revalidate (by ETag) so a server upgrade never runs yesterday's scripts.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/playground/"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class PlaygroundFiles(StaticFiles):
    """StaticFiles with the page's security and caching headers on every response (not on errors: those are the
    API's JSON error bodies, from the app's handlers)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install_playground(app: FastAPI) -> None:
    """Serve the page at /playground/ and send / there (neither is part of the OpenAPI schema)."""
    app.mount(PAGE_PATH.rstrip("/"), PlaygroundFiles(directory=STATIC_DIR, html=True), name="playground")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(PAGE_PATH)

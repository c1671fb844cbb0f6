"""Test helpers shared across test modules (a module, not conftest.py imported as a library)."""

from __future__ import annotations

import io
import zipfile


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip archive of `members` (name -> bytes), built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def documented(schema: dict, method: str, path: str, status: int) -> bool:
    """Whether the OpenAPI `schema` lists `status` for the operation serving `method path` (True when no operation
    serves it: unknown routes and methods are not operations)."""
    import re

    bare = path.split("?")[0]
    for template, operations in schema["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), bare) and method.lower() in operations:
            return str(status) in operations[method.lower()]["responses"]
    return True

"""Test helpers shared across test modules (a module, not conftest.py imported as a library)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterable


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip archive of `members` (name -> bytes), built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def sse_events(lines: Iterable[str], *, until: Callable[[dict], bool] | None = None) -> list[dict]:
    """Server-sent events from a stream's lines: {"id", "data" (parsed JSON)} per event, {"comment"} per comment
    line. Stops after the first event for which `until` holds (a stream may stay open)."""
    events: list[dict] = []
    current: dict = {}
    for line in lines:
        if line.startswith(":"):
            events.append({"comment": line[1:].strip()})
            if until is not None and until(events[-1]):
                break
        elif line.startswith("id:"):
            current["id"] = int(line[3:].strip())
        elif line.startswith("data:"):
            current["data"] = json.loads(line[5:].strip())
        elif not line and current:
            events.append(current)
            if until is not None and until(current):
                break
            current = {}
    return events

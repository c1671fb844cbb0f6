"""OpenAI's cursor pagination over a list already in its order: `after` (an item's id), `limit`, `has_more`.

The SDK pages by passing the last id of a page as `after`, until `has_more` is false. An `after` that names no
item of the list (a typo, another tenant's id, an item deleted since) is a 400 rather than a silent first page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from server.errors import APIError

T = TypeVar("T")

# The most items one page holds, and what a list without `limit` returns: an unbounded listing cost ~14 s of CPU
# and a 54 MB answer for 100k interventions (its caller's one cheap request); past this, clients page on.
MAX_PAGE = 10_000


def page_size(limit: int | None) -> int:
    """The page a request asked for, or the largest when it did not say."""
    return MAX_PAGE if limit is None else limit


def cursor_page(items: Sequence[T], key: Callable[[T], str], after: str | None, limit: int) -> tuple[list[T], bool]:
    """The page of at most `limit` items after the one whose id is `after` (from the start when None), and
    whether more follow it."""
    assert limit >= 1
    start = 0
    if after is not None:
        ids = [key(item) for item in items]
        if after not in ids:
            raise APIError(400, f"after: '{after:.80}' is not an id in this list", param="after", code="invalid_cursor")
        start = ids.index(after) + 1
    return list(items[start:start + limit]), start + limit < len(items)


def list_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list object for one page."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}

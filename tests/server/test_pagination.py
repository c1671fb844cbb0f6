"""Cursor pagination: paging through any list with any limit, as the OpenAI SDK does, yields each item once, in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import APIError
from server.pagination import cursor_page, list_body


@given(count=st.integers(0, 40), limit=st.integers(1, 50))
def test_following_the_cursor_yields_every_item_once_in_order(count: int, limit: int) -> None:
    items = [f"id-{n}" for n in range(count)]
    seen: list[str] = []
    after = None
    while True:
        page, has_more = cursor_page(items, str, after, limit)
        assert len(page) <= limit and (has_more or len(seen) + len(page) == count)
        body = list_body([{"id": item} for item in page], has_more)
        seen += [row["id"] for row in body["data"]]
        if not body["has_more"]:
            break
        assert page, "a page that promises more is never empty"
        after = body["last_id"]
    assert seen == items


def test_an_unknown_cursor_is_a_400_naming_it() -> None:
    with pytest.raises(APIError) as refused:
        cursor_page(["a", "b"], str, "zzz", 5)
    assert refused.value.status == 400 and refused.value.param == "after" and "zzz" in refused.value.message


def test_list_body_names_the_ends() -> None:
    assert list_body([], False) == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    assert list_body([{"id": "a"}, {"id": "b"}], True)["first_id"] == "a"

"""Cursor pagination: paging through any list with any limit, as the OpenAI SDK does, yields each item once, in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import APIError
from server import pagination
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


def _pages(client, path: str, headers: dict, limit: int) -> list[str]:
    """Every id of a listing, following `last_id` page by page; checks each page's size and `has_more`."""
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": limit} | ({"after": after} if after else {})
        body = client.get(path, params=params, headers=headers).json()
        ids = [item["id"] for item in body["data"]]
        assert len(ids) <= limit + (path == "/v1/models" and after is None)  # the base model rides on page one
        seen += ids
        if not body["has_more"]:
            return seen
        assert ids, "a page that promises more is never empty"
        after = ids[-1]


def test_listings_page_through_own_then_public_interventions(tmp_path, tiny_base, monkeypatch) -> None:
    """/v1/interventions and /v1/models with any `limit`: following the cursor yields exactly the unpaged listing
    (own names, then other tenants' public ones as owner/name), each once, in order."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import MODEL_ID, artifact_bytes, make_settings, persona

    admin = {"Authorization": "Bearer admin-pages"}
    settings = make_settings(tmp_path, auth="on", admin_key="admin-pages")
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        keys = {}
        for tenant in ("acme", "beta", "zeta"):
            assert client.post("/v1/admin/tenants", json={"name": tenant}, headers=admin).status_code == 201
            keys[tenant] = {"Authorization": "Bearer " + client.post(f"/v1/admin/tenants/{tenant}/keys",
                                                                     headers=admin).json()["key"]}
        payload = artifact_bytes(tiny_base, persona(1))
        layout = {"acme": ["a1", "a2", "a3"], "beta": ["b1", "b2", "private"], "zeta": ["z1", "z2", "z3", "z4"]}
        for tenant, names in layout.items():
            for name in names:
                assert client.post("/v1/interventions", data={"name": name}, files={"file": ("a", payload)},
                                   headers=keys[tenant]).status_code == 201
                if name != "private":
                    client.put(f"/v1/admin/tenants/{tenant}/interventions/{name}/public", json={"public": True},
                               headers=admin)
        everything = [item["id"] for item in client.get("/v1/interventions", headers=keys["beta"]).json()["data"]]
        assert everything == ["b1", "b2", "private", "acme/a1", "acme/a2", "acme/a3", "zeta/z1", "zeta/z2",
                              "zeta/z3", "zeta/z4"]
        models = [m["id"] for m in client.get("/v1/models", headers=keys["beta"]).json()["data"]]
        assert models == [MODEL_ID, *everything]
        for limit in (1, 2, 3, 4, 9, 10, 11, 50):
            assert _pages(client, "/v1/interventions", keys["beta"], limit) == everything
            assert _pages(client, "/v1/models", keys["beta"], limit) == models
        # without `limit` a page is at most MAX_PAGE long (10,000; 4 here), and says there is more
        monkeypatch.setattr(pagination, "MAX_PAGE", 4)
        for path, listing in (("/v1/interventions", everything), ("/v1/models", models)):
            body = client.get(path, headers=keys["beta"]).json()
            assert [item["id"] for item in body["data"]] == listing[: 4 + (path == "/v1/models")]
            assert body["has_more"]
            rest = client.get(path, params={"after": body["data"][-1]["id"]}, headers=keys["beta"]).json()
            assert [item["id"] for item in rest["data"]] == listing[5 if path == "/v1/models" else 4 :][:4]
        bad = client.get("/v1/interventions", params={"limit": 0}, headers=keys["beta"])
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"

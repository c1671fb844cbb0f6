"""Errors a person can act on: JSON sent without its content type, malformed JSON (line and column), an unknown model
(close names the caller may use, never another tenant's private ones), fields we do not implement (a 400 naming
them, never ignored), and an OpenAPI schema that lists the statuses routes send."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona, upload

CHAT = [{"role": "user", "content": "hi"}]
BODY = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2}


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("errors")), base_model=tiny_base)) as test_client:
        upload(test_client, "pirate-captain", artifact_bytes(tiny_base, persona(4)))
        yield test_client


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None], ids=["curl-d", "none"])
def test_json_without_its_content_type_says_to_set_it(client, content_type) -> None:
    """`curl -d` sends a form content type; no content type at all is not read as JSON either (FastAPI's strict
    mode: a browser can send such a body cross-site without a CORS preflight, and auth is off on loopback)."""
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/chat/completions", content=json.dumps(BODY).encode(), headers=headers)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_content_type"
    assert "Content-Type: application/json" in error["message"]
    assert client.post("/v1/chat/completions", content=json.dumps(BODY),
                       headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("text,line,column", [
    ('{"model": "m",\n "messages": [,]}', 2, 15),
    ('{"model": "m"', 1, 14),
    ('\n\n   {"model" "m"}', 3, 13),  # the second string, where the colon belongs
])
def test_malformed_json_names_line_and_column(client, text, line, column) -> None:
    response = client.post("/v1/chat/completions", content=text, headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_json" and error["param"] is None
    assert error["message"].endswith(f"at line {line}, column {column}")


def test_an_unknown_model_suggests_close_names_the_caller_may_use(client) -> None:
    for typo, suggestion in (("pirate-captian", "pirate-captain"), (MODEL_ID.replace("ll", "l"), MODEL_ID)):
        error = client.post("/v1/chat/completions", json={**BODY, "model": typo}).json()["error"]
        assert error["code"] == "model_not_found" and f"did you mean '{suggestion}'" in error["message"]
    far = client.post("/v1/chat/completions", json={**BODY, "model": "zzzzzz"}).json()["error"]
    assert "did you mean" not in far["message"]


def test_a_large_registry_still_suggests_names_that_start_alike(client, tiny_base, monkeypatch) -> None:
    """Beyond HINT_NAMES visible names the hint compares only those that share the first character (a bounded
    query, not every record); the close name is still found among many others."""
    monkeypatch.setattr("server.generation.HINT_NAMES", 2)
    for name in ("alpha", "beta", "pirate-cook"):
        upload(client, name, artifact_bytes(tiny_base, persona(5)))
    store = client.app.state.services.store
    queries: list[tuple[str, int]] = []
    names = store.visible_names
    monkeypatch.setattr(store, "visible_names", lambda tenant, prefix, limit: queries.append((prefix, limit))
                        or names(tenant, prefix, limit))
    error = client.post("/v1/chat/completions", json={**BODY, "model": "pirate-captian"}).json()["error"]
    assert "did you mean 'pirate-captain'" in error["message"] and "alpha" not in error["message"]
    assert queries == [("", 3), ("p", 2)]  # never more than HINT_NAMES + 1 names read


def test_suggestions_never_reveal_another_tenants_private_names(client) -> None:
    generation = client.app.state.services.generation
    assert "pirate-captain" in generation._close_names("pirate-captian", "default")
    assert generation._close_names("default/pirate-captian", "acme") == []  # private: as if it did not exist
    client.app.state.services.registry.set_public("default", "pirate-captain", True)
    try:
        assert generation._close_names("default/pirate-captian", "acme") == ["default/pirate-captain"]
    finally:
        client.app.state.services.registry.set_public("default", "pirate-captain", False)


@pytest.mark.parametrize("path,extra,field", [
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("/v1/completions", {"logprobs": 3}, "logprobs"),
])
def test_unimplemented_fields_are_refused_by_name(client, path, extra, field) -> None:
    body = BODY if path.endswith("chat/completions") else {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
    for stream in (False, True):
        response = client.post(path, json={**body, **extra, "stream": stream})
        error = response.json()["error"]
        assert response.status_code == 400 and (error["param"], error["code"]) == (field, "unsupported_parameter")


@pytest.mark.parametrize("extra", [{"logprobs": False}, {"response_format": {"type": "text"}}, {"logprobs": None}])
def test_the_defaults_of_those_fields_are_accepted(client, extra) -> None:
    assert client.post("/v1/chat/completions", json={**BODY, **extra}).status_code == 200


def test_openapi_lists_error_statuses_and_never_422(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(chat) and "422" not in chat
    put = paths["/v1/interventions/{name}"]["put"]["responses"]
    assert {"403", "404", "409", "413", "422", "507"} <= set(put)  # 422 here: a malformed artifact
    assert "503" in paths["/ready"]["get"]["responses"]

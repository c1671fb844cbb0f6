"""Tenants over HTTP: the isolation matrix (every endpoint x own / other tenant / public / no key / bad key), the
admin API, and per-tenant quotas (429 with Retry-After, storage and training caps)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.builders import documented

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona

ADMIN = {"Authorization": "Bearer admin-secret"}
EXAMPLES = [{"prompt": f"q{i}", "completion": "yes"} for i in range(2)]
SMALL_JOB = {"intervention": {"layers": [1], "rank": 2}, "hyperparameters": {"epochs": 1000, "batch_size": 1}}
JSONL = b'{"prompt": "q0", "completion": "yes"}\n'


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(client: TestClient, tenant: str, **limits) -> str:
    assert client.post("/v1/admin/tenants", json={"name": tenant, "limits": limits}, headers=ADMIN).status_code == 201
    created = client.post(f"/v1/admin/tenants/{tenant}/keys", headers=ADMIN)
    assert created.status_code == 201
    return created.json()["key"]


def put_file(client: TestClient, tiny_base, name: str, key: str, seed: int = 1, method: str = "POST"):
    path = "/v1/interventions" if method == "POST" else f"/v1/interventions/{name}"
    files = {"file": ("a.safetensors", artifact_bytes(tiny_base, persona(seed)))}
    return client.request(method, path, data={"name": name}, files=files, headers=auth(key))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base) -> Iterator[dict]:
    """acme owns `secret` (private) and `shared` (public), each with versions 1 and 2, and a running training job;
    globex owns nothing."""
    settings = make_settings(tmp_path_factory.mktemp("tenancy"), auth="on", admin_key="admin-secret")
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        acme, globex = new_key(client, "acme"), new_key(client, "globex")
        for name, seed in (("secret", 1), ("shared", 2)):
            assert put_file(client, tiny_base, name, acme, seed).status_code == 201
            assert put_file(client, tiny_base, name, acme, seed + 10, method="PUT").status_code == 200
        public = client.put("/v1/admin/tenants/acme/interventions/shared/public", json={"public": True}, headers=ADMIN)
        assert public.status_code == 200 and public.json()["public"]
        job = client.post("/v1/trainings", json={"name": "slow", "examples": EXAMPLES, **SMALL_JOB}, headers=auth(acme))
        assert job.status_code == 202
        uploaded = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", JSONL)},
                               headers=auth(acme))
        assert uploaded.status_code == 200
        yield {"client": client, "acme": acme, "globex": globex, "job": job.json()["id"], "base": tiny_base,
               "file": uploaded.json()["id"]}
        client.delete(f"/v1/trainings/{job.json()['id']}", headers=auth(acme))


def chat_body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def completion_body(model: str) -> dict:
    return {"model": model, "prompt": "hi", "max_tokens": 2}


# (caller, method, path, json body, expected status). {job} is acme's training job.
MATRIX = [
    # acme on its own things
    ("acme", "GET", "/v1/interventions/secret", None, 200),
    ("acme", "GET", "/v1/interventions/secret/artifact", None, 200),
    ("acme", "POST", "/v1/chat/completions", chat_body("secret"), 200),
    ("acme", "POST", "/v1/chat/completions", chat_body("acme/secret"), 200),
    ("acme", "GET", "/v1/trainings/{job}", None, 200),
    ("acme", "GET", "/v1/trainings", None, 200),
    # acme on its own versions
    ("acme", "GET", "/v1/interventions/secret/versions", None, 200),
    ("acme", "GET", "/v1/interventions/secret?version=1", None, 200),
    ("acme", "GET", "/v1/interventions/secret/artifact?version=1", None, 200),
    ("acme", "POST", "/v1/chat/completions", chat_body("secret@1"), 200),
    ("acme", "POST", "/v1/chat/completions", chat_body("acme/secret@1"), 200),
    ("acme", "POST", "/v1/completions", completion_body("secret@2"), 200),
    ("acme", "POST", "/v1/interventions/secret/versions/1/promote", None, 200),
    ("acme", "DELETE", "/v1/interventions/secret/versions/99", None, 404),
    # globex on acme's private intervention and job: exactly like names that do not exist
    ("globex", "GET", "/v1/interventions/secret?owner=acme", None, 404),
    ("globex", "GET", "/v1/interventions/secret/artifact?owner=acme", None, 404),
    ("globex", "GET", "/v1/interventions/secret", None, 404),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/secret"), 404),
    ("globex", "POST", "/v1/chat/completions", chat_body("secret"), 404),
    ("globex", "DELETE", "/v1/interventions/secret", None, 404),
    ("globex", "GET", "/v1/trainings/{job}", None, 404),
    ("globex", "DELETE", "/v1/trainings/{job}", None, 404),
    ("globex", "GET", "/v1/trainings/{job}/events", None, 404),
    # ... and on its private versions: every one a 404 exactly like a missing name or version
    ("globex", "GET", "/v1/interventions/secret/versions?owner=acme", None, 404),
    ("globex", "GET", "/v1/interventions/secret/versions", None, 404),
    ("globex", "GET", "/v1/interventions/secret?owner=acme&version=1", None, 404),
    ("globex", "GET", "/v1/interventions/secret/artifact?owner=acme&version=1", None, 404),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/secret@1"), 404),
    ("globex", "POST", "/v1/chat/completions", chat_body("secret@1"), 404),
    ("globex", "POST", "/v1/completions", completion_body("acme/secret@2"), 404),
    ("globex", "POST", "/v1/interventions/secret/versions/1/promote", None, 404),
    ("globex", "DELETE", "/v1/interventions/secret/versions/1", None, 404),
    # globex on acme's public intervention: may see and use it, not change it
    ("globex", "GET", "/v1/interventions/shared?owner=acme", None, 200),
    ("globex", "GET", "/v1/interventions/shared/artifact?owner=acme", None, 200),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/shared"), 200),
    ("globex", "GET", "/v1/interventions/shared/versions?owner=acme", None, 200),
    ("globex", "GET", "/v1/interventions/shared?owner=acme&version=1", None, 200),
    ("globex", "GET", "/v1/interventions/shared/artifact?owner=acme&version=1", None, 200),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/shared@1"), 200),
    ("globex", "POST", "/v1/completions", completion_body("acme/shared@2"), 200),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/shared@99"), 404),
    ("globex", "POST", "/v1/interventions/shared/versions/1/promote", None, 404),
    ("globex", "DELETE", "/v1/interventions/shared/versions/1", None, 404),
    ("globex", "GET", "/v1/interventions/shared/versions", None, 404),  # without ?owner: its own namespace
    ("globex", "DELETE", "/v1/interventions/shared", None, 404),
    ("globex", "PUT", "/v1/interventions/shared", "artifact", 404),
    ("globex", "PUT", "/v1/interventions/secret", "artifact", 404),
    ("acme", "PUT", "/v1/interventions/secret", "artifact", 200),
    # training files and fine-tuning jobs ({file} is acme's file): acme's own, then globex as if they did not exist
    ("acme", "GET", "/v1/files/{file}", None, 200),
    ("acme", "GET", "/v1/files/{file}/content", None, 200),
    ("acme", "GET", "/v1/files", None, 200),
    ("acme", "GET", "/v1/fine_tuning/jobs/{job}", None, 200),
    ("acme", "GET", "/v1/fine_tuning/jobs/{job}/events", None, 200),
    ("acme", "GET", "/v1/fine_tuning/jobs/{job}/checkpoints", None, 200),
    ("acme", "GET", "/v1/fine_tuning/jobs", None, 200),
    ("acme", "GET", "/v1/models/secret", None, 200),
    ("acme", "GET", "/v1/models/acme/secret@1", None, 200),
    ("globex", "GET", "/v1/files/{file}", None, 404),
    ("globex", "GET", "/v1/files/{file}/content", None, 404),
    ("globex", "DELETE", "/v1/files/{file}", None, 404),
    ("globex", "GET", "/v1/files?after={file}", None, 400),  # not a cursor in globex's list
    ("globex", "POST", "/v1/fine_tuning/jobs", {"model": MODEL_ID, "training_file": "{file}"}, 400),  # as if missing
    ("globex", "GET", "/v1/fine_tuning/jobs/{job}", None, 404),
    ("globex", "POST", "/v1/fine_tuning/jobs/{job}/cancel", None, 404),
    ("globex", "GET", "/v1/fine_tuning/jobs/{job}/events", None, 404),
    ("globex", "GET", "/v1/fine_tuning/jobs/{job}/checkpoints", None, 404),
    ("globex", "GET", "/v1/fine_tuning/jobs?after={job}", None, 400),
    ("globex", "GET", "/v1/models/secret", None, 404),
    ("globex", "GET", "/v1/models/acme/secret", None, 404),
    ("globex", "GET", "/v1/models/acme/secret@1", None, 404),
    ("globex", "DELETE", "/v1/models/acme/secret", None, 404),
    ("globex", "DELETE", "/v1/models/secret", None, 404),
    ("globex", "GET", "/v1/models/acme/shared", None, 200),  # public: visible ...
    ("globex", "GET", "/v1/models/acme/shared@1", None, 200),
    ("globex", "DELETE", "/v1/models/acme/shared", None, 404),  # ... but not theirs to delete
    ("globex", "DELETE", "/v1/models/acme/shared@1", None, 404),
    # composed models: every part resolves as it would alone
    ("acme", "POST", "/v1/chat/completions", chat_body("secret+shared"), 200),
    ("acme", "POST", "/v1/completions", completion_body("shared@1+acme/secret@2"), 200),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/shared+acme/shared@1"), 200),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/shared+acme/secret"), 404),
    ("globex", "POST", "/v1/chat/completions", chat_body("acme/secret@1+acme/shared"), 404),
    ("globex", "POST", "/v1/completions", completion_body("acme/shared+secret"), 404),
    # tenant keys on admin endpoints
    ("globex", "GET", "/v1/admin/tenants", None, 403),
    ("globex", "POST", "/v1/admin/tenants/globex/keys", None, 403),
    ("globex", "PUT", "/v1/admin/tenants/acme/interventions/secret/public", {"public": True}, 403),
]
ENDPOINTS = [
    ("GET", "/v1/models", None), ("GET", "/v1/interventions", None), ("GET", "/v1/interventions/secret", None),
    ("GET", "/v1/interventions/secret/artifact", None), ("DELETE", "/v1/interventions/secret", None),
    ("POST", "/v1/chat/completions", chat_body("secret")), ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": "x"}),
    ("POST", "/v1/trainings", {"name": "x", "examples": EXAMPLES}), ("GET", "/v1/trainings", None),
    ("GET", "/v1/trainings/{job}", None), ("DELETE", "/v1/trainings/{job}", None),
    ("GET", "/v1/admin/tenants", None), ("PUT", "/v1/interventions/secret", "artifact"),
    ("POST", "/v1/interventions", "artifact"), ("POST", "/v1/trainings/upload", "jsonl"),
    ("GET", "/v1/trainings/{job}/events", None),
    ("PUT", "/v1/admin/tenants/acme/interventions/secret/public", {"public": True}),
    ("GET", "/v1/interventions/secret/versions", None), ("POST", "/v1/interventions/secret/versions/1/promote", None),
    ("DELETE", "/v1/interventions/secret/versions/1", None),
    ("POST", "/v1/files", "jsonl-file"), ("GET", "/v1/files", None), ("GET", "/v1/files/{file}", None),
    ("GET", "/v1/files/{file}/content", None), ("DELETE", "/v1/files/{file}", None),
    ("POST", "/v1/fine_tuning/jobs", {"model": MODEL_ID, "training_file": "{file}"}), ("GET", "/v1/fine_tuning/jobs", None),
    ("GET", "/v1/fine_tuning/jobs/{job}", None), ("POST", "/v1/fine_tuning/jobs/{job}/cancel", None),
    ("GET", "/v1/fine_tuning/jobs/{job}/events", None), ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints", None),
    ("GET", "/v1/models/secret", None),
    ("DELETE", "/v1/models/secret", None),
]
MATRIX += [(caller, m, p, b, 401) for caller in ("nobody", "badkey") for m, p, b in ENDPOINTS]
# the playground's files hold no data (everything it shows comes from /v1 with the user's key): open to anyone
MATRIX += [(caller, "GET", path, None, 200) for caller in ("nobody", "badkey", "globex")
           for path in ("/", "/playground/", "/playground/js/app.js")]


@pytest.mark.parametrize("caller,method,path,body,status", MATRIX)
def test_isolation_matrix(world, caller, method, path, body, status) -> None:
    client = world["client"]
    headers = {"acme": auth(world["acme"]), "globex": auth(world["globex"]), "nobody": {},
               "badkey": auth(world["acme"][:-2] + "xx")}[caller]
    kwargs: dict = {"json": body}
    if body == "artifact":  # a multipart upload of a valid artifact
        kwargs = {"data": {"name": "secret"}, "files": {"file": ("a.safetensors", artifact_bytes(world["base"], persona(9)))}}
    elif body == "jsonl":
        kwargs = {"data": {"name": "x"}, "files": {"file": ("e.jsonl", b'{"prompt": "a", "completion": "b"}')}}
    elif body == "jsonl-file":
        kwargs = {"data": {"purpose": "fine-tune"}, "files": {"file": ("e.jsonl", JSONL)}}
    elif isinstance(body, dict) and body.get("training_file") == "{file}":
        kwargs = {"json": {**body, "training_file": world["file"]}}
    response = client.request(method, path.format(job=world["job"], file=world["file"]), headers=headers, **kwargs)
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert documented(client.get("/openapi.json").json(), method, path, status), "the OpenAPI schema omits it"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "secret" not in error["message"] or status == 404  # a 404 names what was asked, nothing more
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def chat_not_found(client, headers: dict, model: str) -> dict:  # noqa: ANN001
    """The 404 error body of a chat naming `model`, its "did you mean" hint removed after checking that the hint
    lists only names this caller may use (public ones here), never the private `secret`."""
    response = client.post("/v1/chat/completions", json=chat_body(model), headers=headers)
    assert response.status_code == 404
    message, _, hint = response.json()["error"]["message"].partition("; did you mean")
    assert "secret" not in hint
    return {**response.json()["error"], "message": message}


def test_another_tenants_versions_are_indistinguishable_from_missing_ones(world) -> None:
    """Private name, missing name, missing version of a public name: the same 404 body but for the string asked."""
    client, globex = world["client"], auth(world["globex"])

    def refused(model: str) -> dict:
        error = chat_not_found(client, globex, model)
        return {**error, "message": error["message"].replace(model, "M")}

    assert refused("acme/secret@1") == refused("acme/ghost@1") == refused("acme/shared@99") == refused("secret@1")

    def listing(name: str) -> dict:
        response = client.get(f"/v1/interventions/{name}/versions?owner=acme", headers=globex)
        assert response.status_code == 404
        return {**response.json()["error"], "message": response.json()["error"]["message"].replace(name, "N")}

    assert listing("secret") == listing("ghost")


def test_a_composition_refuses_another_tenants_private_part_like_a_missing_one(world) -> None:
    """The 404 names the part it could not resolve, and a private part reads exactly like one that does not exist."""
    client, globex = world["client"], auth(world["globex"])
    private = chat_not_found(client, globex, "acme/shared+acme/secret")
    missing = chat_not_found(client, globex, "acme/shared+acme/ghost")
    assert private["message"] == "The model 'acme/secret' does not exist"
    assert private == {**missing, "message": missing["message"].replace("ghost", "secret")}


def test_public_pins_keep_their_version_when_the_owner_replaces(world) -> None:
    client, globex, acme = world["client"], auth(world["globex"]), auth(world["acme"])
    body = {**chat_body("acme/shared@1"), "max_tokens": 6, "temperature": 0}
    before = client.post("/v1/chat/completions", json=body, headers=globex).json()["choices"][0]["message"]["content"]
    assert put_file(client, world["base"], "shared", world["acme"], seed=30, method="PUT").status_code == 200
    after = client.post("/v1/chat/completions", json=body, headers=globex).json()["choices"][0]["message"]["content"]
    assert before == after
    listed = client.get("/v1/interventions/shared/versions?owner=acme", headers=globex).json()["data"]
    assert listed[0]["id"] == "acme/shared@3" and listed[0]["current"]
    assert client.post("/v1/interventions/shared/versions/2/promote", headers=acme).status_code == 200


def test_listings_show_own_and_public_only(world) -> None:
    client = world["client"]
    mine = {r["id"] for r in client.get("/v1/interventions", headers=auth(world["acme"])).json()["data"]}
    theirs = {r["id"] for r in client.get("/v1/interventions", headers=auth(world["globex"])).json()["data"]}
    assert mine == {"secret", "shared"} and theirs == {"acme/shared"}
    models = {m["id"] for m in client.get("/v1/models", headers=auth(world["globex"])).json()["data"]}
    assert models == {MODEL_ID, "acme/shared"}
    assert client.get("/v1/trainings", headers=auth(world["globex"])).json()["data"] == []
    assert [j["id"] for j in client.get("/v1/trainings", headers=auth(world["acme"])).json()["data"]] == [world["job"]]
    assert client.get("/v1/files", headers=auth(world["globex"])).json()["data"] == []
    assert world["file"] in {f["id"] for f in client.get("/v1/files", headers=auth(world["acme"])).json()["data"]}
    assert client.get("/v1/fine_tuning/jobs", headers=auth(world["globex"])).json()["data"] == []
    fine_tuning = client.get("/v1/fine_tuning/jobs", headers=auth(world["acme"])).json()["data"]
    assert [j["id"] for j in fine_tuning] == [world["job"]] and fine_tuning[0]["training_file"] is None  # native job


def test_same_name_in_two_tenants_are_two_interventions(world) -> None:
    client, base = world["client"], world["base"]
    assert put_file(client, base, "twin", world["acme"], seed=5).status_code == 201
    assert put_file(client, base, "twin", world["globex"], seed=6).status_code == 201
    one = client.get("/v1/interventions/twin", headers=auth(world["acme"])).json()
    two = client.get("/v1/interventions/twin", headers=auth(world["globex"])).json()
    assert one["digest"] != two["digest"] and one["owner"] == "acme" and two["owner"] == "globex"
    assert client.delete("/v1/interventions/twin", headers=auth(world["globex"])).status_code == 200
    assert client.get("/v1/interventions/twin", headers=auth(world["acme"])).json()["digest"] == one["digest"]


def test_revoked_key_stops_working_at_once(world) -> None:
    client = world["client"]
    created = client.post("/v1/admin/tenants/globex/keys", headers=ADMIN).json()
    assert client.get("/v1/models", headers=auth(created["key"])).status_code == 200
    assert client.delete(f"/v1/admin/keys/{created['id']}", headers=ADMIN).status_code == 200
    assert client.get("/v1/models", headers=auth(created["key"])).status_code == 401
    listed = client.get("/v1/admin/tenants/globex/keys", headers=ADMIN).json()["data"]
    assert all("key" not in k for k in listed) and any(k["revoked_at"] for k in listed)


def test_admin_acts_for_a_tenant_with_a_header(world) -> None:
    client = world["client"]
    as_acme = {**ADMIN, "X-Reft-Tenant": "acme"}
    assert client.get("/v1/interventions/secret", headers=as_acme).status_code == 200
    assert client.get("/v1/interventions/secret", headers=ADMIN).status_code == 404  # the admin's own tenant
    assert client.get("/v1/models", headers={**ADMIN, "X-Reft-Tenant": "../x"}).status_code == 400


@pytest.fixture
def limited(tmp_path, tiny_base) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, auth="on", admin_key="admin-secret", max_interventions_per_tenant=1,
                             max_trainings_per_tenant=1)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        yield client


def test_requests_per_minute_quota_gives_429_with_retry_after(limited) -> None:
    key = new_key(limited, "tiny", requests_per_minute=3)
    statuses = [limited.get("/v1/models", headers=auth(key)).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    refused = limited.get("/v1/models", headers=auth(key))
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "requests_per_minute"
    other = new_key(limited, "other")
    assert limited.get("/v1/models", headers=auth(other)).status_code == 200  # quotas are per tenant
    assert limited.get("/v1/models", headers=ADMIN).status_code == 200  # the admin is not limited


def test_tokens_per_minute_quota_counts_prompt_and_max_tokens(limited) -> None:
    key = new_key(limited, "thrifty", tokens_per_minute=200)
    body = {"model": MODEL_ID, "prompt": "abcdefghij", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "min_tokens": 60}
    assert limited.post("/v1/completions", json=body, headers=auth(key)).status_code == 200
    assert limited.post("/v1/completions", json=body, headers=auth(key)).status_code == 200
    refused = limited.post("/v1/completions", json=body, headers=auth(key))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "tokens_per_minute"
    assert "Retry-After" in refused.headers


def test_storage_and_training_quotas(limited, tiny_base) -> None:
    key = new_key(limited, "small")
    assert put_file(limited, tiny_base, "one", key).status_code == 201
    refused = put_file(limited, tiny_base, "two", key, seed=2)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert put_file(limited, tiny_base, "one", key, seed=3, method="PUT").status_code == 200  # replacing is fine
    first = limited.post("/v1/trainings", json={"name": "j1", "examples": EXAMPLES, **SMALL_JOB}, headers=auth(key))
    second = limited.post("/v1/trainings", json={"name": "j2", "examples": EXAMPLES, **SMALL_JOB}, headers=auth(key))
    assert first.status_code == 202 and second.status_code == 429 and "Retry-After" in second.headers
    limited.delete(f"/v1/trainings/{first.json()['id']}", headers=auth(key))


def test_auth_defaults_follow_the_bind_address(tmp_path) -> None:
    assert not make_settings(tmp_path).auth_enabled  # 127.0.0.1
    assert make_settings(tmp_path, host="0.0.0.0").auth_enabled
    assert make_settings(tmp_path, host="::1").auth_enabled is False
    assert make_settings(tmp_path, host="0.0.0.0", auth="off").auth_enabled is False

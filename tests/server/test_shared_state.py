"""Two replicas in one process, sharing one PostgreSQL schema and one Redis prefix: what one writes, the other
serves (uploads, replaces and promotes within 1 s, public flags, key revocation at once), rate limits hold across
both, and concurrent uploads on both never pass the tenant's quota. Each replica has its own model object (two
engines must not share one module's hooks), built from the same seed so artifacts fit both."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from reft_core.base_model import BaseModel
from reft_core.fingerprint import fingerprint_model
from server.app import create_app
from tests import tiny
from tests.builders import all_at_once
from tests.shared_services import REDIS_URL

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona

ADMIN = {"Authorization": "Bearer admin-secret"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def own_model() -> BaseModel:
    model = tiny.tiny_llama()
    return BaseModel(model=model, tokenizer=tiny.tiny_tokenizer(), fingerprint=fingerprint_model(model),
                     model_id=MODEL_ID, model_dir=Path("."), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture
def replicas(tmp_path, postgres, redis_keys) -> Iterator[tuple[TestClient, TestClient]]:
    url = postgres.new_schema()
    prefix = f"{redis_keys}{url[-12:]}:"

    def settings(name: str):  # noqa: ANN202
        return make_settings(tmp_path / name, store=url, limits_store=REDIS_URL, limits_store_prefix=prefix,
                             auth="on", admin_key="admin-secret", max_interventions_per_tenant=5)

    with TestClient(create_app(settings("a"), base_model=own_model())) as a, \
            TestClient(create_app(settings("b"), base_model=own_model())) as b:
        for client in (a, b):  # both replicas hear the store's notifications before the test writes
            listener = client.app.state.services.store.backend._listeners[0]  # type: ignore[attr-defined]
            assert listener.connected.wait(10)
        yield a, b
    postgres.close_connections(url)


def new_key(client: TestClient, tenant: str, **limits: int) -> str:
    assert client.post("/v1/admin/tenants", json={"name": tenant, "limits": limits}, headers=ADMIN).status_code == 201
    created = client.post(f"/v1/admin/tenants/{tenant}/keys", headers=ADMIN)
    assert created.status_code == 201
    return created.json()["key"]


def chat(client: TestClient, key: str, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    response = client.post("/v1/chat/completions", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()


def put(client: TestClient, key: str, name: str, seed: int, method: str = "POST") -> int:
    payload = ARTIFACTS[seed]
    path = "/v1/interventions" if method == "POST" else f"/v1/interventions/{name}"
    response = client.request(method, path, data={"name": name} if method == "POST" else {},
                              files={"file": ("a.safetensors", payload)}, headers=auth(key))
    return response.status_code


_BASE = own_model()
ARTIFACTS = {seed: artifact_bytes(_BASE, persona(seed)) for seed in range(12)}


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` held (fails after `seconds`)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_writes_on_one_replica_are_served_by_the_other(replicas) -> None:
    a, b = replicas
    key = new_key(a, "acme")
    assert put(a, key, "p", 1) == 201
    first = chat(b, key, "p")  # B has never seen p: it reads the store
    alone = chat(a, key, "p")
    assert first["choices"][0]["message"] == alone["choices"][0]["message"]
    assert put(a, key, "p", 2, method="PUT") == 200  # B has p@1 cached now: the notification must drop it
    expected = chat(a, key, "p@2")["choices"][0]["message"]
    assert expected != first["choices"][0]["message"]
    assert within(1.0, lambda: chat(b, key, "p")["choices"][0]["message"] == expected)
    assert b.post("/v1/interventions/p/versions/1/promote", headers=auth(key)).status_code == 200
    assert within(1.0, lambda: chat(a, key, "p")["choices"][0]["message"] == first["choices"][0]["message"])
    assert b.delete("/v1/interventions/p", headers=auth(key)).status_code == 200
    model = {"model": "p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert within(1.0, lambda: a.post("/v1/chat/completions", json=model, headers=auth(key)).status_code == 404)


def test_public_flag_and_key_revocation_reach_the_other_replica(replicas) -> None:
    a, b = replicas
    owner, other = new_key(a, "acme"), new_key(b, "globex")
    assert put(a, owner, "shared", 3) == 201
    model = {"model": "acme/shared", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert b.post("/v1/chat/completions", json=model, headers=auth(other)).status_code == 404
    assert a.put("/v1/admin/tenants/acme/interventions/shared/public", json={"public": True},
                 headers=ADMIN).status_code == 200
    assert within(1.0, lambda: b.post("/v1/chat/completions", json=model, headers=auth(other)).status_code == 200)
    key_id = next(k["id"] for k in a.get("/v1/admin/tenants/globex/keys", headers=ADMIN).json()["data"])
    assert a.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN).status_code == 200
    assert b.get("/v1/models", headers=auth(other)).status_code == 401  # at once: keys are read on every request


def test_a_request_limit_holds_across_replicas(replicas) -> None:
    a, b = replicas
    key = new_key(a, "tiny", requests_per_minute=6)
    start = time.monotonic()
    statuses = [(a if i % 2 else b).get("/v1/models", headers=auth(key)).status_code for i in range(18)]
    refilled = math.ceil((time.monotonic() - start) * 6 / 60)  # the bucket refills one request per 10 s meanwhile
    # one minute's allowance (6) as the burst, plus what refilled: not 2 x 6
    assert 6 <= statuses.count(200) <= 6 + refilled and statuses.count(429) == 18 - statuses.count(200)
    for client in (a, b):
        assert "reft_limits_store_up 1.0" in client.get("/metrics").text


def test_concurrent_uploads_on_both_replicas_never_pass_the_quota(replicas) -> None:
    a, b = replicas
    key = new_key(a, "acme")
    statuses = all_at_once(12, lambda i: put(a if i % 2 else b, key, f"n{i}", i))
    assert sorted(statuses) == [201] * 5 + [403] * 7
    assert len(b.get("/v1/interventions", headers=auth(key)).json()["data"]) == 5


def test_a_database_outage_keeps_cached_personas_serving_and_refuses_writes(replicas, monkeypatch) -> None:
    """What a PostgreSQL restart looks like to a replica: known keys and cached personas keep generating, writes
    and names never seen get 503 store_unavailable, and everything works again once the database is back."""
    import psycopg

    a, _ = replicas
    key = new_key(a, "acme")
    assert put(a, key, "p", 1) == 201
    before = chat(a, key, "p")["choices"][0]["message"]
    registry = a.app.state.services.registry  # the write's own notification may drop the first resolve's entry:
    within(2.0, lambda: chat(a, key, "p")["choices"][0]["message"] == before
           and registry.lookup_cached("p", "acme") is not None)  # cached

    def refused(*_args: object, **_kwargs: object) -> None:
        raise psycopg.OperationalError("connection refused (the database is restarting)")

    for database in (a.app.state.services.store.backend.db, a.app.state.tenants.db):
        monkeypatch.setattr(database.pool, "connection", refused)
    assert chat(a, key, "p")["choices"][0]["message"] == before
    response = a.post("/v1/interventions", data={"name": "q"}, files={"file": ("a.safetensors", ARTIFACTS[2])},
                      headers=auth(key))
    assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
    assert a.get("/v1/models", headers=auth("rs-unknown.secret")).status_code == 503  # cannot tell: not 401
    monkeypatch.undo()
    assert put(a, key, "q", 2) == 201 and chat(a, key, "q")


def test_a_replica_that_shuts_down_hands_its_job_to_another(tmp_path, postgres) -> None:
    """A clean shutdown (the lifespan's end: SIGTERM) releases the job this replica runs instead of failing it:
    another replica claims it at once and runs it again, never failing it with shutting_down; the run the shutdown
    ended does not count against job_max_attempts."""
    url = postgres.new_schema()
    long_job = {"name": "handed", "examples": [{"prompt": "a", "completion": "b"}] * 2,
                "intervention": {"layers": [1], "rank": 2}, "hyperparameters": {"epochs": 1000, "batch_size": 1}}
    a = TestClient(create_app(make_settings(tmp_path / "a", store=url), base_model=own_model()))
    a.__enter__()  # A alone runs the job; B starts only then
    try:
        job = a.post("/v1/trainings", json=long_job).json()
        within(30, lambda: a.get(f"/v1/trainings/{job['id']}").json()["progress"].get("step", 0) > 0)
        with TestClient(create_app(make_settings(tmp_path / "b", store=url), base_model=own_model())) as b:
            a.__exit__(None, None, None)
            a = None
            b_owner = b.app.state.services.training.jobs.owner
            within(10, lambda: b.get(f"/v1/trainings/{job['id']}").json()["replica"] == b_owner)
            within(30, lambda: b.get(f"/v1/trainings/{job['id']}").json()["progress"].get("step", 0) > 0)
            handed = b.get(f"/v1/trainings/{job['id']}").json()
            assert (handed["status"], handed["attempts"], handed["error"]) == ("running", 1, None)
            assert b.delete(f"/v1/trainings/{job['id']}").status_code == 200
            within(10, lambda: b.get(f"/v1/trainings/{job['id']}").json()["status"] == "cancelled")
    finally:
        if a is not None:
            a.__exit__(None, None, None)
        postgres.close_connections(url)


def test_a_queued_job_whose_input_cannot_be_read_is_failed_with_why(tmp_path, postgres) -> None:
    """A job queued by another build (an input format this one does not read) fails with the reason, and the
    replica's worker goes on claiming: the next job runs."""
    from adapters_store.jobs import JobRecord

    url = postgres.new_schema()
    try:
        with TestClient(create_app(make_settings(tmp_path, store=url), base_model=own_model())) as client:
            jobs = client.app.state.services.training.jobs
            jobs.submit(JobRecord(id="ftjob-future", name="p", status="queued", spec={}), {"format": 99}, 8)
            within(10, lambda: client.get("/v1/trainings/ftjob-future").json()["status"] == "failed")
            failed = client.get("/v1/trainings/ftjob-future").json()
            assert "cannot read the job's stored input" in failed["error"] and "format 99" in failed["error"]
            job = client.post("/v1/trainings", json={"name": "next", "examples": [{"prompt": "a", "completion": "b"}],
                                                     "intervention": {"layers": [1], "rank": 2}}).json()
            within(60, lambda: client.get(f"/v1/trainings/{job['id']}").json()["status"] == "succeeded")
    finally:
        postgres.close_connections(url)

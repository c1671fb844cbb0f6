"""Reliability in-process: corrupt files, full or read-only disks, timeouts, a full queue and draining each fail
cleanly (right status, clear reason) while everything else keeps serving."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app

from tests.store_faults import corrupt_artifact

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona, upload

CHAT = [{"role": "user", "content": "hi"}]


def chat(client: TestClient, model: str = MODEL_ID, **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 4, **extra})


@pytest.fixture
def slow_decode(monkeypatch) -> None:
    """Every decode step takes >= 20 ms, so requests stay in flight long enough to observe."""
    from server.engine.runner import ModelRunner

    original = ModelRunner.decode

    def slow(self, tokens):  # noqa: ANN001, ANN202
        time.sleep(0.02)
        return original(self, tokens)

    monkeypatch.setattr(ModelRunner, "decode", slow)


def test_a_corrupt_artifact_is_unavailable_with_a_reason_and_others_keep_serving(client, tiny_base) -> None:
    upload(client, "bad", artifact_bytes(tiny_base, persona(1)))
    upload(client, "good", artifact_bytes(tiny_base, persona(2)))
    store = client.app.state.services.store
    corrupt_artifact(store, store.get("bad").file_sha256)
    refused = chat(client, "bad")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "artifact_unavailable" and "corrupt" in refused.json()["error"]["message"]
    assert chat(client, "good").status_code == 200 and chat(client).status_code == 200
    assert client.get("/v1/interventions/bad/artifact").status_code == 503


def test_disk_full_on_upload_is_a_507_and_changes_nothing(local_client, tiny_base, monkeypatch) -> None:
    upload(local_client, "kept", artifact_bytes(tiny_base, persona(1)))

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    files = {"file": ("a.safetensors", artifact_bytes(tiny_base, persona(2)))}
    refused = local_client.post("/v1/interventions", data={"name": "new"}, files=files)
    assert refused.status_code == 507 and "disk full" in refused.json()["error"]["message"]
    replaced = local_client.put("/v1/interventions/kept", files=files)
    assert replaced.status_code == 507
    monkeypatch.undo()
    assert [r["id"] for r in local_client.get("/v1/interventions").json()["data"]] == ["kept"]
    assert chat(local_client, "kept").status_code == 200


def test_a_read_only_store_serves_and_refuses_writes_cleanly(tmp_path, tiny_base, monkeypatch) -> None:
    """Artifacts, training jobs and tenants: the server starts and serves on a read-only data directory."""
    settings = make_settings(tmp_path, store=None)  # a read-only directory: the local store
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        upload(client, "kept", artifact_bytes(tiny_base, persona(1)))
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)  # the root is not writable
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        assert chat(client, "kept").status_code == 200
        files = {"file": ("a.safetensors", artifact_bytes(tiny_base, persona(2)))}
        refused = client.post("/v1/interventions", data={"name": "new"}, files=files)
        assert refused.status_code == 507 and "read-only" in refused.json()["error"]["message"]
        assert client.delete("/v1/interventions/kept").status_code == 507
        training = client.post("/v1/trainings", json={"name": "t", "examples": [{"prompt": "a", "completion": "b"}]})
        assert training.status_code == 507 and client.get("/v1/trainings").json()["data"] == []
        assert client.post("/v1/admin/tenants", json={"name": "acme"}).status_code == 507
        assert chat(client, "kept").status_code == 200


def test_a_request_past_its_timeout_is_cancelled_with_504(tmp_path, tiny_base, slow_decode) -> None:
    settings = make_settings(tmp_path, request_timeout_s=0.15)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        timed_out = chat(client, max_tokens=60, min_tokens=60, ignore_eos=True)
        assert timed_out.status_code == 504 and timed_out.json()["error"]["type"] == "timeout_error"
        with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL_ID, "messages": CHAT, "max_tokens": 60, "min_tokens": 60, "ignore_eos": True, "stream": True,
        }) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert '"timeout_error"' in lines[-2] and lines[-1] == "data: [DONE]"
        engine = client.app.state.services.engine
        deadline = time.time() + 5
        while engine.scheduler.running and time.time() < deadline:  # the timed-out rows were released
            time.sleep(0.02)
        assert not engine.scheduler.running and chat(client).status_code == 200


def test_a_full_queue_refuses_at_once_with_429(tmp_path, tiny_base, slow_decode) -> None:
    settings = make_settings(tmp_path, max_running=1, max_waiting_requests=0)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        results: list[int] = []
        long = {"max_tokens": 60, "min_tokens": 60, "ignore_eos": True}
        worker = threading.Thread(target=lambda: results.append(chat(client, **long).status_code))
        worker.start()
        services = client.app.state.services
        deadline = time.time() + 5
        while not services.engine.scheduler.running and time.time() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        refused = chat(client)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "server_busy"
        assert refused.headers["Retry-After"] == "1" and time.perf_counter() - started < 1.0
        worker.join()
        assert results == [200] and chat(client).status_code == 200


def test_draining_fails_new_and_queued_requests_and_lets_running_ones_finish(tmp_path, tiny_base, slow_decode) -> None:
    settings = make_settings(tmp_path, max_running=1)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        results: dict[str, object] = {}
        long = {"max_tokens": 40, "min_tokens": 40, "ignore_eos": True}

        def run(key: str) -> None:
            response = chat(client, **long)
            results[key] = (response.status_code, response.json())

        running = threading.Thread(target=run, args=("running",))
        running.start()
        engine = client.app.state.services.engine
        while not engine.scheduler.running:
            time.sleep(0.01)
        queued = threading.Thread(target=run, args=("queued",))
        queued.start()
        while not engine.scheduler.waiting:
            time.sleep(0.01)
        client.app.state.drain()
        assert client.get("/ready").status_code == 503 and client.get("/ready").json()["reason"] == "draining"
        refused = chat(client)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        running.join()
        queued.join()
        status, body = results["running"]
        assert status == 200 and body["usage"]["completion_tokens"] == 40  # type: ignore[index]
        status, body = results["queued"]
        assert status == 503 and "shutting down" in body["error"]["message"]  # type: ignore[index]
        assert client.get("/health").json() == {"status": "ok"}  # alive while draining


def test_a_burst_cannot_slip_past_the_queue_bound_while_tokenizing(tmp_path, tiny_base, monkeypatch) -> None:
    """Requests still tokenizing count against the bound: 5 at once with room for 2 -> 2 served, 3 refused."""
    from server.generation import GenerationService

    tokenize = GenerationService._chat_ids

    def slow_tokenize(self, messages):  # noqa: ANN001, ANN202
        time.sleep(0.4)
        return tokenize(self, messages)

    monkeypatch.setattr(GenerationService, "_chat_ids", slow_tokenize)
    settings = make_settings(tmp_path, max_running=1, max_waiting_requests=1)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(chat(client).status_code)) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [200, 200, 429, 429, 429]
        assert chat(client).status_code == 200  # the bound is released again

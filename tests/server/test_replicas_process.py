"""Three real `reft-serve serve` processes sharing one PostgreSQL database and one Redis prefix (on the tiny
model, to keep the suite's time down): an upload on one is served by another at once, a replace reaches the
others within 1 s while an earlier stream finishes on the old version, a revoked key is refused everywhere, a
tenant's request limit holds across all three, concurrent uploads never pass the quota, and the job of a
SIGKILLed replica is failed with the reason by the survivors while the stored personas stay complete."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from tests.shared_services import REDIS_URL

from .conftest import artifact_bytes, persona
from .process import server_process

ADMIN_KEY = "admin-secret-replicas"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, postgres, redis_keys) -> Iterator[list[tuple[object, str]]]:
    url = postgres.new_schema()
    data_dir = tmp_path_factory.mktemp("replicas")
    key_file = data_dir / "admin.key"
    key_file.write_text(ADMIN_KEY)
    common = ["--store", url, "--limits-store", REDIS_URL, "--auth", "on", "--admin-key-file", str(key_file),
              "--set", f"limits_store_prefix={redis_keys}replicas:", "--set", "job_lease_s=2",
              "--set", "max_interventions_per_tenant=5",
              "--set", "engine_process=false"]  # the engine on a thread: half the processes to start (test time)
    managers = [server_process(tiny_model_dir, data_dir / name, *common, ready_timeout=240) for name in "abc"]
    with ExitStack() as stack, ThreadPoolExecutor(3) as pool:  # start together: each start is mostly waiting
        futures = [pool.submit(manager.__enter__) for manager in managers]
        for manager, future in zip(managers, futures):
            if future.exception() is None:
                stack.push(manager.__exit__)
        yield [future.result() for future in futures]
    postgres.close_connections(url)


def new_key(url: str, tenant: str, **limits: int) -> str:
    assert httpx.post(f"{url}/v1/admin/tenants", json={"name": tenant, "limits": limits},
                      headers=ADMIN).status_code == 201
    created = httpx.post(f"{url}/v1/admin/tenants/{tenant}/keys", headers=ADMIN)
    assert created.status_code == 201
    return created.json()["key"]


def put(url: str, key: str, name: str, payload: bytes, method: str = "POST") -> httpx.Response:
    path = f"{url}/v1/interventions" + ("" if method == "POST" else f"/{name}")
    return httpx.request(method, path, data={"name": name} if method == "POST" else {},
                         files={"file": ("a.safetensors", payload)}, headers=auth(key), timeout=30)


def reply(url: str, key: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def within(seconds: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def test_upload_replace_and_revoke_reach_every_replica(cluster, tiny_base) -> None:
    (_, a), (_, b), (_, c) = cluster
    key = new_key(a, "acme")
    assert put(a, key, "p", artifact_bytes(tiny_base, persona(1))).status_code == 201
    first = reply(b, key, "p")  # at once: B reads what A committed
    assert reply(c, key, "p") == first
    stream_body = {"model": "p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
                   "min_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{b}/v1/chat/completions", json=stream_body, headers=auth(key), timeout=60) as stream:
        lines = stream.iter_lines()
        started = next(line for line in lines if line.startswith("data: "))
        assert put(a, key, "p", artifact_bytes(tiny_base, persona(2)), method="PUT").status_code == 200
        acknowledged = time.monotonic()
        second = reply(a, key, "p@2")
        assert second != first
        # B and C have p@1 cached: a request sent 1 s after the replace was acknowledged gets version 2 (a reply
        # itself may take seconds on a loaded machine, so the time is taken when the request is sent)
        time.sleep(max(0.0, acknowledged + 1.0 - time.monotonic()))
        assert reply(b, key, "p") == second and reply(c, key, "p") == second
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    pinned = httpx.post(f"{b}/v1/chat/completions", json={**stream_body, "model": "p@1", "stream": False},
                        headers=auth(key), timeout=60).json()["choices"][0]["message"]["content"]
    streamed = json.loads(started[6:])["choices"][0]["delta"].get("content", "") + "".join(
        chunk["choices"][0]["delta"].get("content", "") for chunk in rest if chunk["choices"])
    assert streamed == pinned  # the stream that began before the replace finished on version 1
    key_id = next(k["id"] for k in httpx.get(f"{a}/v1/admin/tenants/acme/keys", headers=ADMIN).json()["data"])
    assert httpx.delete(f"{a}/v1/admin/keys/{key_id}", headers=ADMIN).status_code == 200
    assert all(httpx.get(f"{u}/v1/models", headers=auth(key)).status_code == 401 for u in (b, c))  # at once


def test_a_request_limit_holds_across_replicas(cluster) -> None:
    urls = [url for _, url in cluster]
    key = new_key(urls[0], "limited", requests_per_minute=10)
    start = time.monotonic()
    statuses = [httpx.get(f"{urls[i % 3]}/v1/models", headers=auth(key)).status_code for i in range(60)]
    refilled = math.ceil((time.monotonic() - start) * 10 / 60)  # the bucket refills 1 per 6 s meanwhile
    # one minute's allowance (10) as the burst, plus what refilled: not 3 x 10
    assert 10 <= statuses.count(200) <= 10 + refilled and statuses.count(429) == 60 - statuses.count(200)


def test_concurrent_uploads_across_replicas_never_pass_the_quota(cluster, tiny_base) -> None:
    urls = [url for _, url in cluster]
    key = new_key(urls[0], "busy")
    payloads = [artifact_bytes(tiny_base, persona(10 + i)) for i in range(20)]
    statuses: list[int] = []
    start = threading.Barrier(20)

    def upload(index: int) -> None:
        start.wait()
        statuses.append(put(urls[index % 3], key, f"n{index}", payloads[index]).status_code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201] * 5 + [403] * 15
    assert len(httpx.get(f"{urls[1]}/v1/interventions", headers=auth(key)).json()["data"]) == 5


def test_the_job_of_a_killed_replica_is_failed_by_the_others(cluster, tiny_base) -> None:
    """Runs last in this module (it kills replica C). Examples are not stored, so the job is failed with the
    reason rather than retried; every stored persona stays complete and servable."""
    (_, a), (_, b), (process_c, c) = cluster
    key = new_key(a, "trainer")
    assert put(a, key, "kept", artifact_bytes(tiny_base, persona(30))).status_code == 201
    job = httpx.post(f"{c}/v1/trainings", headers=auth(key), json={
        "name": "trained", "examples": [{"prompt": "a", "completion": "b"}] * 2,
        "intervention": {"layers": [1], "rank": 2}, "hyperparameters": {"epochs": 1000, "batch_size": 1}})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    within(30, lambda: httpx.get(f"{a}/v1/trainings/{job_id}", headers=auth(key)).json()["status"] == "running")
    process_c.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    process_c.wait(10)  # type: ignore[attr-defined]

    def failed() -> bool:
        found = httpx.get(f"{b}/v1/trainings/{job_id}", headers=auth(key)).json()
        return found["status"] == "failed" and "stopped or restarted" in found["error"]

    within(15, failed)
    for url in (a, b):
        assert httpx.get(f"{url}/v1/interventions/kept/artifact", headers=auth(key)).status_code == 200
        assert reply(url, key, "kept")
        assert httpx.get(f"{url}/v1/interventions/trained", headers=auth(key)).status_code == 404  # never half-stored

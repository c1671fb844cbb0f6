"""Three real `reft-serve serve` processes on the embedded SmolLM2 (fp32, CPU) sharing one PostgreSQL database and
one Redis prefix (issue #11's acceptance): an upload on one is served by another at once, a replace reaches the
others within 1 s while an earlier stream finishes on the old version, a revoked key is refused everywhere, a
tenant's request limit holds across all three, concurrent uploads never pass the quota. Training jobs are a queue
in the database: a job running on one replica is watched (SSE) and cancelled from another; a job whose replicas
freeze past their leases is run again elsewhere, then failed with the reason when out of attempts, and the frozen
replicas, resumed, register nothing; the job of a SIGKILLed replica finishes on another one with the same artifact
as an uninterrupted run, while the stored personas stay complete.

One cluster for the module, its 3 processes started in parallel (`smollm2` is requested first so the GGUF
conversion into the model cache happens once, before they load it). Personas are random LoReFT weights at two
SmolLM2 layers, strong enough to change a greedy answer; replies keep `max_tokens` small and training jobs are
tiny (two examples, rank 1, one late layer: the backward pass stops there) so the module stays a few minutes on
2 loaded cores. The rate-limit test touches no model, but it shares this cluster: a second, tiny-model cluster
would cost more to start than it saves."""

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

from reft_core.base_model import BaseModel
from reft_core.config import InterventionConfig
from tests.builders import all_at_once, random_intervention, sse_events
from tests.shared_services import REDIS_URL

from .conftest import artifact_bytes
from .process import server_process

ADMIN_KEY = "admin-secret-replicas"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


PERSONA = InterventionConfig(layers=(4, 12), rank=4, positions="f1+l1")  # SmolLM2 has 30 layers


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def persona_bytes(base: BaseModel, seed: int) -> bytes:
    """A random SmolLM2 persona: strong enough to change a greedy answer, weak enough to keep it fluent."""
    return artifact_bytes(base, random_intervention(PERSONA, seed=seed, hidden=base.hidden_size, scale=0.1))


@pytest.fixture(scope="module")
def cluster(smollm2, tmp_path_factory, postgres, redis_keys) -> Iterator[list[tuple[object, str]]]:
    url = postgres.new_schema()
    data_dir = tmp_path_factory.mktemp("replicas")
    key_file = data_dir / "admin.key"
    key_file.write_text(ADMIN_KEY)
    common = ["--store", url, "--limits-store", REDIS_URL, "--auth", "on", "--admin-key-file", str(key_file),
              "--set", f"limits_store_prefix={redis_keys}replicas:", "--set", "job_lease_s=2", "--set", "job_max_attempts=2",
              "--set", "max_interventions_per_tenant=5",
              "--set", "engine_process=false"]  # the engine on a thread: half the processes to start (test time)
    # (`smollm2` first: the GGUF conversion into the model cache happens once, before the replicas load it)
    managers = [server_process(None, data_dir / name, *common, ready_timeout=300) for name in "abc"]
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


def test_upload_replace_and_revoke_reach_every_replica(cluster, smollm2) -> None:
    (_, a), (_, b), (_, c) = cluster
    key = new_key(a, "acme")
    assert put(a, key, "p", persona_bytes(smollm2, 1)).status_code == 201
    first = reply(b, key, "p")  # at once: B reads what A committed
    assert reply(c, key, "p") == first
    stream_body = {"model": "p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
                   "min_tokens": 32, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{b}/v1/chat/completions", json=stream_body, headers=auth(key), timeout=60) as stream:
        lines = stream.iter_lines()
        started = next(line for line in lines if line.startswith("data: "))
        assert put(a, key, "p", persona_bytes(smollm2, 2), method="PUT").status_code == 200
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


def test_concurrent_uploads_across_replicas_never_pass_the_quota(cluster, smollm2) -> None:
    urls = [url for _, url in cluster]
    key = new_key(urls[0], "busy")
    payloads = [persona_bytes(smollm2, 10 + i) for i in range(20)]
    statuses = all_at_once(20, lambda i: put(urls[i % 3], key, f"n{i}", payloads[i]).status_code)
    assert sorted(statuses) == [201] * 5 + [403] * 15
    assert len(httpx.get(f"{urls[1]}/v1/interventions", headers=auth(key)).json()["data"]) == 5


# rank 1 at one late layer: SmolLM2's backward pass stops at the intervention (layer 26 of 30), so a step is cheap
SMALL_INTERVENTION = {"layers": [26], "rank": 1}
LONG_JOB = {"examples": [{"prompt": "a", "completion": "b"}] * 2, "intervention": SMALL_INTERVENTION,
            "hyperparameters": {"epochs": 1000, "batch_size": 1}}  # runs until cancelled or frozen
KILLED_EPOCHS = 20  # 2 examples: 40 steps, long enough to be killed mid-run, short enough to run twice more


def job_status(url: str, key: str, job_id: str) -> dict:
    response = httpx.get(f"{url}/v1/trainings/{job_id}", headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def running_on(cluster: list, url: str, key: str, job_id: str, attempt: int = 1) -> tuple[object, str]:
    """(process, url) of the replica running the job's `attempt` (its `replica` id starts with host-pid)."""
    seen: list[dict] = []

    def started() -> bool:
        seen.append(job_status(url, key, job_id))
        return seen[-1]["status"] == "running" and seen[-1]["attempts"] == attempt and seen[-1]["progress"].get(
            "step", 0) > 0

    try:
        within(60, started)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: the job is {seen[-1]}") from None
    pid = int(job_status(url, key, job_id)["replica"].split("-")[-2])
    return next((process, u) for process, u in cluster if process.pid == pid)  # type: ignore[attr-defined]


def test_a_job_running_on_one_replica_is_watched_and_cancelled_from_another(cluster) -> None:
    urls = [url for _, url in cluster]
    key = new_key(urls[0], "watcher")
    created = httpx.post(f"{urls[0]}/v1/trainings", headers=auth(key), json={"name": "watched", **LONG_JOB})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    _, owner = running_on(cluster, urls[0], key, job_id)
    other = next(url for url in urls if url != owner)
    seen: list[dict] = []

    def watch() -> None:  # from a replica that does not run the job: fed from the stored record
        with httpx.stream("GET", f"{other}/v1/trainings/{job_id}/events", headers={**auth(key), "Last-Event-ID": "0"},
                          timeout=60) as response:
            assert response.status_code == 200
            sse_events(response.iter_lines(), until=lambda e: seen.append(e) or (e.get("data") or {}).get("status")
                       in ("succeeded", "failed", "cancelled"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    within(20, lambda: sum(1 for e in seen if (e.get("data") or {}).get("type") == "step") >= 5)
    asked = time.monotonic()
    assert httpx.delete(f"{other}/v1/trainings/{job_id}", headers=auth(key), timeout=30).status_code == 200
    within(5, lambda: job_status(owner, key, job_id)["status"] == "cancelled")
    assert time.monotonic() - asked < 3  # the owner heard it (NOTIFY), not the 2/3 s lease renewal
    watcher.join(30)
    events = [e for e in seen if "id" in e]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))  # numbered without gaps or repeats
    assert [e["data"]["type"] for e in events[:2]] == ["status", "status"]
    assert events[-1]["data"] == {"type": "status", "status": "cancelled", "result_version": None, "error": None}
    steps = [e["data"]["step"] for e in events if e["data"]["type"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    # the same ids from a third replica (Last-Event-ID resume), and from the owner (the job has ended everywhere)
    for url in urls:
        with httpx.stream("GET", f"{url}/v1/trainings/{job_id}/events", headers={**auth(key), "Last-Event-ID": "3"},
                          timeout=30) as response:
            assert [e for e in sse_events(response.iter_lines()) if "id" in e] == events[3:]
    assert httpx.get(f"{other}/v1/interventions/watched", headers=auth(key)).status_code == 404


def test_a_job_whose_every_attempt_dies_fails_with_the_reason(cluster) -> None:
    """Each replica that runs the job freezes (SIGSTOP) past its lease: the job runs again on another replica,
    then (job_max_attempts=2) is failed with the reason by the third. Resumed, the frozen replicas register nothing."""
    urls = [url for _, url in cluster]
    key = new_key(urls[0], "unlucky")
    created = httpx.post(f"{urls[0]}/v1/trainings", headers=auth(key), json={"name": "doomed", **LONG_JOB})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    frozen = []
    try:
        for attempt in (1, 2):
            process, url = running_on(cluster, urls[0] if not frozen else survivor, key, job_id, attempt)
            process.send_signal(signal.SIGSTOP)  # type: ignore[attr-defined]
            frozen.append(process)
            survivor = next(u for p, u in cluster if p not in frozen)
        within(15, lambda: job_status(survivor, key, job_id)["status"] == "failed")
    finally:
        for process in frozen:
            process.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
    failed = job_status(survivor, key, job_id)
    assert failed["error_code"] == "job_interrupted" and failed["attempts"] == 2
    assert "stopped 2 times" in failed["error"] and "job_max_attempts=2" in failed["error"]
    time.sleep(3)  # the resumed replicas learn they lost the job (lease renewal) and stop its runs
    for url in urls:
        assert job_status(url, key, job_id)["status"] == "failed"
        assert httpx.get(f"{url}/v1/interventions/doomed", headers=auth(key)).status_code == 404


def test_the_job_of_a_killed_replica_finishes_on_another(cluster, smollm2) -> None:
    """Runs last in this module (it kills a replica). The job runs again from its stored input on a survivor and
    gives the same artifact (digest) as the same job run without a kill; every stored persona stays complete."""
    urls = [url for _, url in cluster]
    key = new_key(urls[0], "trainer")
    assert put(urls[0], key, "kept", persona_bytes(smollm2, 30)).status_code == 201
    body = {"examples": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
            "intervention": SMALL_INTERVENTION, "hyperparameters": {"epochs": KILLED_EPOCHS, "batch_size": 1}}
    job = httpx.post(f"{urls[0]}/v1/trainings", headers=auth(key), json={"name": "trained", **body})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    victim, victim_url = running_on(cluster, urls[0], key, job_id)
    victim.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    victim.wait(10)  # type: ignore[attr-defined]
    survivors = [url for url in urls if url != victim_url]
    within(120, lambda: job_status(survivors[0], key, job_id)["status"] in ("succeeded", "failed"))
    done = job_status(survivors[1], key, job_id)
    assert (done["status"], done["attempts"], done["result_version"]) == ("succeeded", 2, 1), done
    assert len(done["losses"]) == 2 * KILLED_EPOCHS and done["progress"]["step"] == 2 * KILLED_EPOCHS
    reference = httpx.post(f"{survivors[1]}/v1/trainings", headers=auth(key), json={"name": "reference", **body})
    assert reference.status_code == 202, reference.text
    within(120, lambda: job_status(survivors[0], key, reference.json()["id"])["status"] in ("succeeded", "failed"))
    for url in survivors:
        trained = httpx.get(f"{url}/v1/interventions/trained", headers=auth(key)).json()
        assert trained["digest"] == httpx.get(f"{url}/v1/interventions/reference", headers=auth(key)).json()["digest"]
        assert trained["training"]["job_id"] == job_id
        assert httpx.get(f"{url}/v1/interventions/trained/artifact", headers=auth(key)).status_code == 200
        assert reply(url, key, "trained") and reply(url, key, "kept")
        versions = httpx.get(f"{url}/v1/interventions/trained/versions", headers=auth(key)).json()["data"]
        assert [(v["version"], v["training_job"]) for v in versions] == [(1, job_id)]  # registered once

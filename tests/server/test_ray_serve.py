"""`reft-serve serve --ray` on a local Ray cluster: 2 engine replicas of the embedded SmolLM2 on half a CPU each,
on a PostgreSQL store (the shared-state backend a Ray cluster across machines needs).

One cluster per test session (this module is the only one that starts one; it takes ~40-60 s here): the tests run
in file order and the last one stops it and checks nothing is left. The reference is the single-process server
(engine on a thread) on the same model object and the same database, so both serve the very same artifacts; it is
also the "other writer" whose changes must reach the Ray replicas. Everything runs on SmolLM2, not the tiny random
model: with one cluster per session a second, tiny cluster would cost another cluster start, more than SmolLM2's
slower steps cost the routing test; max_tokens stays small. Each replica holds max_running 2 + max_waiting 2 = 4
requests (Ray's max_ongoing_requests), the ingress 8. The PostgreSQL store is also what training on Ray needs:
the engine replicas claim the jobs from it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from reft_core.base_model import BaseModel
from reft_core.config import InterventionConfig
from server.app import create_app
from tests.builders import random_intervention, sse_events
from tests.server.conftest import artifact_bytes, make_settings
from tests.server.process import ROOT, process_tree
from tests.shared_services import ScratchDatabase

pytestmark = pytest.mark.ray

CONFIGS = (  # mixed placements, ranks and positions across the 16 personas (SmolLM2 has 30 layers)
    InterventionConfig(layers=(4, 12), rank=4, positions="f1+l1"),
    InterventionConfig(layers=(8,), rank=2, positions="l1"),
    InterventionConfig(layers=(6, 14, 22), rank=8, positions="f3+l3"),
    InterventionConfig(layers=(18,), rank=1, positions="f1"),
)
CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0}
TOKENS = 12  # greedy comparisons: enough to tell personas apart, cheap on two half-CPU replicas


def persona_bytes(base: BaseModel, seed: int, config: InterventionConfig = CONFIGS[0]) -> bytes:
    """A random SmolLM2 persona: strong enough to change a greedy answer, weak enough to keep it fluent."""
    return artifact_bytes(base, random_intervention(config, seed=seed, hidden=base.hidden_size, scale=0.1))


@dataclass
class RayServer:
    process: subprocess.Popen
    url: str
    ray_dir: Path
    model_id: str = ""  # the base model's id (from /ready)

    def chat(self, model: str, max_tokens: int = TOKENS, **fields) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json={"model": model, "max_tokens": max_tokens,
                                                                   **CHAT, **fields}, timeout=120)

    def replica_counters(self) -> dict[str, dict[str, float]]:
        """metric name -> {replica id: value} for the per-replica series on the ingress's /metrics."""
        found: dict[str, dict[str, float]] = {"reft_ray_replica_requests_total": {},
                                              "reft_ray_replica_intervention_loads": {}}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("reft_ray_replica_") and "{" in line:
                name, rest = line.split("{", 1)
                replica = rest.split('replica="', 1)[1].split('"', 1)[0]
                found.setdefault(name, {})[replica] = float(line.rsplit(" ", 1)[1])
        return found

    def healthy_replicas(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("reft_ray_healthy_engine_replicas "))

    def engine_pids(self) -> list[int]:
        return [pid for pid in process_tree(self.process.pid) if _is_engine_replica(pid)]


def _is_engine_replica(pid: int) -> bool:
    try:
        return "ServeReplica:reft-serve:engine" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def ray_store(postgres: ScratchDatabase) -> Iterator[str]:
    """The Ray server's store: a fresh schema of the session's PostgreSQL database (shared by the ingress, the
    engine replicas and the reference server)."""
    store = postgres.new_schema()
    yield store
    postgres.close_connections(store)


@pytest.fixture(scope="module")
def ray_server(smollm2: BaseModel, ray_store: str, tmp_path_factory) -> Iterator[RayServer]:
    # (`smollm2` first: the GGUF conversion into the model cache happens once, before the replicas load it)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir = tmp_path_factory.mktemp("ray-data")
    ray_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 bytes
    command = [sys.executable, "-m", "server.cli", "--log-level", "warning", "serve", "--ray", "--replicas", "2",
               "--replica-cpus", "0.5", "--store", ray_store, "--data-dir", str(data_dir),
               "--port", str(port), "--set", "max_running=2", "--set", "max_waiting_requests=2",
               "--set", "max_tokens_limit=256", "--set", "default_max_tokens=16"]
    env = os.environ | {"RAY_TMPDIR": str(ray_dir)}
    env.pop("RAY_ADDRESS", None)  # always a cluster of our own
    log_path = data_dir / "ray-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                   start_new_session=True)  # its own group: cleanup can reach every Ray process
    server = RayServer(process, f"http://127.0.0.1:{port}", ray_dir)
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.time() < deadline, "the Ray server did not become ready"
            try:
                ready = httpx.get(f"{server.url}/ready", timeout=2)
                if ready.status_code == 200:
                    server.model_id = ready.json()["model"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(smollm2: BaseModel, ray_store: str, tmp_path_factory) -> Iterator[TestClient]:
    """The single-process server (engine on a thread) on the same model and the same database as the Ray server."""
    settings = make_settings(tmp_path_factory.mktemp("reference"), max_tokens_limit=256, store=ray_store)
    with TestClient(create_app(settings, base_model=smollm2)) as client:
        worker = client.app.state.services.training.worker  # type: ignore[attr-defined]
        assert worker is not None
        worker.close()  # it claims no training job from the shared queue: those are for the Ray replicas under test
        yield client


def _upload_ray(server: RayServer, name: str, payload: bytes, **fields: str) -> dict:
    response = httpx.post(f"{server.url}/v1/interventions", data={"name": name, **fields},
                          files={"file": (f"{name}.safetensors", payload)}, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()


def _content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _reference_chat(reference: TestClient, model: str, max_tokens: int = TOKENS) -> str:
    return _content(reference.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, **CHAT}))


def test_greedy_outputs_match_the_single_process_server(ray_server: RayServer, smollm2: BaseModel,
                                                        reference: TestClient) -> None:
    names = [f"mix-{i}" for i in range(16)]
    for i, name in enumerate(names):
        _upload_ray(ray_server, name, persona_bytes(smollm2, 100 + i, CONFIGS[i % len(CONFIGS)]))
    models = names + [smollm2.model_id, "mix-0+mix-1", "mix-2+mix-5+mix-7"]  # compositions load every part
    with ThreadPoolExecutor(8) as pool:  # the ingress holds 8: 2 replicas x (2 running + 2 waiting)
        served = list(pool.map(lambda model: _content(ray_server.chat(model)), models))
    expected = [_reference_chat(reference, model) for model in models]  # same database: the very same artifacts
    assert served == expected
    assert len(set(served)) > 8  # the personas really change the output (not 19 copies of the base model's)
    counters = ray_server.replica_counters()["reft_ray_replica_requests_total"]
    assert len(counters) == 2 and sum(counters.values()) >= len(models)  # both replicas served some


def test_a_persona_uploaded_through_the_ingress_is_servable_at_once(ray_server: RayServer, smollm2: BaseModel,
                                                                    reference: TestClient) -> None:
    for version, seed in ((1, 7), (2, 8)):  # a new name, then a new version of it (replace), each used at once
        record = _upload_ray(ray_server, "fresh", persona_bytes(smollm2, seed),
                             **({"replace": "true"} if version == 2 else {}))
        assert record["version"] == version
        assert _content(ray_server.chat("fresh")) == _reference_chat(reference, f"fresh@{version}")


def _wait_for(condition, what: str, timeout: float = 10.0) -> float:
    """Seconds until `condition()` held (polled); fails after `timeout`."""
    started = time.time()
    while not condition():
        assert time.time() - started < timeout, what
        time.sleep(0.05)
    return time.time() - started


def test_changes_by_another_writer_on_the_shared_store_reach_the_ray_replicas(
    ray_server: RayServer, smollm2: BaseModel, reference: TestClient
) -> None:
    """The reference server is a second writer on the Ray server's database: its replace, promote and delete reach
    the ingress's registry as change notifications, and the engine replicas load the new digest from the store."""
    _upload_ray(ray_server, "shared", persona_bytes(smollm2, 300))
    first = _content(ray_server.chat("shared"))
    assert first == _reference_chat(reference, "shared")

    loads = sum(ray_server.replica_counters()["reft_ray_replica_intervention_loads"].values())
    replaced = reference.put("/v1/interventions/shared", files={"file": ("s.safetensors",
                                                                         persona_bytes(smollm2, 301))})
    assert replaced.status_code == 200 and replaced.json()["version"] == 2, replaced.text
    second = _reference_chat(reference, "shared")
    assert second != first
    _wait_for(lambda: _content(ray_server.chat("shared")) == second, "the Ray server kept serving version 1")
    assert sum(ray_server.replica_counters()["reft_ray_replica_intervention_loads"].values()) > loads  # new digest
    assert _content(ray_server.chat("shared@1")) == first  # a pinned version stays what it was

    assert reference.post("/v1/interventions/shared/versions/1/promote").status_code == 200
    _wait_for(lambda: _content(ray_server.chat("shared")) == first, "the promotion did not reach the Ray server")

    assert reference.delete("/v1/interventions/shared").status_code in (200, 204)
    _wait_for(lambda: ray_server.chat("shared").status_code == 404, "the deletion did not reach the Ray server")
    gone = ray_server.chat("shared")
    assert gone.json()["error"]["code"] == "model_not_found"


def test_requests_for_a_persona_stay_on_the_replica_that_loaded_it_until_it_is_full(
    ray_server: RayServer, smollm2: BaseModel
) -> None:
    _upload_ray(ray_server, "hot", persona_bytes(smollm2, 42))
    before = ray_server.replica_counters()
    first = _content(ray_server.chat("hot"))
    after = ray_server.replica_counters()
    loaded = {r for r, v in after["reft_ray_replica_intervention_loads"].items()
              if v > before["reft_ray_replica_intervention_loads"].get(r, 0)}
    assert len(loaded) == 1  # exactly one replica read it from the store
    [home] = loaded
    time.sleep(2)  # Ray pushes a replica's loaded ids to the router asynchronously
    requests = dict(after["reft_ray_replica_requests_total"])
    for _ in range(6):  # one at a time: the home replica is never full
        assert _content(ray_server.chat("hot")) == first
    sequential = ray_server.replica_counters()
    served = {r: v - requests.get(r, 0) for r, v in sequential["reft_ray_replica_requests_total"].items()}
    assert served.get(home) == 6 and sum(served.values()) == 6
    assert sequential["reft_ray_replica_intervention_loads"] == after["reft_ray_replica_intervention_loads"]

    # 8 at once, long enough to overlap: the home replica holds 4, the rest spill over to the other one
    with ThreadPoolExecutor(8) as pool:
        long = list(pool.map(lambda _: _content(ray_server.chat("hot", max_tokens=24, ignore_eos=True)), range(8)))
    assert len(set(long)) == 1 and long[0].startswith(first)
    burst = ray_server.replica_counters()
    served = {r: v - sequential["reft_ray_replica_requests_total"].get(r, 0)
              for r, v in burst["reft_ray_replica_requests_total"].items()}
    others = sum(v for r, v in served.items() if r != home)
    # (how many the home replica takes first is Ray's best effort: its queue probes race the burst under load)
    assert sum(served.values()) == 8 and others >= 1, served


def _stream(server: RayServer, started: list[int], index: int) -> tuple[str, list[dict]]:
    """One streamed chat; returns how it ended ("done" or the error code) and its chunks."""
    body = {"model": server.model_id, "max_tokens": 48, "ignore_eos": True, "stream": True, **CHAT}
    chunks: list[dict] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                break
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                if "error" in chunk:
                    return chunk["error"]["code"], chunks
                if chunk["choices"][0]["delta"].get("content"):
                    started[index] = 1
    return "done", chunks


def test_killing_engine_replicas_fails_only_their_requests_and_ray_restarts_them(ray_server: RayServer) -> None:
    victims = ray_server.engine_pids()
    assert len(victims) == 2
    started = [0] * 8
    with ThreadPoolExecutor(8) as pool:  # 8 streams: 4 per replica (each replica's max_ongoing_requests)
        futures = [pool.submit(_stream, ray_server, started, i) for i in range(8)]
        deadline = time.time() + 60
        while sum(started) < 2:  # both replicas' running rows are streaming
            assert time.time() < deadline, [f.result() for f in futures if f.done()]
            time.sleep(0.01)
        os.kill(victims[0], signal.SIGKILL)
        outcomes = [f.result() for f in futures]
    ends = [end for end, _ in outcomes]
    assert set(ends) <= {"done", "engine_unavailable"}, ends
    assert 1 <= ends.count("engine_unavailable") <= 4 and ends.count("done") >= 4, ends
    for end, chunks in outcomes:
        if end == "engine_unavailable":
            assert "engine replica" in chunks[-1]["error"]["message"]
        else:  # untouched: every token arrived
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # then the other one too: /ready is 503 until Ray has restarted one; the ingress itself stays up (/health 200)
    killed = ray_server.engine_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # Ray notices the deaths on its own schedule (seconds on a quiet machine, longer on a loaded one) and may have
    # restarted a replica by the time /ready is polled: wait for a 503, or for no killed replica left running
    deadline = time.time() + 90
    while (ready := httpx.get(f"{ray_server.url}/ready", timeout=5)).status_code == 200:
        fresh = set(ray_server.engine_pids()) - set(killed)  # replicas Ray started after the kill
        if fresh and ray_server.healthy_replicas() >= 1:  # one is back already: nothing left to observe
            break
        assert time.time() < deadline, "/ready stayed 200 while no engine replica ran"
        time.sleep(0.2)
    if ready.status_code != 200:
        assert ready.status_code == 503 and ready.json()["reason"] == "no generation engine is running"
    assert httpx.get(f"{ray_server.url}/health", timeout=5).status_code == 200
    deadline = time.time() + 120
    while ray_server.healthy_replicas() < 2 or len(ray_server.engine_pids()) < 2:
        assert time.time() < deadline, "Ray did not restart the killed replicas"
        time.sleep(0.5)
    assert not set(victims) & set(ray_server.engine_pids())
    assert httpx.get(f"{ray_server.url}/ready", timeout=5).status_code == 200
    with ThreadPoolExecutor(8) as pool:  # traffic continues on both replicas
        assert all(r.status_code == 200 for r in pool.map(lambda _: ray_server.chat(ray_server.model_id), range(8)))


def test_engine_replica_health_check_fails_once_its_engine_died() -> None:
    """What Ray's periodic `check_health` sees (Ray replaces a replica whose check raises)."""
    from server.engine.engine import Engine
    from server.ray_serve import EngineReplica
    from tests import tiny

    replica = EngineReplica.__new__(EngineReplica)  # the constructor needs a replica context; the check does not
    replica._engine = Engine(tiny.tiny_llama(), tiny.tiny_tokenizer())
    replica._engine.start()
    replica.check_health()
    replica._engine.stop()
    with pytest.raises(RuntimeError, match="the engine stopped"):
        replica.check_health()


def test_a_persona_trains_through_the_ingress_on_an_engine_replica(ray_server: RayServer) -> None:
    """With a PostgreSQL store the ingress queues the job and an engine replica claims and runs it; its events
    stream through the ingress (from the stored record) and the result is servable at once."""
    created = httpx.post(f"{ray_server.url}/v1/trainings", timeout=30, json={
        "name": "ray-trained", "examples": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
        "intervention": {"layers": [1], "rank": 2}, "hyperparameters": {"epochs": 5, "batch_size": 1},
        "eval_prompts": ["a"]})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    with httpx.stream("GET", f"{ray_server.url}/v1/trainings/{job_id}/events", headers={"Last-Event-ID": "0"},
                      timeout=120) as response:
        events = [e for e in sse_events(response.iter_lines(), until=lambda e: (e.get("data") or {}).get("status")
                                        in ("succeeded", "failed", "cancelled")) if "id" in e]
    job = httpx.get(f"{ray_server.url}/v1/trainings/{job_id}", timeout=30).json()
    assert job["status"] == "succeeded", job
    assert job["replica"] and job["attempts"] == 1 and job["result_version"] == 1
    assert [e["data"]["step"] for e in events if e["data"]["type"] == "step"] == list(range(1, 11))
    assert events[-1]["data"]["status"] == "succeeded" and job["evaluation"]["samples"][0]["prompt"] == "a"
    answer = ray_server.chat("ray-trained", max_tokens=4)
    assert answer.status_code == 200, answer.text
    versions = httpx.get(f"{ray_server.url}/v1/interventions/ray-trained/versions", timeout=30).json()["data"]
    assert [(v["version"], v["training_job"]) for v in versions] == [(1, job_id)]


def test_training_on_ray_needs_a_postgresql_store(tmp_path) -> None:
    from server.ray_serve import training_unavailable

    assert "PostgreSQL store" in (training_unavailable(make_settings(tmp_path, store=f"sqlite://{tmp_path}")) or "")
    assert training_unavailable(make_settings(tmp_path, store="postgresql://db.internal/reft")) is None


def test_stopping_leaves_no_ray_process_behind(ray_server: RayServer) -> None:
    """Runs last: SIGTERM to the command stops the application and the local cluster it started."""
    tree = {pid: psutil.Process(pid).create_time() for pid in process_tree(ray_server.process.pid)}
    assert len(tree) > 5  # the command, GCS, raylet, controller, proxy, ingress and engine replicas
    # each engine replica runs its engine in a process of its own (spawned), as `reft-serve serve` does
    engines = [pid for pid in tree if "multiprocessing.spawn" in " ".join(psutil.Process(pid).cmdline())]
    assert len(engines) >= 2, [psutil.Process(pid).cmdline() for pid in tree]
    ray_server.process.send_signal(signal.SIGTERM)
    assert ray_server.process.wait(90) == 0
    deadline = time.time() + 30
    while alive := [pid for pid, created in tree.items() if _alive(pid, created)]:
        assert time.time() < deadline, [psutil.Process(pid).cmdline() for pid in alive]
        time.sleep(0.5)


def _alive(pid: int, created: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _serve_configs() -> list[dict]:
    """The Serve config file and the KubeRay example's serveConfigV2 in docs/ray.md."""
    import yaml

    configs = [yaml.safe_load((ROOT / "docker" / "ray-serve.yaml").read_text())]
    doc = (ROOT / "docs" / "ray.md").read_text()
    ray_service = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    configs.append(yaml.safe_load(ray_service["spec"]["serveConfigV2"]))
    return configs


@pytest.mark.parametrize("config", _serve_configs(), ids=["serve-config", "kuberay-example"])
def test_the_documented_serve_configs_build(config: dict, monkeypatch) -> None:
    from importlib import import_module

    monkeypatch.setenv("REFT_SERVE_ADMIN_KEY", "sk-admin-from-env")
    [app_config] = config["applications"]
    module, _, name = app_config["import_path"].partition(":")
    builder = getattr(import_module(module), name)
    app = builder(app_config["args"])
    settings, engine, options = app._bound_deployment.init_args  # Ingress(settings, engine handle, options)
    assert options.replicas == app_config["args"]["replicas"]
    assert options.replica_gpus == app_config["args"].get("replica_gpus", 0)
    assert str(settings.data_dir) == app_config["args"]["data_dir"] and settings.auth == "on"
    assert settings.admin_key.get_secret_value() == "sk-admin-from-env"
    engine_config = engine._bound_deployment._deployment_config
    assert engine_config.num_replicas == options.replicas
    assert engine_config.max_ongoing_requests == settings.max_running + settings.max_waiting_requests


class _FakeStream:
    """Stands in for Ray's DeploymentResponseGenerator: yields `items`, then raises `error` if given."""

    def __init__(self, items: list, error: Exception | None) -> None:
        self.items, self.error, self.cancelled = items, error, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for item in self.items:
            yield item
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class _FakeHandle:
    def __init__(self, items: list, error: Exception | None = None) -> None:
        self.items, self.error, self.calls = items, error, []
        self.generate = self

    def options(self, **options):
        self.calls.append(options)
        return self

    def remote(self, request):
        self.calls.append(request)
        return _FakeStream(self.items, self.error)


def _pump(handle: _FakeHandle, request, reads: list[float] | None = None, running: int = 2,
          then: float = 0.0) -> list:
    """Run one request through a RayEngine on `handle`; return the events its sink got. The engine's reads of the
    running replicas' count (`running` each time) are timed into `reads`, for `then` seconds after the request."""
    import asyncio

    from server.engine.remote import ModelInfo
    from server.metrics import Metrics
    from server.ray_serve import RayEngine

    reads = [] if reads is None else reads

    def running_replicas() -> int:
        reads.append(time.monotonic())
        return running

    info = ModelInfo(None, None, 256, "cpu", "float32")  # type: ignore[arg-type]
    engine = RayEngine(handle, info, Metrics(), 2, running_replicas)  # type: ignore[arg-type]
    events: list = []

    async def run() -> None:
        engine.submit(request, events.append)
        while not events or events[-1].finish_reason is None:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(asyncio.wait_for(run(), 5))
        time.sleep(then)
    finally:
        engine.stop()
    return events


def test_a_failed_replica_call_makes_the_ingress_read_the_replicas_status_at_once() -> None:
    """The ingress polls Ray's status every HEALTH_POLL_S (5 s: the poll costs CPU), but a replica that just failed
    a request is read at once, and a reading of no replica running is re-read every second (/ready follows)."""
    from ray.exceptions import ActorDiedError

    from server.engine.types import FinishReason, GenerationEvent, GenerationRequest, SamplingParams
    from server.ray_serve import HEALTH_POLL_DOWN_S, HEALTH_POLL_S

    assert HEALTH_POLL_S >= 3 * HEALTH_POLL_DOWN_S
    request = GenerationRequest("r1", (1, 2), SamplingParams(max_tokens=2))
    reads: list[float] = []
    started = time.monotonic()
    _pump(_FakeHandle([("replica-1", 0)], ActorDiedError()), request, reads, running=0,
          then=HEALTH_POLL_DOWN_S * 1.4)
    assert reads and reads[0] - started < HEALTH_POLL_DOWN_S  # at once, not after HEALTH_POLL_S
    assert len(reads) >= 2 and reads[1] - reads[0] < HEALTH_POLL_DOWN_S * 1.5  # then every second

    reads.clear()
    final = GenerationEvent(text="b", token_ids=(6,), finish_reason=FinishReason.LENGTH)
    _pump(_FakeHandle([("replica-1", 0), [final]]), request, reads, then=HEALTH_POLL_DOWN_S * 1.2)
    assert reads == []  # a healthy request triggers no reading


@pytest.mark.parametrize("failure", ["none", "replica_died", "backpressure"])
def test_ray_engine_streams_by_digest_and_turns_replica_failures_into_request_errors(failure: str) -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from server.engine.types import (
        ComposedRef, FinishReason, GenerationEvent, GenerationRequest, InterventionRef, SamplingParams,
    )
    from server.generation import error_for

    token = GenerationEvent(text="a", token_ids=(5,))
    final = GenerationEvent(text="b", token_ids=(6,), finish_reason=FinishReason.LENGTH)
    items: list = [("replica-1", 3), [token]]
    error = {"none": None, "replica_died": ActorDiedError(), "backpressure": BackPressureError(
        num_queued_requests=9, max_queued_requests=8)}[failure]
    if failure == "none":
        items.append([final])
    elif failure == "backpressure":
        items = []
    handle = _FakeHandle(items, error)
    request = GenerationRequest("r1", (1, 2), SamplingParams(max_tokens=2),
                                InterventionRef("p", "sha256:abc", intervention=object()))
    events = _pump(handle, request)
    options, sent = handle.calls
    assert options == {"stream": True, "multiplexed_model_id": "sha256:abc"}
    assert sent.intervention.key == "sha256:abc" and sent.intervention.intervention is None  # only the digest
    composed = GenerationRequest("r2", (1, 2), SamplingParams(max_tokens=2), ComposedRef(
        (InterventionRef("a", "sha256:a", object()), InterventionRef("b", "sha256:b", object()))))
    handle.calls.clear()
    _pump(handle, composed)
    options, sent = handle.calls
    assert options == {"stream": True, "multiplexed_model_id": "sha256:a"}  # routed by its first part
    assert [(p.key, p.intervention) for p in sent.parts] == [("sha256:a", None), ("sha256:b", None)]
    if failure == "none":
        assert events == [token, final]
        return
    assert events[:-1] == ([token] if failure == "replica_died" else [])
    error_event = events[-1]
    assert error_event.finish_reason is FinishReason.ERROR
    api_error = error_for(error_event)
    if failure == "replica_died":
        assert (api_error.status, api_error.code) == (503, "engine_unavailable")
        assert "engine replica" in api_error.message
    else:
        assert (api_error.status, api_error.code, api_error.headers) == (429, "server_busy", {"Retry-After": "1"})

"""Engine faults seen from outside: a request with degenerate sampling settings cannot stop the engine (through a
real server process), and if the engine does die, probes and callers learn it at once instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine import engine as engine_module

from .conftest import MODEL_ID, make_settings
from .process import server_process

HOSTILE_SAMPLING = [
    {"temperature": 1e-300}, {"temperature": 5e-324, "top_p": 1e-300}, {"temperature": 2.0, "top_p": 5e-324},
    {"temperature": 1e-300, "top_k": 1, "seed": 3}, {"temperature": 1e-40, "min_tokens": 4, "seed": 2**63 - 1},
]


def test_hostile_sampling_settings_never_stop_the_engine(tiny_model_dir, tmp_path) -> None:
    with server_process(tiny_model_dir, tmp_path / "data") as (_process, url):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        for extra in HOSTILE_SAMPLING:
            for stream in (False, True):
                body = {"model": model, "prompt": "Hi", "max_tokens": 4, "stream": stream} | extra
                response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
                assert response.status_code == 200, (extra, response.text)
        # and the engine still serves everybody else
        after = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4},
                           timeout=30)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200


def test_a_dead_engine_turns_health_503_and_requests_fail_at_once(tmp_path, tiny_base, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_CONSECUTIVE_STEP_FAILURES", 2)
    with TestClient(create_app(make_settings(tmp_path), base_model=tiny_base)) as client:
        engine = client.app.state.services.engine
        monkeypatch.setattr(engine.scheduler, "admit", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
        started = time.perf_counter()
        first = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 4})
        assert first.status_code == 503 and first.json()["error"]["code"] == "engine_unavailable"
        assert "device lost" in first.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "device lost" in health.json()["reason"]
        assert client.get("/ready").status_code == 503
        for stream in (False, True):
            later = client.post("/v1/chat/completions", json={
                "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream,
            })
            assert later.status_code == 503 and later.json()["error"]["code"] == "engine_unavailable"
        assert time.perf_counter() - started < 10  # nobody waited for the request timeout


def _engine_child(server_pid: int) -> int:
    """The engine process of a `reft-serve serve` process (its spawned child that is not the resource tracker)."""
    # children are listed per thread, and the engine is started from the model-loading thread
    children = [c for task in Path(f"/proc/{server_pid}/task").iterdir() for c in (task / "children").read_text().split()]
    for pid in map(int, children):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in command:
            return pid
    raise AssertionError(f"no engine process among {children}")


def test_a_killed_engine_process_turns_health_503_and_requests_fail_at_once(tiny_model_dir, tmp_path) -> None:
    with server_process(tiny_model_dir, tmp_path / "data") as (process, url):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hi", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        os.kill(_engine_child(process.pid), signal.SIGKILL)
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "exit code" in health.json()["reason"]
        started = time.perf_counter()
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert time.perf_counter() - started < 5
        assert process.poll() is None  # the API process stays up to answer probes; the orchestrator restarts it

"""A real `reft-serve` process on loopback (tiny model), killed with SIGKILL in the middle of uploads, replaces and
a training job, then restarted: everything acknowledged is there, nothing half-written is visible, interrupted
jobs say why. And SIGTERM drains: a running stream finishes before the process exits."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import pytest

from reft_core.artifact import encode_artifact
from reft_core.fingerprint import fingerprint_model
from tests import tiny

from .conftest import persona
from .process import server_process

FINGERPRINT = fingerprint_model(tiny.tiny_llama())  # the served model is tiny_llama() saved and loaded again


def artifact(seed: int) -> tuple[bytes, str]:
    payload, encoded = encode_artifact(persona(seed), FINGERPRINT)
    return payload, encoded.digest


class Writer:
    """Uploads and replaces in a loop; records, per name, the digest last acknowledged and those attempted since."""

    def __init__(self, url: str, seed: int) -> None:
        self.url, self.rng = url, random.Random(seed)
        self.acknowledged: dict[str, str] = {}
        self.attempted: dict[str, set[str]] = {}
        self.refused: list[str] = []  # any non-2xx answer: there should be none
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                name = f"p{self.rng.randrange(6)}"
                payload, digest = artifact(self.rng.randrange(10_000))
                replace = name in self.acknowledged
                self.attempted.setdefault(name, set()).add(digest)
                try:
                    files = {"file": ("a.safetensors", payload)}
                    if replace:
                        response = client.put(f"{self.url}/v1/interventions/{name}", files=files)
                    else:
                        response = client.post(f"{self.url}/v1/interventions", data={"name": name}, files=files)
                except httpx.HTTPError:
                    return  # the server was killed
                if response.status_code in (200, 201):
                    self.acknowledged[name] = response.json()["digest"]
                    self.attempted[name] = set()
                    self.writes += 1
                else:
                    self.refused.append(response.text)


def test_sigkill_mid_write_and_mid_training_loses_nothing_acknowledged(tiny_model_dir, tmp_path) -> None:
    data_dir = tmp_path / "data"
    acknowledged: dict[str, str] = {}
    in_flight: dict[str, set[str]] = {}
    jobs: list[str] = []
    for round_number in range(3):
        with server_process(tiny_model_dir, data_dir) as (process, url):
            # A write in flight at the last kill may have committed without its answer reaching the writer: what
            # the restarted server lists (checked consistent) is what this round's writer starts from.
            acknowledged = check_consistent(url, acknowledged, in_flight, jobs)
            job = httpx.post(f"{url}/v1/trainings", json={
                "name": f"trained{round_number}", "examples": [{"prompt": "a", "completion": "b"}] * 2,
                "intervention": {"layers": [1], "rank": 2}, "hyperparameters": {"epochs": 1000, "batch_size": 1},
            })
            assert job.status_code == 202
            jobs.append(job.json()["id"])
            writer = Writer(url, seed=round_number)
            writer.acknowledged = dict(acknowledged)
            writer.thread.start()
            time.sleep(0.5 + round_number * 0.4)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            writer.stop.set()
            writer.thread.join(15)
            assert writer.writes > 0 and writer.refused == []
            acknowledged, in_flight = writer.acknowledged, writer.attempted
    with server_process(tiny_model_dir, data_dir) as (_, url):
        check_consistent(url, acknowledged, in_flight, jobs)


def check_consistent(
    url: str, acknowledged: dict[str, str], in_flight: dict[str, set[str]], jobs: list[str]
) -> dict[str, str]:
    """Asserts the restarted server kept every acknowledged write and shows nothing half-written; returns the
    uploaded names' digests as listed."""
    listed = {r["id"]: r for r in httpx.get(f"{url}/v1/interventions").json()["data"]}
    for name, digest in acknowledged.items():
        assert name in listed, f"acknowledged {name} was lost"
        # the last acknowledged version, or a replace that committed just before the kill
        assert listed[name]["digest"] in {digest} | in_flight.get(name, set())
    for name, record in listed.items():
        assert name in acknowledged or record["digest"] in in_flight.get(name, set()) or name.startswith("trained")
        assert httpx.get(f"{url}/v1/interventions/{name}/artifact").status_code == 200  # nothing half-written
        reply = httpx.post(f"{url}/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, timeout=30)
        assert reply.status_code == 200, reply.text
    for job_id in jobs:
        job = httpx.get(f"{url}/v1/trainings/{job_id}").json()
        assert job["status"] == "failed" and "restarted" in job["error"], job
    return {name: record["digest"] for name, record in listed.items() if not name.startswith("trained")}


def test_sigterm_lets_a_running_stream_finish_then_exits(tiny_model_dir, tmp_path) -> None:
    with server_process(tiny_model_dir, tmp_path / "data", "--drain-timeout", "20") as (process, url):
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "min_tokens": 200, "ignore_eos": True,
                "stream": True}
        body["model"] = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        chunks: list[dict] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 1:
                    process.send_signal(signal.SIGTERM)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0
        assert process.wait(30) is not None  # it exits once drained
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)


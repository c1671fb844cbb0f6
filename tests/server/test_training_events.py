"""Training events over SSE: numbered deltas, resume with Last-Event-ID, keep-alive comments, the same log live and
rebuilt from the record."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.builders import sse_events

from .conftest import make_settings
from .test_trainings import EXAMPLES, SMALL, wait_for

FINAL = ("succeeded", "failed", "cancelled")


def final(event: dict) -> bool:
    data = event.get("data") or {}
    return data.get("type") == "status" and data.get("status") in FINAL


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("events"), training_events_keepalive_s=0.1,
                             training_eval_max_tokens=4)
    with TestClient(create_app(settings, base_model=tiny_base)) as test_client:
        yield test_client


def stream(client: TestClient, job_id: str, last_event_id: int | None = None, *, limit: int | None = None) -> list[dict]:
    """The stream's events (comments left out) until the job's final status, or the first `limit` events."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    seen = 0

    def stop(event: dict) -> bool:
        nonlocal seen
        seen += 1
        return final(event) or (limit is not None and seen >= limit)

    with client.stream("GET", f"/v1/trainings/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
        return [e for e in sse_events(response.iter_lines(), until=stop) if "comment" not in e]


@pytest.fixture(scope="module")
def job(client) -> dict:
    """A validated epochs="auto" job, watched from its first event while it runs (Last-Event-ID: 0 replays all).
    Its validation examples want another answer, so the validation loss rises at once and the rule stops early."""
    diverging = [{"prompt": e["prompt"], "completion": "no way"} for e in EXAMPLES[:2]]
    body = {"name": "watched", "examples": EXAMPLES, "validation_examples": diverging, **SMALL,
            "hyperparameters": {"epochs": "auto", "batch_size": 2, "learning_rate": 0.5}}
    created = client.post("/v1/trainings", json=body)
    assert created.status_code == 202, created.text
    live = stream(client, created.json()["id"], 0)
    return {"id": created.json()["id"], "live": live, "record": wait_for(client, created.json()["id"], FINAL)}


def test_events_are_numbered_deltas_in_order(job) -> None:
    live, record = job["live"], job["record"]
    assert [e["id"] for e in live] == list(range(1, len(live) + 1))  # no gaps, no duplicates
    kinds = [e["data"]["type"] for e in live]
    assert live[0]["data"] == {"type": "status", "status": "queued"}
    assert live[1]["data"]["status"] == "running" and live[-1]["data"]["status"] == record["status"] == "succeeded"
    steps = [e["data"] for e in live if e["data"]["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, len(record["losses"]) + 1))
    assert [s["loss"] for s in steps] == record["losses"]  # each step once, as a delta: no whole history
    epochs = [e["data"] for e in live if e["data"]["type"] == "epoch"]
    assert [e["validation_loss"] for e in epochs] == record["validation_losses"] and len(epochs) >= 2
    assert kinds.count("auto_stop") == 1 and kinds[-2] == "evaluation"
    stop = next(e["data"] for e in live if e["data"]["type"] == "auto_stop")
    assert stop["epochs_run"] == len(epochs) == record["auto_stop"]["epochs_run"] < 40 and stop["reason"] == "plateau"


def test_an_ended_jobs_log_is_rebuilt_from_its_record_with_the_same_ids(client, job) -> None:
    assert stream(client, job["id"], 0) == job["live"]


def test_last_event_id_resumes_with_exactly_the_events_after_it(client, job) -> None:
    live = job["live"]
    for last in sorted({1, 2, len(live) // 2, len(live) - 1, len(live)}):
        assert stream(client, job["id"], last) == live[last:]


def test_a_new_watcher_gets_a_snapshot_then_what_follows_it(client, job) -> None:
    [snapshot] = stream(client, job["id"])  # ended: the snapshot is the whole story
    assert snapshot["data"]["type"] == "snapshot" and snapshot["id"] == len(job["live"])
    assert snapshot["data"]["job"]["status"] == "succeeded" and snapshot["data"]["job"]["evaluation"] is not None


def test_resuming_a_live_job_loses_and_repeats_nothing(client) -> None:
    body = {"name": "resumed", "examples": EXAMPLES, **SMALL, "hyperparameters": {"epochs": 3, "batch_size": 2}}
    job_id = client.post("/v1/trainings", json=body).json()["id"]
    first = stream(client, job_id, 0, limit=5)  # disconnects mid-job
    rest = stream(client, job_id, first[-1]["id"])
    assert [e["id"] for e in first + rest] == list(range(1, len(first + rest) + 1)) and final(rest[-1])
    assert first + rest == stream(client, job_id, 0)


def test_keep_alive_comments_while_nothing_happens_and_bad_resume_ids(client) -> None:
    # a job waits behind a long one: its stream is silent except for keep-alives
    body = {"name": "long", "examples": EXAMPLES, **SMALL, "hyperparameters": {"epochs": 1000, "batch_size": 1}}
    running = client.post("/v1/trainings", json=body).json()["id"]
    queued = client.post("/v1/trainings", json={**body, "name": "waiting"}).json()["id"]
    try:
        with client.stream("GET", f"/v1/trainings/{queued}/events") as response:
            lines = response.iter_lines()
            comments = sse_events(lines, until=lambda e: "comment" in e)
        assert comments[0]["data"]["type"] == "snapshot" and comments[-1] == {"comment": "keep-alive"}
        bad = client.get(f"/v1/trainings/{queued}/events", headers={"Last-Event-ID": "seven"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    finally:
        for job_id in (queued, running):
            client.delete(f"/v1/trainings/{job_id}")
            wait_for(client, job_id, FINAL)

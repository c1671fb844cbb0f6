"""Training over HTTP on the tiny model: lifecycle, cancel, failures, restart, serving while training (events:
test_training_events.py; evaluation: test_training_evaluation.py)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from adapters_store.jobs import JobRecord, open_jobs
from adapters_store.postgres.jobs import PostgresJobStore
from server.app import create_app

from .conftest import MODEL_ID, make_settings

EXAMPLES = [{"prompt": f"question {i}", "completion": "yes!"} for i in range(4)]
SMALL = {"intervention": {"layers": [1], "rank": 2, "positions": "l1"}, "hyperparameters": {"epochs": 3, "batch_size": 2}}


def wait_for(client: TestClient, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/trainings/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job stayed {job['status']}")


def test_job_runs_to_a_servable_intervention(client) -> None:
    created = client.post("/v1/trainings", json={"name": "yes-bot", "examples": EXAMPLES, **SMALL})
    assert created.status_code == 202 and created.json()["status"] == "queued"
    job = wait_for(client, created.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 6 and len(job["losses"]) == 6
    assert job["result_version"] == 1 and job["started_at"] and job["finished_at"]
    record = client.get("/v1/interventions/yes-bot").json()
    assert record["source"] == "training" and record["training"]["steps"] == 6
    reply = client.post("/v1/chat/completions", json={"model": "yes-bot", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4})
    assert reply.status_code == 200
    refused = client.post("/v1/trainings", json={"name": "yes-bot", "examples": EXAMPLES, **SMALL})
    assert refused.status_code == 409 and "replace=true" in refused.json()["error"]["message"]  # never silently
    again = client.post("/v1/trainings", json={"name": "yes-bot", "examples": EXAMPLES, **SMALL,
                                               "replace": True}).json()
    assert wait_for(client, again["id"], ("succeeded", "failed"))["result_version"] == 2  # a new version: hot swap
    ids = [created.json()["id"], again["id"]]
    assert [j["id"] for j in client.get("/v1/trainings").json()["data"]] == ids
    first = client.get("/v1/trainings", params={"limit": 1}).json()  # paged as the other lists
    assert [j["id"] for j in first["data"]] == ids[:1] and first["has_more"] and first["last_id"] == ids[0]
    rest = client.get("/v1/trainings", params={"limit": 1, "after": ids[0]}).json()
    assert [j["id"] for j in rest["data"]] == ids[1:] and not rest["has_more"]


def test_cancel_registers_nothing(client) -> None:
    body = {"name": "never", "examples": EXAMPLES, **SMALL, "hyperparameters": {"epochs": 1000, "batch_size": 1}}
    job = client.post("/v1/trainings", json=body).json()
    wait_for(client, job["id"], ("running",))
    assert client.delete(f"/v1/trainings/{job['id']}").status_code == 200
    assert wait_for(client, job["id"], ("cancelled",))["status"] == "cancelled"
    assert client.get("/v1/interventions/never").status_code == 404


def test_generation_keeps_working_during_training(client) -> None:
    body = {"name": "busy", "examples": EXAMPLES, **SMALL, "hyperparameters": {"epochs": 1000, "batch_size": 1}}
    job = client.post("/v1/trainings", json=body).json()
    wait_for(client, job["id"], ("running",))
    for _ in range(3):
        reply = client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}],
                                                          "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    assert client.get(f"/v1/trainings/{job['id']}").json()["status"] == "running"
    client.delete(f"/v1/trainings/{job['id']}")
    wait_for(client, job["id"], ("cancelled",))


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"name": "x", "examples": []}, "examples"),
        ({"name": "x", "examples": [{"prompt": "a", "completion": ""}]}, "prompt and completion"),
        ({"name": "x", "examples": [{"prompt": "a"}]}, "prompt and completion"),
        ({"name": "x", "examples": EXAMPLES, "surprise": 1}, "surprise"),
        ({"name": "../x", "examples": EXAMPLES}, "invalid intervention name"),
        ({"name": "x", "examples": EXAMPLES, "intervention": {"layers": [99]}}, "out of range"),
        ({"name": "x", "examples": EXAMPLES, "intervention": {"positions": "q7"}}, "positions"),
        ({"name": "x", "examples": EXAMPLES, "hyperparameters": {"epochs": 5000}}, "epochs is limited"),
        ({"name": "x", "examples": [{"prompt": "a" * 2000, "completion": "b"}]}, "tokens; the limit"),
    ],
)
def test_bad_jobs_are_refused_before_queueing(client, body, fragment) -> None:
    response = client.post("/v1/trainings", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert fragment in response.json()["error"]["message"]
    assert client.get("/v1/trainings").json()["data"] == []


def test_a_failing_step_fails_the_job_with_a_reason(client, monkeypatch) -> None:
    from reft_core import trainer

    def explode(self, *args):  # noqa: ANN001, ANN002
        raise RuntimeError("boom at step 1")

    monkeypatch.setattr(trainer.ReftTrainer, "_head_loss", explode)  # fails inside a slice, mid-step
    job = client.post("/v1/trainings", json={"name": "doomed", "examples": EXAMPLES, **SMALL}).json()
    failed = wait_for(client, job["id"], ("failed", "succeeded"))
    assert failed["status"] == "failed" and "boom at step 1" in failed["error"]
    assert failed["error_code"] == "training_failed"
    assert client.get("/v1/interventions/doomed").status_code == 404


def test_restart_marks_unfinished_jobs_failed_and_keeps_finished_ones(tmp_path, tiny_base) -> None:
    settings = make_settings(tmp_path)
    jobs = open_jobs(settings.state_location("jobs"))
    if isinstance(jobs, PostgresJobStore):
        jobs.lease_s = 0.0  # a replica that died: its leases have run out
    for status in ("queued", "running", "succeeded", "cancelled"):
        jobs.save(JobRecord(id=f"job-{status}", name="p", status=status, spec={}))
    jobs.close()
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        listed = {j["id"]: j for j in client.get("/v1/trainings").json()["data"]}
        assert listed["job-queued"]["status"] == listed["job-running"]["status"] == "failed"
        assert "restarted" in listed["job-running"]["error"]
        assert listed["job-queued"]["error_code"] == listed["job-running"]["error_code"] == "job_interrupted"
        assert listed["job-succeeded"]["error_code"] is None and listed["job-cancelled"]["error_code"] is None
        assert listed["job-succeeded"]["status"] == "succeeded" and listed["job-cancelled"]["status"] == "cancelled"
        assert client.get("/v1/trainings/nope").status_code == 404


def _jsonl(rows: list) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_examples_uploaded_as_jsonl_train_the_same_job_as_json(client) -> None:
    """The JSONL upload is another way to say the same request: same examples, same spec, same learned loss."""
    chat = [{"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yes!"}]}]
    rows = [*EXAMPLES, *chat]
    form = {"name": "from-file", "intervention": json.dumps(SMALL["intervention"]),
            "hyperparameters": json.dumps(SMALL["hyperparameters"])}
    uploaded = client.post("/v1/trainings/upload", data=form, files={"file": ("ex.jsonl", _jsonl([*rows[:2], "", *rows[2:]]))})
    assert uploaded.status_code == 202, uploaded.json()
    posted = client.post("/v1/trainings", json={"name": "from-json", "examples": rows, **SMALL}).json()
    by_file = wait_for(client, uploaded.json()["id"], ("succeeded", "failed"))
    by_json = wait_for(client, posted["id"], ("succeeded", "failed"))
    assert by_file["status"] == by_json["status"] == "succeeded"
    assert by_file["spec"] == by_json["spec"] and by_file["losses"] == by_json["losses"]
    assert client.get("/v1/interventions/from-file").status_code == 200


@pytest.mark.parametrize(
    "payload,form,status,fragment",
    [
        (_jsonl([EXAMPLES[0], "{not json"]), {}, 400, "line 2"),
        (_jsonl([EXAMPLES[0], {"prompt": "a", "completion": ""}]), {}, 400, "line 2"),
        (_jsonl([EXAMPLES[0], [1, 2]]), {}, 400, "line 2"),
        (b"\xff\xfe\x00bad", {}, 400, "UTF-8"),
        (b"\n\n  \n", {}, 400, "no examples"),
        (_jsonl([EXAMPLES[0]] * 1001), {}, 400, "more than 1000 examples"),
        (_jsonl(EXAMPLES), {"hyperparameters": "{epochs: 3"}, 400, "not valid JSON"),
        (_jsonl(EXAMPLES), {"hyperparameters": "[3]"}, 400, "JSON object"),
        (_jsonl(EXAMPLES), {"hyperparameters": json.dumps({"epochs": -1})}, 400, "hyperparameters.epochs"),
        (_jsonl(EXAMPLES), {"intervention": json.dumps({"layers": [99]})}, 400, "out of range"),
        (_jsonl(EXAMPLES), {"name": "../etc"}, 400, "invalid intervention name"),
    ],
)
def test_bad_jsonl_uploads_are_refused_before_queueing(client, payload, form, status, fragment) -> None:
    response = client.post("/v1/trainings/upload", data={"name": "x", **form}, files={"file": ("ex.jsonl", payload)})
    assert response.status_code == status and fragment in response.json()["error"]["message"], response.json()
    assert client.get("/v1/trainings").json()["data"] == []


def test_a_job_whose_working_memory_exceeds_the_limit_is_refused_naming_it(tmp_path, tiny_base) -> None:
    """Admission counts the job's memory before it starts: its largest micro-batch against the limit (the kept
    contexts are capped by the budget instead, and recorded with the estimate in the job's spec)."""
    long = [{"prompt": "p" * 150, "completion": "c" * 60} for _ in range(8)]
    settings = make_settings(tmp_path, max_training_working_bytes=4 << 20, training_context_budget_bytes=1 << 20)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        refused = client.post("/v1/trainings", json={"name": "big", "examples": long, **SMALL,
                                                     "hyperparameters": {"epochs": 1, "batch_size": 8}})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "training_memory_exceeded" and "max_training_working_bytes" in error["message"]
        assert error["type"] == "invalid_request_error" and client.get("/v1/trainings").json()["data"] == []
        fits = client.post("/v1/trainings", json={"name": "small", "examples": EXAMPLES, **SMALL})
        assert fits.status_code == 202, fits.text
        memory = fits.json()["spec"]["memory"]
        assert 0 < memory["kept_bytes"] <= 1 << 20 and 0 < memory["working_bytes"] <= 4 << 20
        wait_for(client, fits.json()["id"], ("succeeded", "failed"))


def test_a_million_examples_are_refused_by_their_count_before_any_is_validated(client) -> None:
    # every example is invalid: validating even one first would name it (examples.0) instead of the count
    response = client.post("/v1/trainings", json={"name": "x", "examples": [{}] * 1_000_000})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "examples", error
    assert "at most 10000" in error["message"]


def test_a_job_ended_by_a_shutdown_has_the_code_a_request_gets_for_it() -> None:
    """One vocabulary: the job record's error code comes from the table the request errors come from."""
    from server.engine.types import ErrorKind, FinishReason, GenerationEvent, TrainingEnd
    from server.generation import error_for, job_error_code

    shutdown = GenerationEvent("", (), finish_reason=FinishReason.ERROR, error="stopping",
                               error_kind=ErrorKind.SHUTDOWN)
    assert job_error_code(TrainingEnd.SHUTDOWN) == error_for(shutdown).code == "shutting_down"
    assert job_error_code(TrainingEnd.FAILED) == "training_failed"


def test_ended_jobs_leave_memory_and_read_the_same_from_the_store(client) -> None:
    """The manager keeps only the jobs it runs: once a job's end is stored it is read (and its events rebuilt)
    from the store, identically."""
    manager = client.app.state.services.training
    ended = []
    for name, extra in (("kept", {}), ("dropped", {"hyperparameters": {"epochs": 1000, "batch_size": 1}})):
        job = client.post("/v1/trainings", json={"name": name, "examples": EXAMPLES, **SMALL, **extra}).json()
        if name == "dropped":
            wait_for(client, job["id"], ("running",))
            assert job["id"] in manager._live
            client.delete(f"/v1/trainings/{job['id']}")
        ended.append(wait_for(client, job["id"], ("succeeded", "cancelled")))
    deadline = time.time() + 10
    while manager._live or manager._logs:  # the record is returned as soon as it is final; it leaves just after
        assert time.time() < deadline, list(manager._live)
        time.sleep(0.02)
    assert [j["status"] for j in ended] == ["succeeded", "cancelled"]
    for job in ended:
        assert client.get(f"/v1/trainings/{job['id']}").json() == job
    assert {j["id"] for j in client.get("/v1/trainings").json()["data"]} >= {j["id"] for j in ended}
    assert not manager._started and not manager._written

"""OpenAI's fine-tuning API driven by the official `openai` SDK, unmodified, against a real server on loopback on
the tiny model: upload a file, train, follow events, page jobs, chat with the result, cancel, bad files, tenants,
quotas, models retrieve/delete. Raw HTTP appears only to check results against the native API and the library."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from reft_core import recipe
from reft_core.artifact import decode_artifact
from server.app import create_app

from .conftest import MODEL_ID, make_settings
from .live import live_server
from .test_api import CHAT, reference

ADMIN_KEY = "ft-admin-secret"
EXAMPLES = [{"prompt": "hello there", "completion": "ok ok"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok!"}]}]
REFT = {"layers": [0, 2], "rank": 2, "positions": "f1+l1"}  # through the SDK's extra_body
SMALL = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 25}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def new_tenant(url: str, name: str, **limits: int) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(f"{url}/v1/admin/tenants", json={"name": name, "limits": limits}, headers=admin).status_code == 201
    return httpx.post(f"{url}/v1/admin/tenants/{name}/keys", headers=admin).json()["key"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base) -> Iterator[dict]:
    """A real uvicorn server on loopback around the app on the tiny model (in this process: no second start-up)."""
    settings = make_settings(tmp_path_factory.mktemp("fine-tuning"), auth="on", admin_key=ADMIN_KEY,
                             max_trainings_per_tenant=8)
    with live_server(create_app(settings, base_model=tiny_base)) as url:
        keys = {t: new_tenant(url, t) for t in ("acme", "globex", "initech", "umbrella")}
        keys["small"] = new_tenant(url, "small", max_bytes_per_tenant=80)
        yield {"url": url, "keys": keys, "base": MODEL_ID}


def sdk(server: dict, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=server["keys"][tenant], timeout=60, max_retries=0)


def finished(client: openai.OpenAI, job_id: str, timeout: float = 120):  # noqa: ANN201 - the SDK's job type
    deadline = time.time() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status not in ("validating_files", "queued", "running"):
            return job
        assert time.time() < deadline, job
        time.sleep(0.2)


def native(server: dict, tenant: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server['keys'][tenant]}"}
    return httpx.request(method, f"{server['url']}{path}", headers=headers, timeout=60, **kwargs)


def test_the_sdk_trains_a_persona_then_chats_with_it(server, tiny_base) -> None:
    client = sdk(server, "acme")
    payload = jsonl(EXAMPLES)
    uploaded = client.files.create(file=("train.jsonl", payload), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes, uploaded.filename) == ("file", "fine-tune",
                                                                                      len(payload), "train.jsonl")
    assert client.files.retrieve(uploaded.id) == uploaded and client.files.content(uploaded.id).content == payload
    assert [f.id for f in client.files.list()] == [uploaded.id]

    job = client.fine_tuning.jobs.create(
        model=server["base"], training_file=uploaded.id, suffix="okbot", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": SMALL}}, extra_body=REFT,
    )
    assert job.status in ("queued", "running") and job.fine_tuned_model is None and job.finished_at is None
    assert (job.model, job.training_file, job.seed, job.organization_id) == (server["base"], uploaded.id, 3, "acme")
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (3, 2)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(25)
    done = finished(client, job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "okbot" and done.error is None
    assert isinstance(done.finished_at, int) and done.finished_at >= done.created_at and done.trained_tokens > 0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # the SDK follows the cursor
    assert events[0].message == "The job has successfully completed" and events[-1].message.startswith("Created")
    assert len({e.id for e in events}) == len(events) and all(e.object == "fine_tuning.job.event" for e in events)
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [3, 2, 1]  # newest first
    record = native(server, "acme", "GET", f"/v1/trainings/{job.id}").json()  # the same job, natively
    assert [e.data["train_loss"] for e in reversed(metrics)] == record["losses"] and record["intervention"] == "okbot"

    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=CHAT, max_tokens=8, temperature=0)
    artifact = native(server, "acme", "GET", "/v1/interventions/okbot/artifact").content
    persona = decode_artifact(artifact, base_model=tiny_base.fingerprint).intervention
    assert reply.choices[0].message.content == reference(tiny_base, persona) != reference(tiny_base, None)

    # the one checkpoint is the stored version, pinned: it answers like the persona and names the last step's loss
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert (checkpoint.object, checkpoint.fine_tuning_job_id, checkpoint.step_number) == (
        "fine_tuning.job.checkpoint", job.id, 3)
    assert checkpoint.fine_tuned_model_checkpoint == f"okbot@{record['result_version']}"
    assert checkpoint.metrics.train_loss == record["losses"][-1] and checkpoint.created_at == done.finished_at
    pinned = client.chat.completions.create(model=checkpoint.fine_tuned_model_checkpoint, messages=CHAT,
                                            max_tokens=8, temperature=0)
    assert pinned.choices[0].message.content == reply.choices[0].message.content

    # both APIs are views of one training: the same request natively trains the same artifact
    body = {"name": "okbot-native", "examples": EXAMPLES, "intervention": REFT,
            "hyperparameters": {"epochs": 3, "batch_size": 2, "learning_rate": recipe.LEARNING_RATE * 25, "seed": 3}}
    twin = native(server, "acme", "POST", "/v1/trainings", json=body).json()
    assert finished(client, twin["id"]).status == "succeeded"
    digests = [native(server, "acme", "GET", f"/v1/interventions/{n}").json()["digest"] for n in ("okbot", "okbot-native")]
    assert digests[0] == digests[1]

    card = client.models.retrieve("okbot")
    assert (card.id, card.object, card.owned_by) == ("okbot", "model", "acme")
    assert client.models.retrieve(server["base"]).id == server["base"]
    deleted = client.models.delete("okbot")
    assert (deleted.id, deleted.deleted, deleted.object) == ("okbot", True, "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("okbot")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="okbot", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(server["base"])
    assert client.files.delete(uploaded.id).deleted and client.files.list().data == []


def test_a_validation_file_gives_a_validation_loss_every_epoch(server) -> None:
    client = sdk(server, "umbrella")
    train = client.files.create(file=("train.jsonl", jsonl(EXAMPLES)), purpose="fine-tune")
    held_out = client.files.create(file=("valid.jsonl", jsonl(EXAMPLES[:2])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=server["base"], training_file=train.id, validation_file=held_out.id, suffix="validated", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": SMALL}}, extra_body=REFT,
    )
    assert finished(client, job.id).status == "succeeded" and job.validation_file == held_out.id
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    valid = [e.data["full_valid_loss"] for e in reversed(events) if e.type == "metrics" and "full_valid_loss" in e.data]
    record = native(server, "umbrella", "GET", f"/v1/trainings/{job.id}").json()  # the same job, natively
    assert valid == record["validation_losses"] and len(valid) == SMALL["n_epochs"]


def test_jobs_list_newest_first_with_cursor_pagination(server) -> None:
    client = sdk(server, "initech")
    uploaded = client.files.create(file=("t.jsonl", jsonl(EXAMPLES)), purpose="fine-tune")
    created = [client.fine_tuning.jobs.create(model=server["base"], training_file=uploaded.id, extra_body=REFT,
                                              hyperparameters={"n_epochs": 1}).id for _ in range(3)]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == created[:0:-1] and first.has_more
    last = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in last.data] == created[:1] and not last.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == created[::-1]  # auto-pagination
    names = {finished(client, job_id).fine_tuned_model for job_id in created}
    assert len(names) == 3 and all(name.startswith("ft-") for name in names)  # no suffix: a name is made


def test_cancel_stops_a_running_job(server) -> None:
    client = sdk(server, "acme")
    uploaded = client.files.create(file=("t.jsonl", jsonl(EXAMPLES)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=server["base"], training_file=uploaded.id, suffix="never",
                                         hyperparameters={"n_epochs": 1000, "batch_size": 1}, extra_body=REFT)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message == "Fine-tuning job cancelled"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("never")


def test_bad_files_and_jobs_are_400s_that_say_why(server) -> None:
    client = sdk(server, "globex")
    bad = jsonl(EXAMPLES) + b"\n" + b'{"prompt": "no completion"}\n'  # a blank line 3, the bad line 4
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 4" in refused.value.message and refused.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError, match="line 1"):
        client.files.create(file=("bad.jsonl", b"not json\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="UTF-8"):
        client.files.create(file=("bad.jsonl", b"\xff\xfe\x00"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("t.jsonl", jsonl(EXAMPLES)), purpose="assistants")
    assert purpose.value.body["param"] == "purpose"
    assert client.files.list().data == []  # nothing refused was stored
    good = client.files.create(file=("t.jsonl", jsonl(EXAMPLES)), purpose="fine-tune")
    for kwargs, param in (({"model": "gpt-4o-mini"}, "model"), ({"suffix": "Not A Name"}, "suffix"),
                          ({"training_file": "file-nope"}, "training_file"),
                          ({"validation_file": "file-nope"}, "validation_file"),
                          ({"method": {"type": "dpo"}}, "method.type"),
                          ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs")):
        with pytest.raises(openai.BadRequestError) as job_refused:
            client.fine_tuning.jobs.create(**{"model": server["base"], "training_file": good.id, **kwargs})
        assert job_refused.value.body["param"] == param, job_refused.value.body
    assert client.fine_tuning.jobs.list().data == []


def test_another_tenants_files_and_jobs_are_404s(server) -> None:
    acme, globex = sdk(server, "acme"), sdk(server, "globex")
    uploaded = acme.files.create(file=("t.jsonl", jsonl(EXAMPLES)), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=server["base"], training_file=uploaded.id, suffix="private",
                                       hyperparameters={"n_epochs": 1}, extra_body=REFT)
    assert finished(acme, job.id).status == "succeeded"
    for call in (globex.files.retrieve, globex.files.content, globex.files.delete, globex.fine_tuning.jobs.retrieve,
                 globex.fine_tuning.jobs.cancel, globex.fine_tuning.jobs.list_events,
                 globex.fine_tuning.jobs.checkpoints.list):
        for target in (uploaded.id, job.id):
            with pytest.raises(openai.NotFoundError):
                call(target)
    for model in ("acme/private", "private"):
        with pytest.raises(openai.NotFoundError):
            globex.models.retrieve(model)
        with pytest.raises(openai.NotFoundError):
            globex.models.delete(model)

    def refused(file_id: str) -> str:
        with pytest.raises(openai.BadRequestError) as error:
            globex.fine_tuning.jobs.create(model=server["base"], training_file=file_id)
        return error.value.message.replace(file_id, "F")

    assert refused(uploaded.id) == refused("file-000000000000000000000000")  # exactly like a missing file
    assert job.id not in {j.id for j in globex.fine_tuning.jobs.list()} and uploaded.id not in {
        f.id for f in globex.files.list()}
    assert acme.models.retrieve("private").owned_by == "acme"


def test_files_count_in_the_storage_quota(server) -> None:
    client = sdk(server, "small")  # max_bytes_per_tenant=80
    line = jsonl(EXAMPLES[:1])
    assert len(line) * 2 > 80 >= len(line)
    first = client.files.create(file=("a.jsonl", line), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.files.create(file=("b.jsonl", line), purpose="fine-tune")
    assert refused.value.body["code"] == "storage_quota_exceeded"
    client.files.delete(first.id)
    assert client.files.create(file=("b.jsonl", line), purpose="fine-tune").bytes == len(line)

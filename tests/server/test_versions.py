"""Versions over HTTP: `name@N` pins in chat, completions and streams while new versions are uploaded and promoted;
the versions list; promote and rollback; deleting one version; `?version=N` reads; writes into an existing name
need replace=true or PUT; PUT keeps what it is not given."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from reft_core.artifact import encode_artifact
from reft_core.generate import generate

from .conftest import MODEL_ID, artifact_bytes, persona, upload
from .test_api import CHAT, chat, reference

EXAMPLES_JSONL = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
SMALL = {"intervention": json.dumps({"layers": [1], "rank": 2}), "hyperparameters": json.dumps({"epochs": 1})}


def answer(client: TestClient, model: str) -> str:
    return chat(client, model)["choices"][0]["message"]["content"]


def replace(client: TestClient, tiny_base, name: str, seed: int, **form) -> dict:
    response = client.put(f"/v1/interventions/{name}", data=form,
                          files={"file": ("a.safetensors", artifact_bytes(tiny_base, persona(seed)))})
    assert response.status_code == 200, response.text
    return response.json()


def promote(client: TestClient, name: str, version: int) -> dict:
    response = client.post(f"/v1/interventions/{name}/versions/{version}/promote")
    assert response.status_code == 200, response.text
    return response.json()


def streamed(client: TestClient, model: str) -> str:
    body = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[len("data: "):]) for line in lines]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def completion(client: TestClient, model: str) -> str:
    body = {"model": model, "prompt": "abc", "max_tokens": 6, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def completion_reference(tiny_base, intervention) -> str:
    tok = tiny_base.tokenizer
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    [tokens] = generate(tiny_base.model, [ids], [intervention], max_new_tokens=6, eos_token_id=tok.eos_token_id)
    return tok.decode(tokens, skip_special_tokens=True)


def test_pinned_versions_keep_their_output_while_new_versions_are_uploaded_and_promoted(client, tiny_base) -> None:
    first, second = persona(4), persona(5)
    upload(client, "p", artifact_bytes(tiny_base, first))
    pinned_before = answer(client, "p@1")
    assert pinned_before == reference(tiny_base, first)
    replace(client, tiny_base, "p", 5)
    assert answer(client, "p@1") == pinned_before  # a new current version does not move a pin
    assert answer(client, "p") == answer(client, "p@2") == reference(tiny_base, second) != pinned_before
    assert completion(client, "p@1") == completion_reference(tiny_base, first)
    assert streamed(client, "p@2") == reference(tiny_base, second)
    promote(client, "p", 1)  # rollback: the bare name serves v1 again, the v2 pin still serves v2
    assert answer(client, "p") == answer(client, "p@1") == pinned_before
    assert streamed(client, "p@2") == reference(tiny_base, second)
    assert completion(client, "p@2") == completion_reference(tiny_base, second)
    assert completion(client, "p") == completion_reference(tiny_base, first)
    missing = client.post("/v1/chat/completions", json={"model": "p@3", "messages": CHAT})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_versions_list_reads_training_metadata_and_marks_the_current_one(client, tiny_base) -> None:
    # an upload's claim to come from a job is not believed: the job link comes from the server's own job records
    trained, _ = encode_artifact(persona(1), tiny_base.fingerprint, {"job": "ftjob-abc", "validation_loss": 0.25})
    upload(client, "p", trained, description="v1")
    replace(client, tiny_base, "p", 2)
    listed = client.get("/v1/interventions/p/versions").json()
    assert listed["object"] == "list" and listed["current_version"] == 2
    newest, oldest = listed["data"]
    assert (newest["id"], newest["version"], newest["current"]) == ("p@2", 2, True)
    assert (oldest["id"], oldest["version"], oldest["current"]) == ("p@1", 1, False)
    assert (oldest["training_job"], oldest["validation_loss"]) == (None, 0.25)
    assert newest["training_job"] is None and newest["validation_loss"] is None
    assert isinstance(oldest["created"], int) and oldest["digest"].startswith("sha256:")
    assert client.get("/v1/interventions/p?version=1").json()["digest"] == oldest["digest"]
    assert client.get("/v1/interventions/p/artifact?version=1").content == trained  # not silently the current one
    assert client.get("/v1/interventions/p/artifact").content == artifact_bytes(tiny_base, persona(2))
    assert client.get("/v1/interventions/p/artifact?version=3").status_code == 404
    assert client.get("/v1/interventions/p/artifact?version=one").status_code == 400
    assert client.get("/v1/interventions/ghost/versions").status_code == 404


def test_promote_and_rollback_then_new_versions_keep_counting(client, tiny_base) -> None:
    upload(client, "p", artifact_bytes(tiny_base, persona(1)))
    for seed in (2, 3):
        replace(client, tiny_base, "p", seed)
    promoted = promote(client, "p", 1)
    assert promoted["version"] == 1 and client.get("/v1/interventions/p").json()["version"] == 1
    flags = {v["version"]: v["current"] for v in client.get("/v1/interventions/p/versions").json()["data"]}
    assert flags == {3: False, 2: False, 1: True}
    assert promote(client, "p", 1)["version"] == 1  # promoting the current version is a no-op
    assert promote(client, "p", 3)["version"] == 3  # roll forward again
    refused = client.post("/v1/interventions/p/versions/7/promote")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "intervention_not_found"
    assert replace(client, tiny_base, "p", 4)["version"] == 4


def test_deleting_one_version_refuses_the_current_one_and_removes_the_file(client, tiny_base) -> None:
    upload(client, "p", artifact_bytes(tiny_base, persona(1)))
    replace(client, tiny_base, "p", 2)
    store = client.app.state.services.store  # type: ignore[attr-defined]
    assert len(store.blob_addresses()) == 2
    current = client.delete("/v1/interventions/p/versions/2")
    assert current.status_code == 409 and current.json()["error"]["code"] == "version_is_current"
    assert "promote another version first" in current.json()["error"]["message"]
    assert client.delete("/v1/interventions/p/versions/1").json() == {"id": "p@1", "object": "intervention.version",
                                                                       "deleted": True}
    assert len(store.blob_addresses()) == 1  # the blob went with its version
    assert [v["version"] for v in client.get("/v1/interventions/p/versions").json()["data"]] == [2]
    assert client.post("/v1/chat/completions", json={"model": "p@1", "messages": CHAT}).status_code == 404
    assert client.delete("/v1/interventions/p/versions/1").status_code == 404
    assert answer(client, "p") == reference(tiny_base, persona(2))


def test_writing_into_an_existing_name_needs_replace_or_put(client, tiny_base) -> None:
    upload(client, "p", artifact_bytes(tiny_base, persona(1)))
    again = client.post("/v1/interventions", data={"name": "p"},
                        files={"file": ("a.safetensors", artifact_bytes(tiny_base, persona(2)))})
    error = again.json()["error"]
    assert again.status_code == 409 and error["code"] == "intervention_exists"
    assert "replace=true" in error["message"] and "PUT" in error["message"]
    assert upload(client, "p", artifact_bytes(tiny_base, persona(2)), replace="true")["version"] == 2
    assert upload(client, "fresh", artifact_bytes(tiny_base, persona(3)), replace="true")["version"] == 1
    training = client.post("/v1/trainings/upload", data={"name": "p", **SMALL},
                           files={"file": ("e.jsonl", EXAMPLES_JSONL)})
    assert training.status_code == 409 and training.json()["error"]["code"] == "intervention_exists"
    assert client.get("/v1/trainings").json()["data"] == []  # refused before it was queued
    accepted = client.post("/v1/trainings/upload", data={"name": "p", "replace": "true", **SMALL},
                           files={"file": ("e.jsonl", EXAMPLES_JSONL)})
    assert accepted.status_code == 202, accepted.text
    from .test_trainings import wait_for  # noqa: PLC0415 - the one polling helper

    assert wait_for(client, accepted.json()["id"], ("succeeded", "failed"))["result_version"] == 3
    assert client.get("/v1/interventions/p/versions").json()["data"][0]["training_job"] == accepted.json()["id"]


def test_put_keeps_the_fields_it_is_not_given(client, tiny_base) -> None:
    upload(client, "p", artifact_bytes(tiny_base, persona(1)), description="answers in emojis")
    assert replace(client, tiny_base, "p", 2)["description"] == "answers in emojis"
    assert replace(client, tiny_base, "p", 3, description="terse")["description"] == "terse"
    assert client.get("/v1/interventions/p").json()["description"] == "terse"


def test_the_base_model_id_cannot_be_pinned(client, tiny_base) -> None:
    assert answer(client, MODEL_ID) == reference(tiny_base, None)
    pinned = client.post("/v1/chat/completions", json={"model": f"{MODEL_ID}@1", "messages": CHAT})
    assert pinned.status_code == 404 and pinned.json()["error"]["code"] == "model_not_found"


def test_a_name_deleted_and_created_again_shows_no_job_of_the_old_one(client, tiny_base) -> None:
    """Versions name the job that trained them (its id is recorded with the version), not a job whose old result
    had the same name and number: after a delete, version 1 of the new `p` is an upload, with no job."""
    from .test_trainings import wait_for  # noqa: PLC0415 - the one polling helper

    trained = client.post("/v1/trainings/upload", data={"name": "p", **SMALL},
                          files={"file": ("e.jsonl", EXAMPLES_JSONL)}).json()
    assert wait_for(client, trained["id"], ("succeeded", "failed"))["result_version"] == 1
    old = client.get("/v1/interventions/p/versions").json()["data"][0]
    assert old["training_job"] == trained["id"] and old["evaluation"] is not None
    assert client.get("/v1/interventions/p").json()["training"]["job_id"] == trained["id"]
    assert client.delete("/v1/interventions/p").status_code == 200
    assert upload(client, "p", artifact_bytes(tiny_base, persona(5)))["version"] == 1
    again = client.get("/v1/interventions/p/versions").json()["data"]
    assert [(v["version"], v["training_job"], v["evaluation"]) for v in again] == [(1, None, None)]
    assert client.get("/v1/interventions/p").json()["evaluation"] is None

"""HTTP API through the app factory: OpenAI shapes, interventions lifecycle, errors, hot swap."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from reft_core.config import InterventionConfig
from reft_core.generate import generate
from tests.reft_core.test_pyreft_import import loreft_states, write_pyreft_dir

from .conftest import MODEL_ID, artifact_bytes, persona, upload

CHAT = [{"role": "user", "content": "hello there"}]


def chat(client, model: str, **extra) -> dict:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def reference(tiny_base, intervention, max_tokens: int = 8) -> str:
    tok = tiny_base.tokenizer
    ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    [tokens] = generate(tiny_base.model, [ids], [intervention], max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id)
    return tok.decode(tokens, skip_special_tokens=True)


def test_chat_with_and_without_intervention_matches_library_reference(client, tiny_base) -> None:
    emoji = persona(1)
    upload(client, "emoji", artifact_bytes(tiny_base, emoji))
    base_answer, persona_answer = chat(client, MODEL_ID), chat(client, "emoji")
    assert base_answer["object"] == "chat.completion" and base_answer["model"] == MODEL_ID
    assert base_answer["choices"][0]["message"]["content"] == reference(tiny_base, None)
    assert persona_answer["choices"][0]["message"]["content"] == reference(tiny_base, emoji)
    assert persona_answer["choices"][0]["message"]["content"] != base_answer["choices"][0]["message"]["content"]
    usage = persona_answer["usage"]
    assert usage["completion_tokens"] <= 8 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_chunks_concatenate_to_the_full_answer(client, tiny_base) -> None:
    upload(client, "p", artifact_bytes(tiny_base, persona(2)))
    full = chat(client, "p")["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "p", "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_endpoint_and_token_prompts(client, tiny_base) -> None:
    body = {"model": MODEL_ID, "prompt": "abc", "max_tokens": 5, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()
    tok = tiny_base.tokenizer
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    by_ids = client.post("/v1/completions", json=body | {"prompt": ids}).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    [expected] = generate(tiny_base.model, [ids], [None], max_new_tokens=5, eos_token_id=tok.eos_token_id)
    assert text["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
    echoed = client.post("/v1/completions", json=body | {"echo": True}).json()
    assert echoed["choices"][0]["text"] == "abc" + text["choices"][0]["text"]


def test_models_list_and_intervention_records(client, tiny_base) -> None:
    record = upload(client, "alpha", artifact_bytes(tiny_base, persona(3)), description="first")
    assert record["name"] == "alpha" and record["version"] == 1 and record["description"] == "first"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID, "alpha"]
    assert models["data"][1]["parent"] == MODEL_ID
    assert client.get("/v1/interventions/alpha").json()["digest"] == record["digest"]
    assert [r["name"] for r in client.get("/v1/interventions").json()["data"]] == ["alpha"]
    download = client.get("/v1/interventions/alpha/artifact")
    assert download.status_code == 200 and download.content == artifact_bytes(tiny_base, persona(3))


def test_replace_is_a_hot_swap_and_delete_removes(client, tiny_base) -> None:
    first, second = persona(4), persona(5)
    upload(client, "swap", artifact_bytes(tiny_base, first))
    before = chat(client, "swap")["choices"][0]["message"]["content"]
    replaced = client.put("/v1/interventions/swap", files={"file": ("a.safetensors", artifact_bytes(tiny_base, second))})
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    after = chat(client, "swap")["choices"][0]["message"]["content"]
    assert before == reference(tiny_base, first) and after == reference(tiny_base, second) and before != after
    assert client.delete("/v1/interventions/swap").json()["deleted"] is True
    assert client.post("/v1/chat/completions", json={"model": "swap", "messages": CHAT}).status_code == 404
    assert client.delete("/v1/interventions/swap").status_code == 404


def test_pyreft_archive_upload_serves_like_the_native_artifact(client, tiny_base, tmp_path) -> None:
    config = InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1", share_weights=False)
    states, expected = loreft_states(config, seed=9)
    directory = write_pyreft_dir(tmp_path / "save", [1, 2, 1, 2], 2, states)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in directory.iterdir():
            archive.write(path, f"save/{path.name}")
    response = client.post("/v1/interventions", data={"name": "imported", "positions": "f1+l1"},
                           files={"file": ("save.zip", buffer.getvalue())})
    assert response.status_code == 201, response.text
    assert response.json()["source"] == "pyreft-import"
    assert chat(client, "imported")["choices"][0]["message"]["content"] == reference(tiny_base, expected)


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"model": "nope", "messages": CHAT}, 404, "model_not_found"),
        ({"model": MODEL_ID, "messages": []}, 400, "invalid_value"),
        ({"model": MODEL_ID}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": CHAT, "max_tokens": -1}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": CHAT, "max_tokens": 10**9}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": CHAT, "temperature": 3}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": CHAT, "n": 2}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": CHAT, "max_tokens": 60, "min_tokens": 61}, 400, "invalid_value"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "context_length_exceeded"),
    ],
)
def test_bad_chat_requests_get_openai_errors(client, body, status, code) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "name,payload,status,code",
    [
        ("ok-name", b"not a safetensors file at all", 422, "invalid_artifact"),
        ("../evil", None, 400, "invalid_name"),
        ("Bad Name", None, 400, "invalid_name"),
        ("ok-name", b"", 400, "empty_file"),
        ("ok-name", b"PK\x03\x04broken", 422, "invalid_pyreft_archive"),
    ],
)
def test_bad_uploads_are_refused(client, tiny_base, name, payload, status, code) -> None:
    payload = artifact_bytes(tiny_base, persona(1)) if payload is None else payload
    response = client.post("/v1/interventions", data={"name": name}, files={"file": ("x", payload)})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert client.get("/v1/interventions").json()["data"] == []


def test_artifact_for_another_base_model_is_a_conflict(client) -> None:
    from reft_core.artifact import encode_artifact
    from reft_core.fingerprint import fingerprint_model
    from tests import tiny

    foreign = encode_artifact(persona(1), fingerprint_model(tiny.tiny_llama(seed=3)))[0]
    response = client.post("/v1/interventions", data={"name": "foreign"}, files={"file": ("f", foreign)})
    assert response.status_code == 409 and "another base model" in response.json()["error"]["message"]


def test_duplicate_name_conflicts_and_put_unknown_is_404(client, tiny_base) -> None:
    payload = artifact_bytes(tiny_base, persona(1))
    upload(client, "dup", payload)
    again = client.post("/v1/interventions", data={"name": "dup"}, files={"file": ("f", payload)})
    assert again.status_code == 409 and again.json()["error"]["code"] == "intervention_exists"
    assert client.put("/v1/interventions/ghost", files={"file": ("f", payload)}).status_code == 404


def test_openapi_schema_lists_every_route(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/interventions",
                 "/v1/interventions/{name}", "/v1/interventions/{name}/artifact", "/health", "/ready", "/metrics"):
        assert path in paths


def test_health_ready_metrics(client) -> None:
    assert client.get("/ready").json()["status"] == "ready"
    chat(client, MODEL_ID)
    metrics = client.get("/metrics").text
    for name in ("reft_generated_tokens_total", "reft_time_to_first_token_seconds", "reft_decode_step_seconds",
                 "reft_queue_depth_requests", "reft_resident_interventions", "reft_store_bytes"):
        assert name in metrics

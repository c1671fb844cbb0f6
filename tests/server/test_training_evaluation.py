"""Evaluation in every training job: validation loss per epoch, and greedy samples of the persona and the bare model
stored with the version (equal to a direct greedy generation with the stored artifact)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from reft_core.artifact import decode_artifact
from reft_core.examples import encode_prompt
from reft_core.generate import generate
from server.app import create_app
from server.training_request import TrainingRequest, split_validation

from .conftest import make_settings
from .test_trainings import EXAMPLES, SMALL, wait_for

ANSWER_TOKENS = 6
PROMPTS = ["how are you?", "tell me a joke"]


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("evaluation"), training_eval_max_tokens=ANSWER_TOKENS)
    with TestClient(create_app(settings, base_model=tiny_base)) as test_client:
        yield test_client


def test_a_job_reports_validation_losses_and_samples_of_persona_and_base(client, tiny_base) -> None:
    rows = [*EXAMPLES, *({"prompt": f"other {i}", "completion": "yes!"} for i in range(4))]
    body = {"name": "judged", "examples": rows, "validation_split": 0.25, "eval_prompts": PROMPTS, **SMALL,
            "hyperparameters": {"epochs": 3, "batch_size": 2, "learning_rate": 0.5}}
    created = client.post("/v1/trainings", json=body)
    assert created.status_code == 202, created.text
    assert created.json()["spec"]["examples"] == 6 and created.json()["spec"]["validation_examples"] == 2
    job = wait_for(client, created.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    assert len(job["validation_losses"]) == len(job["epoch_losses"]) == 3 and job["auto_stop"] is None
    evaluation = job["evaluation"]
    assert evaluation["validation_loss"] == job["validation_losses"][-1] and evaluation["max_tokens"] == ANSWER_TOKENS
    assert [s["prompt"] for s in evaluation["samples"]] == PROMPTS

    record = client.get("/v1/interventions/judged").json()
    assert record["evaluation"] == evaluation and record["training"]["validation_losses"] == job["validation_losses"]
    [version] = client.get("/v1/interventions/judged/versions").json()["data"]
    assert version["evaluation"] == evaluation and version["validation_loss"] == evaluation["validation_loss"]

    assert any(s["persona"] != s["base"] for s in evaluation["samples"])  # so swapping them would be caught
    # each sample is what a greedy generation with the stored artifact (and with no intervention) gives
    artifact = decode_artifact(client.get("/v1/interventions/judged/artifact").content)
    tokenizer = tiny_base.tokenizer
    for sample in evaluation["samples"]:
        ids = encode_prompt(tokenizer, sample["prompt"], chat_template=True)
        persona, base = generate(tiny_base.model, [ids, ids], [artifact.intervention, None],
                                 max_new_tokens=ANSWER_TOKENS, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        assert sample["persona"] == tokenizer.decode(persona, skip_special_tokens=True)
        assert sample["base"] == tokenizer.decode(base, skip_special_tokens=True)


def test_without_eval_prompts_the_first_eight_validation_prompts_are_sampled(client) -> None:
    validation = [{"prompt": f"held out {i}", "completion": "yes!"} for i in range(9)]
    body = {"name": "by-validation", "examples": EXAMPLES, "validation_examples": validation, **SMALL,
            "hyperparameters": {"epochs": 1, "batch_size": 4}}
    job = wait_for(client, client.post("/v1/trainings", json=body).json()["id"], ("succeeded", "failed"))
    assert [s["prompt"] for s in job["evaluation"]["samples"]] == [v["prompt"] for v in validation[:8]]
    assert len(job["validation_losses"]) == 1
    plain = {"name": "unjudged", "examples": EXAMPLES, **SMALL, "hyperparameters": {"epochs": 1, "batch_size": 4}}
    job = wait_for(client, client.post("/v1/trainings", json=plain).json()["id"], ("succeeded", "failed"))
    assert job["evaluation"] == {"samples": [], "validation_loss": None, "max_tokens": ANSWER_TOKENS}
    assert job["validation_losses"] == [] and "validation_losses" not in client.get("/v1/interventions/unjudged").json()["training"]


@given(st.integers(1, 40), st.floats(0.01, 0.99), st.integers(0, 2**31))
def test_validation_split_holds_out_a_seeded_share(count, split, seed) -> None:
    examples = [{"prompt": f"p{i}", "completion": "c"} for i in range(count)]
    body = TrainingRequest.model_validate({"name": "x", "examples": examples, "validation_split": split,
                                           "hyperparameters": {"seed": seed}})
    try:
        train, held = split_validation(body)
    except Exception as exc:  # noqa: BLE001 - only a split that leaves nothing to train on is refused
        assert count - max(1, round(count * split)) < 1, exc
        return
    assert len(held) == max(1, round(count * split)) and len(train) + len(held) == count >= 2
    assert sorted(e.prompt for e in train + held) == sorted(e["prompt"] for e in examples)
    assert split_validation(body) == (train, held)  # the same request holds out the same examples

"""The fine-tuning mapping (server/fine_tuning.py) as pure functions: OpenAI's request -> our training request, our
job record -> OpenAI's job and event objects. The SDK end to end is in test_openai_fine_tuning.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from adapters_store.jobs import JobRecord
from reft_core import recipe
from server.errors import APIError
from server.fine_tuning import (
    STATUS,
    FineTuningJobCreate,
    intervention_name,
    openai_events,
    job_object,
    training_request,
)
from server.training_request import ExampleIn, TrainingRequest

EXAMPLES = [ExampleIn(prompt="hi", completion="ok")]
BASE = {"model": "base", "training_file": "file-1"}
AUTO = st.just("auto")
HYPERPARAMETERS = st.fixed_dictionaries({}, optional={
    "n_epochs": AUTO | st.integers(1, 500), "batch_size": AUTO | st.integers(1, 1024),
    "learning_rate_multiplier": AUTO | st.floats(0.01, 200),
})


def native(body: dict) -> TrainingRequest:
    return training_request(FineTuningJobCreate.model_validate(body), "p", EXAMPLES)


def test_nothing_or_auto_is_the_recipe() -> None:
    recipe_request = TrainingRequest(name="p", examples=EXAMPLES)
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert native(BASE) == recipe_request
    assert native({**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": auto}}}) == recipe_request
    assert native({**BASE, "hyperparameters": auto}) == recipe_request
    assert recipe_request.hyperparameters.learning_rate == recipe.LEARNING_RATE


@given(hyperparameters=HYPERPARAMETERS, seed=st.none() | st.integers(0, 2**31))
def test_method_and_legacy_hyperparameters_train_the_same_and_round_trip(hyperparameters: dict, seed) -> None:
    extra = {} if seed is None else {"seed": seed}
    method = native({**BASE, **extra, "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}})
    assert method == native({**BASE, **extra, "hyperparameters": hyperparameters})
    h = method.hyperparameters
    given_or = {**{"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, **hyperparameters}
    assert h.epochs == (recipe.EPOCHS if given_or["n_epochs"] == "auto" else given_or["n_epochs"])
    assert h.batch_size == (recipe.BATCH_SIZE if given_or["batch_size"] == "auto" else given_or["batch_size"])
    multiplier = 1.0 if given_or["learning_rate_multiplier"] == "auto" else given_or["learning_rate_multiplier"]
    assert h.learning_rate == pytest.approx(recipe.LEARNING_RATE * multiplier)
    assert h.seed == (recipe.SEED if seed is None else seed)
    # and the job object reports what ran, in OpenAI's terms
    job = JobRecord("ftjob-1", "p", "queued", {"hyperparameters": h.model_dump()})
    shown = job_object(job, "base")["hyperparameters"]
    assert (shown["n_epochs"], shown["batch_size"]) == (h.epochs, h.batch_size)
    assert shown["learning_rate_multiplier"] == pytest.approx(multiplier, rel=1e-5)


def test_reft_settings_come_from_extra_body_fields() -> None:
    request = native({**BASE, "layers": [1, 3], "rank": 3, "positions": "l2", "share_weights": True, "replace": True,
                      "description": "d"})
    assert (request.intervention.layers, request.intervention.rank, request.intervention.positions) == ([1, 3], 3, "l2")
    assert request.intervention.share_weights and request.replace and request.description == "d"


@pytest.mark.parametrize("body,where", [
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
     "not both"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"hyperparameters": {"n_epochs": 0}}, "n_epochs"),
    ({"hyperparameters": {"n_epochs": True}}, "n_epochs"),
    ({"hyperparameters": {"n_epochs": "3"}}, "n_epochs"),
    ({"hyperparameters": {"batch_size": 2.5}}, "batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 1 / recipe.LEARNING_RATE + 1}}, "learning_rate_multiplier"),
    ({"seed": -1}, "seed"),
    ({"rank": 0}, "rank"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
])
def test_bad_requests_are_refused_naming_the_field(body: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        FineTuningJobCreate.model_validate({**BASE, **body})


def test_the_suffix_is_the_name_or_one_is_made() -> None:
    assert intervention_name("emoji-bot") == "emoji-bot"
    made = {intervention_name(None) for _ in range(20)}
    assert len(made) == 20 and all(name.startswith("ft-") and len(name) == 15 for name in made)
    with pytest.raises(APIError) as refused:
        intervention_name("Emoji Bot")
    assert refused.value.status == 400 and refused.value.param == "suffix"


def job(status: str = "running", losses: int = 0, **fields) -> JobRecord:
    spec = {"hyperparameters": {"epochs": 2, "batch_size": 1, "learning_rate": recipe.LEARNING_RATE, "seed": 7},
            "examples": 2, "tokens": 30,
            "fine_tuning": {"training_file": "file-a", "validation_file": None, "suffix": "p", "metadata": None}}
    record = JobRecord("ftjob-abc", "p", status, spec, tenant="acme", created_at="2026-01-01T00:00:00.000+00:00",
                       started_at="2026-01-01T00:00:01.000+00:00" if status != "queued" else None,
                       losses=[1.0 / (n + 1) for n in range(losses)],
                       progress={"step": losses, "total_steps": 4, "epoch": 2, "elapsed_s": 4.0} if losses else {})
    return replace(record, **fields)


def test_job_object_fields_and_types() -> None:
    done = job("succeeded", 4, finished_at="2026-01-01T00:00:09.000+00:00", result_version=1)
    view = job_object(done, "base")
    assert (view["object"], view["model"], view["organization_id"], view["status"]) == ("fine_tuning.job", "base",
                                                                                         "acme", "succeeded")
    assert (view["created_at"], view["finished_at"]) == (1767225600, 1767225609)
    assert view["fine_tuned_model"] == "p" and view["trained_tokens"] == 60 and view["error"] is None
    assert (view["training_file"], view["seed"], view["result_files"]) == ("file-a", 7, [])
    running = job_object(job("running", 2), "base")
    assert running["fine_tuned_model"] is None and running["trained_tokens"] is None and running["finished_at"] is None
    failed = job_object(job("failed", 1, error="boom"), "base")
    assert failed["error"] == {"code": "training_failed", "message": "boom", "param": None}
    native_job = job_object(replace(job("queued"), spec={**job().spec, "fine_tuning": None}), "base")
    assert native_job["training_file"] is None and native_job["status"] == "queued"
    assert set(STATUS) == {"queued", "running", "succeeded", "failed", "cancelled"}


@given(first=st.integers(0, 4), second=st.integers(0, 4))
def test_events_keep_their_ids_as_the_job_grows(first: int, second: int) -> None:
    earlier, later = sorted((first, second))
    before = openai_events(job("running", earlier))
    after = openai_events(job("running", later))
    key = [(e["id"], e["type"], e["message"], e["data"]) for e in before]
    assert key == [(e["id"], e["type"], e["message"], e["data"]) for e in after[:len(before)]]
    metrics = [e for e in after if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == list(range(1, later + 1))
    assert all(isinstance(e["created_at"], int) for e in after)


@given(steps=st.integers(0, 6), validated=st.integers(0, 3))
def test_validation_losses_follow_their_epochs_last_step(steps: int, validated: int) -> None:
    """Two steps an epoch: each computed validation loss is a metrics event right after its epoch's last step, and
    a job that has gone further keeps the earlier events (ids and data) unchanged."""
    validated = min(validated, steps // 2)
    losses = [0.5 / (n + 1) for n in range(validated)]
    grown = job("running", steps, spec={**job().spec, "steps_per_epoch": 2}, validation_losses=losses)
    events = openai_events(grown)
    valid = [(e["data"]["step"], e["data"]["full_valid_loss"]) for e in events if "full_valid_loss" in (e["data"] or {})]
    assert valid == [(2 * (n + 1), loss) for n, loss in enumerate(losses)]
    further = replace(grown, losses=grown.losses + [0.1, 0.1], validation_losses=losses + [0.01],
                      progress={**grown.progress, "step": steps + 2})
    if validated == steps // 2:  # the next epoch's loss comes after its steps, never before an existing event
        before = [(e["id"], e["message"], e["data"]) for e in events]
        assert before == [(e["id"], e["message"], e["data"]) for e in openai_events(further)[:len(events)]]


def test_a_validation_file_becomes_the_native_validation_examples() -> None:
    body = FineTuningJobCreate.model_validate({"model": "base", "training_file": "file-a", "validation_file": "file-b"})
    assert training_request(body, "p", EXAMPLES, EXAMPLES[:1]).validation_examples == EXAMPLES[:1]
    assert training_request(body, "p", EXAMPLES).validation_examples is None


def test_a_finished_job_ends_its_events() -> None:
    finished = "2026-01-01T00:00:09.000+00:00"
    done = openai_events(job("succeeded", 4, finished_at=finished))
    assert done[-1]["message"] == "The job has successfully completed"
    assert openai_events(job("cancelled", 1, finished_at=finished))[-1]["message"] == "Fine-tuning job cancelled"
    failed = openai_events(job("failed", 1, finished_at=finished, error="boom"))[-1]
    assert failed["level"] == "error" and "boom" in failed["message"]

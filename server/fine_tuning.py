"""OpenAI's fine-tuning API as a view of reft-serve's training jobs: its request in, its job and event objects out.

Nothing here owns state. A `POST /v1/fine_tuning/jobs` becomes a `TrainingRequest` submitted to the one
`TrainingManager` (so `/v1/trainings` shows the same job), with what only this API knows (files, suffix, metadata)
kept in the job's `spec["fine_tuning"]`; every job and event object is computed from the job's `JobRecord`. The
mapping, field by field, is in docs/fine-tuning.md.

Names: the `suffix` becomes the intervention's name, which is also the job's `fine_tuned_model` (what `model`
takes in chat); without a suffix the name is `ft-` and 12 random hex digits. "auto" hyperparameters are the recipe's
(reft_core/recipe.py); `learning_rate_multiplier` scales the recipe's learning rate.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from adapters_store import InvalidNameError, validate_name
from adapters_store.jobs import JobRecord
from reft_core import recipe
from reft_core.config import MAX_RANK
from server.errors import APIError
from server.training_request import ExampleIn, TrainingRequest

Auto = Literal["auto"]
# the trainer takes learning rates up to 1, so the multiplier is bounded by the recipe's rate
MAX_LR_MULTIPLIER = 1 / recipe.LEARNING_RATE
STATUS = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
          "cancelled": "cancelled"}  # ours -> OpenAI's (files are validated before a job exists: no validating_files)


def _auto_or(kind: type[int] | type[float], low: float, high: float) -> Any:
    """A hyperparameter that is "auto" or a number of `kind` in (low, high] for floats, [low, high] for integers;
    one error at the field (a plain union would report each member's failure separately)."""
    def check(value: object) -> object:
        if value == "auto":
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and kind is float:
            if low < value <= high:  # type: ignore[operator]
                return float(value)  # type: ignore[arg-type]
        elif number and isinstance(value, int) and low <= value <= high:
            return value
        bounds = f"from {int(low)} to {int(high)}" if kind is int else f"above {low:g} and at most {high:g}"
        raise PydanticCustomError("auto_or_number", f'must be "auto" or {"an integer" if kind is int else "a number"} '
                                  f"{bounds}")
    return Annotated[Union[Auto, kind], PlainValidator(check, json_schema_input_type=Union[Auto, kind])]


class SupervisedHyperparameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n_epochs: _auto_or(int, 1, 1_000_000) = "auto"  # the server's max_training_epochs applies at submission
    batch_size: _auto_or(int, 1, 1024) = "auto"
    learning_rate_multiplier: _auto_or(float, 0, MAX_LR_MULTIPLIER) = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hyperparameters: SupervisedHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["supervised"] = "supervised"  # dpo and reinforcement do not apply to a ReFT persona
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(BaseModel):
    # unknown fields are ignored, as on every OpenAI-compatible endpoint (clients send `integrations`, ...)
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)] | None = None
    hyperparameters: SupervisedHyperparameters | None = None  # OpenAI's legacy place for them
    method: Method | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    # reft-serve's own settings (the SDK sends them with extra_body); None: the recipe's
    layers: list[int] | None = Field(None, min_length=1, max_length=256)
    rank: int | None = Field(None, ge=1, le=MAX_RANK)
    positions: str | None = Field(None, max_length=64)
    share_weights: bool | None = None
    replace: bool = False  # train a new version of an existing name (otherwise an existing suffix is a 409)
    description: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> FineTuningJobCreate:
        given = self.method is not None and self.method.supervised is not None and \
            self.method.supervised.hyperparameters is not None
        if given and self.hyperparameters is not None:
            raise ValueError("give hyperparameters in method.supervised.hyperparameters or in the legacy top-level "
                             "hyperparameters, not both")
        if self.metadata and any(len(key) > 64 for key in self.metadata):
            raise ValueError("metadata keys are at most 64 characters")
        return self

    def supervised(self) -> SupervisedHyperparameters:
        method = self.method.supervised if self.method is not None else None
        if method is not None and method.hyperparameters is not None:
            return method.hyperparameters
        return self.hyperparameters or SupervisedHyperparameters()


def intervention_name(suffix: str | None) -> str:
    """The suffix itself (it must be a valid intervention name), or `ft-<12 hex>` when none is given."""
    if suffix is None:
        return f"ft-{uuid.uuid4().hex[:12]}"
    try:
        return validate_name(suffix)
    except InvalidNameError as exc:
        raise APIError(400, f"suffix: {exc} (the suffix becomes the persona's name, used as `model`)",
                       param="suffix", code="invalid_name") from None


def training_request(
    body: FineTuningJobCreate, name: str, examples: list[ExampleIn], validation: list[ExampleIn] | None = None
) -> TrainingRequest:
    """The native request the job runs as; settings not given (or "auto") stay the recipe's. `validation` (the
    validation file's examples) becomes the native `validation_examples`: a validation loss every epoch."""
    h = body.supervised()
    hyperparameters: dict[str, Any] = {}
    if h.n_epochs != "auto":
        hyperparameters["epochs"] = h.n_epochs
    if h.batch_size != "auto":
        hyperparameters["batch_size"] = h.batch_size
    if h.learning_rate_multiplier != "auto":
        hyperparameters["learning_rate"] = recipe.LEARNING_RATE * h.learning_rate_multiplier
    if body.seed is not None:
        hyperparameters["seed"] = body.seed
    given = {"layers": body.layers, "rank": body.rank, "positions": body.positions,
             "share_weights": body.share_weights}
    return TrainingRequest.model_validate({
        "name": name, "examples": examples, "hyperparameters": hyperparameters, "replace": body.replace,
        "intervention": {key: value for key, value in given.items() if value is not None},
        "description": body.description,
        **({"validation_examples": validation} if validation is not None else {}),
    })


def fine_tuning_spec(body: FineTuningJobCreate, validation_examples: int | None) -> dict[str, Any]:
    """What the job's spec keeps of the request, for this view (the native spec has the rest)."""
    return {"training_file": body.training_file, "validation_file": body.validation_file, "suffix": body.suffix,
            "metadata": body.metadata, "validation_examples": validation_examples}


def unix(iso: str | None) -> int | None:
    """An ISO 8601 time of a record as OpenAI's integer unix seconds."""
    return None if iso is None else int(datetime.fromisoformat(iso).timestamp())


def hyperparameters_of(job: JobRecord) -> dict[str, Any]:
    h = job.spec["hyperparameters"]
    return {"n_epochs": h["epochs"], "batch_size": h["batch_size"],
            "learning_rate_multiplier": round(h["learning_rate"] / recipe.LEARNING_RATE, 6)}


def job_object(job: JobRecord, base_model_id: str) -> dict[str, Any]:
    """OpenAI's `fine_tuning.job` for one of our jobs (also one submitted to `/v1/trainings`: no files then)."""
    spec = job.spec.get("fine_tuning") or {}
    hyperparameters = hyperparameters_of(job)
    succeeded = job.status == "succeeded"
    tokens, epochs = job.spec.get("tokens"), job.progress.get("epoch")
    remaining = job.progress.get("remaining_s")
    return {
        "id": job.id, "object": "fine_tuning.job", "model": base_model_id, "organization_id": job.tenant,
        "created_at": unix(job.created_at), "finished_at": unix(job.finished_at), "status": STATUS[job.status],
        "fine_tuned_model": job.name if succeeded else None,
        "training_file": spec.get("training_file"), "validation_file": spec.get("validation_file"),
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "seed": job.spec["hyperparameters"]["seed"],
        "trained_tokens": tokens * epochs if succeeded and tokens is not None and epochs else None,
        "error": {"code": job.error_code or "training_failed", "message": job.error or "training failed", "param": None}
        if job.status == "failed" else None,
        "estimated_finish": int(time.time() + remaining) if job.status == "running" and remaining is not None
        else None,
        "result_files": [], "integrations": [], "metadata": spec.get("metadata"),
        "user_provided_suffix": spec.get("suffix"),
    }


def checkpoint_objects(job: JobRecord) -> list[dict[str, Any]]:
    """OpenAI's `fine_tuning.job.checkpoint` list: a succeeded job has one, the version it stored. Its
    `fine_tuned_model_checkpoint` is the pinned model string `name@N`, which keeps answering with exactly these
    weights after the name is retrained or another version is promoted. We do not snapshot versions during
    training (a persona trains in seconds to minutes), so earlier steps have no checkpoint; with `epochs: "auto"`
    the stored weights are those of the kept epoch, and the step and losses are that epoch's."""
    if job.status != "succeeded" or job.result_version is None:
        return []
    steps = len(job.losses)
    per_epoch = job.spec.get("steps_per_epoch") or 0
    kept_epoch = (job.auto_stop or {}).get("kept_epoch")
    step = min(steps, kept_epoch * per_epoch) if kept_epoch and per_epoch else steps
    metrics: dict[str, Any] = {"step": step}
    if step:
        metrics["train_loss"] = job.losses[step - 1]
    valid = (job.evaluation or {}).get("validation_loss")
    if valid is not None:
        metrics["full_valid_loss"] = valid
    return [{"id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{job.result_version}",
             "object": "fine_tuning.job.checkpoint", "created_at": unix(job.finished_at),
             "fine_tuned_model_checkpoint": f"{job.name}@{job.result_version}", "fine_tuning_job_id": job.id,
             "metrics": metrics, "step_number": step}]


Event = tuple[int, str, str, str, "dict[str, Any] | None"]  # (created_at, level, type, message, data)


def openai_events(job: JobRecord) -> list[dict[str, Any]]:
    """The job's events, oldest first, derived from its record. Ids are `ftevent-<job>-<n>`, n counting from the
    first: the record only grows, so an event keeps its id. A metrics event's time is approximate: the record
    keeps the time of the latest step only, so step k is placed at k/latest of the elapsed time."""
    created = unix(job.created_at) or 0
    finished = unix(job.finished_at) or created
    spec = job.spec.get("fine_tuning")
    events: list[Event] = [(created, "info", "message", f"Created fine-tuning job: {job.id}", None)]
    if spec is not None:
        events.append((created, "info", "message",
                       f"Validated training file: {spec['training_file']} ({job.spec['examples']} examples)", None))
        if spec.get("validation_file"):
            events.append((created, "info", "message", f"Validated validation file: {spec['validation_file']} "
                           f"({spec.get('validation_examples')} examples)", None))
    started = unix(job.started_at)
    if started is not None:
        events.append((started, "info", "message", "Fine-tuning job started", None))
        events += _metrics(job, started)
    if job.status == "succeeded":
        events.append((finished, "info", "message", f"New fine-tuned model created: {job.name}", None))
        events.append((finished, "info", "message", "The job has successfully completed", None))
    elif job.status == "failed":
        events.append((finished, "error", "message", f"Fine-tuning job failed: {job.error}", None))
    elif job.status == "cancelled":
        events.append((finished, "info", "message", "Fine-tuning job cancelled", None))
    prefix = f"ftevent-{job.id.removeprefix('ftjob-')}"
    return [{"id": f"{prefix}-{n}", "object": "fine_tuning.job.event", "created_at": at, "level": level,
             "type": kind, "message": message, "data": data}
            for n, (at, level, kind, message, data) in enumerate(events)]


def _metrics(job: JobRecord, started: int) -> list[Event]:
    """One event per step (train_loss), and after an epoch's last step its validation loss (`full_valid_loss`, as
    OpenAI names the loss over the whole validation file) once computed: it is computed before the next step, so
    the list only grows at its end and ids stay put."""
    total = job.progress.get("total_steps", len(job.losses))
    latest, elapsed = job.progress.get("step") or len(job.losses), job.progress.get("elapsed_s", 0.0)
    per_epoch = job.spec.get("steps_per_epoch") or 0
    events: list[Event] = []
    for step, loss in enumerate(job.losses, start=1):
        at = started + int(elapsed * step / latest)
        events.append((at, "info", "metrics", f"Step {step}/{total}: training loss={loss:.4f}",
                       {"step": step, "total_steps": total, "train_loss": loss}))
        epoch = step // per_epoch if per_epoch and step % per_epoch == 0 else 0
        if 0 < epoch <= len(job.validation_losses):
            valid = job.validation_losses[epoch - 1]
            events.append((at, "info", "metrics", f"Epoch {epoch}: validation loss={valid:.4f}",
                           {"step": step, "total_steps": total, "full_valid_loss": valid}))
    return events

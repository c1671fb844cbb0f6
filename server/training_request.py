"""What a client asks of a training job (`POST /v1/trainings`, and the JSONL upload that says the same): the
request models, with the defaults of the one recipe (reft_core/recipe.py), and how validation examples are held out.
"""

from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from reft_core import recipe
from reft_core.config import MAX_RANK
from reft_core.examples import ChatExample, Example
from server.errors import APIError
from server.evaluation import MAX_EVAL_PROMPTS
from server.settings import TRAINING_EXAMPLES_CEILING


class ExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ExampleIn:
        if self.messages is None and (not self.prompt or not self.completion):
            raise ValueError("each example needs a non-empty prompt and completion, or messages")
        if self.messages is not None:
            if len(self.messages) < 2 or self.messages[-1].get("role") != "assistant":
                raise ValueError("messages must end with the assistant turn to learn")
            if not all(isinstance(m.get("content"), str) and m.get("content") for m in self.messages):
                raise ValueError("every message needs non-empty text content")
        return self

    def as_chat(self) -> ChatExample:
        assert self.messages is not None
        return ChatExample(tuple((m.get("role", "user"), m["content"]) for m in self.messages))

    def as_example(self) -> Example | ChatExample:
        """The library's form of this example (what `reft_core.examples.tokenize_examples` takes)."""
        return self.as_chat() if self.messages is not None else Example(self.prompt or "", self.completion or "")


class InterventionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["loreft", "direft", "noreft"] = recipe.TYPE
    layers: list[int] | None = None  # default: the recipe's, relative to the model's depth
    rank: int = Field(recipe.RANK, ge=1, le=MAX_RANK)  # and at most the server's max_intervention_rank (at submit)
    positions: str = recipe.POSITIONS
    share_weights: bool = recipe.SHARE_WEIGHTS


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a count, or "auto": stop on a plateau of the validation loss (else the training loss), see early_stop.py
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = recipe.EPOCHS
    learning_rate: float = Field(recipe.LEARNING_RATE, gt=0, le=1)
    batch_size: int = Field(recipe.BATCH_SIZE, ge=1, le=1024)
    seed: int = Field(recipe.SEED, ge=0)


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # max_length is checked on the raw list before its items are validated (the configured limit comes after)
    examples: list[ExampleIn] = Field(min_length=1, max_length=TRAINING_EXAMPLES_CEILING)
    # held-out examples scored every epoch: given, or a fraction of `examples` chosen by the seed (not both)
    validation_examples: list[ExampleIn] | None = Field(None, min_length=1, max_length=TRAINING_EXAMPLES_CEILING)
    validation_split: float | None = Field(None, gt=0, lt=1)
    # prompts answered by the new persona and the bare model at the end (default: the validation prompts)
    eval_prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=2000)]] | None = Field(
        None, max_length=MAX_EVAL_PROMPTS)
    intervention: InterventionSpec = InterventionSpec()
    hyperparameters: Hyperparameters = Hyperparameters()
    chat_template: bool = True
    description: str | None = Field(None, max_length=2000)  # None: empty, or the current version's when replacing
    replace: bool = False  # store a new version if the name exists; otherwise an existing name is a 409 at submit


def split_validation(body: TrainingRequest) -> tuple[list[ExampleIn], list[ExampleIn]]:
    """(training, validation) examples: `validation_examples` as given, or `validation_split` of the examples held
    out by the seed (the same request always holds out the same ones); 400 when no training example would be left."""
    if body.validation_examples is not None and body.validation_split is not None:
        raise APIError(400, "give validation_examples or validation_split, not both", param="validation_split")
    if body.validation_split is None:
        return body.examples, body.validation_examples or []
    count = len(body.examples)
    held = max(1, round(count * body.validation_split))
    if count - held < 1:
        raise APIError(400, f"validation_split {body.validation_split} of {count} examples leaves no training "
                       "example", param="validation_split")
    chosen = set(random.Random(body.hyperparameters.seed).sample(range(count), held))
    return ([e for i, e in enumerate(body.examples) if i not in chosen],
            [e for i, e in enumerate(body.examples) if i in chosen])


def shown_prompt(example: ExampleIn) -> str:
    """The user's text of an example's prompt (its last turn before the answer, for messages)."""
    if example.messages is not None:
        return example.messages[-2]["content"]
    return example.prompt or ""

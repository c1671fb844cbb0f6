"""A training job's input, as stored with the job: everything a replica needs to run it besides the job's spec.

Tokenized at submit (so a worker never needs the request, and every replica trains on the same ids), as JSON (lists
of ints and strings), bounded by the request's limits (max_training_examples, max_example_tokens, MAX_EVAL_PROMPTS).
The job's spec holds the intervention config and hyperparameters; the record holds the tenant and name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reft_core.config import InterventionConfig
from reft_core.examples import TokenizedExample
from reft_core.trainer import TrainingConfig
from server.evaluation import EvalPrompt

FORMAT = 1  # bumped if the shape changes: a worker refuses (fails) an input it cannot read


@dataclass(frozen=True)
class TrainingInput:
    examples: tuple[TokenizedExample, ...]
    validation: tuple[TokenizedExample, ...]
    prompts: tuple[EvalPrompt, ...]  # answered by the persona and the bare model at the end
    description: str | None  # of the new version (None: the current version's, when replacing)
    replace: bool  # the name may exist (a new version); otherwise it must still be new when the job ends

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "examples": [_example(e) for e in self.examples],
            "validation": [_example(e) for e in self.validation],
            "prompts": [{"text": p.text, "prompt_ids": list(p.prompt_ids)} for p in self.prompts],
            "description": self.description, "replace": self.replace,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingInput:
        if data.get("format") != FORMAT:
            raise ValueError(f"training input format {data.get('format')!r}, this build reads {FORMAT}")
        return cls(
            examples=tuple(map(_tokenized, data["examples"])), validation=tuple(map(_tokenized, data["validation"])),
            prompts=tuple(EvalPrompt(p["text"], tuple(p["prompt_ids"])) for p in data["prompts"]),
            description=data["description"], replace=bool(data["replace"]),
        )


def job_configs(spec: dict[str, Any]) -> tuple[InterventionConfig, TrainingConfig]:
    """The intervention config and hyperparameters a job's spec records (as submit wrote them)."""
    return InterventionConfig.from_dict(spec["intervention"]), TrainingConfig(**spec["hyperparameters"])


def _example(example: TokenizedExample) -> list[list[int]]:
    return [list(example.prompt_ids), list(example.completion_ids)]


def _tokenized(pair: list[list[int]]) -> TokenizedExample:
    return TokenizedExample(tuple(pair[0]), tuple(pair[1]))

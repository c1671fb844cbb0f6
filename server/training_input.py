"""A training job's input: built from the request at submit (tokenized, checked against the limits) and stored
with the job, so any replica can run it.

Tokenized at submit (so a worker never needs the request, and every replica trains on the same ids), as JSON (lists
of ints and strings), bounded by the request's limits (max_training_examples, max_example_tokens, MAX_EVAL_PROMPTS).
The job's spec holds the intervention config and hyperparameters; the record holds the tenant and name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reft_core.config import InterventionConfig
from reft_core.examples import TokenizedExample, encode_chat_prompt, encode_prompt
from reft_core.frozen_context import ModelDims
from reft_core.trainer import TrainingConfig
from reft_core.training_memory import TrainingMemory, estimate_training_memory
from server.errors import APIError
from server.evaluation import MAX_EVAL_PROMPTS, EvalPrompt
from server.settings import Settings
from server.training_request import ExampleIn, TrainingRequest, shown_prompt

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


def tokenize(tokenizer: Any, examples: list[ExampleIn], chat_template: bool, param: str,
             max_example_tokens: int) -> list[TokenizedExample]:
    """Prompt and completion ids (with EOS) of each example; 400 naming the first one over the token limit."""
    tokenized = []
    eos = tokenizer.eos_token_id
    for index, example in enumerate(examples):
        if example.messages is not None:
            chat = example.as_chat()
            prompt_ids, completion = encode_chat_prompt(tokenizer, chat), chat.completion
        else:
            prompt_ids = encode_prompt(tokenizer, example.prompt or "", chat_template=chat_template)
            completion = example.completion or ""
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eos]
        if len(prompt_ids) + len(completion_ids) > max_example_tokens:
            raise APIError(400, f"example {index} has {len(prompt_ids) + len(completion_ids)} tokens; the limit "
                           f"is {max_example_tokens}", param=f"{param}.{index}")
        tokenized.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids)))
    return tokenized


def eval_prompts(tokenizer: Any, body: TrainingRequest, validation_in: list[ExampleIn],
                 validation: list[TokenizedExample], answer_tokens: int, limit: int) -> list[EvalPrompt]:
    """The prompts evaluated at the end: `eval_prompts`, else the first validation prompts, else none; 400 for a
    prompt that leaves no room for its `answer_tokens` within `limit`."""
    if body.eval_prompts is None:
        return [EvalPrompt(shown_prompt(e), t.prompt_ids) for e, t in zip(validation_in[:MAX_EVAL_PROMPTS], validation)]
    prompts = []
    for index, text in enumerate(body.eval_prompts):
        ids = encode_prompt(tokenizer, text, chat_template=body.chat_template)
        if len(ids) + answer_tokens > limit:
            raise APIError(400, f"eval prompt {index} has {len(ids)} tokens; with the {answer_tokens} tokens of its "
                           f"answer the limit is {limit}", param=f"eval_prompts.{index}")
        prompts.append(EvalPrompt(text, tuple(ids)))
    return prompts


def admit_memory(dims: ModelDims, config: InterventionConfig, examples: list[TokenizedExample], batch_size: int,
                 s: Settings) -> TrainingMemory:
    """The job's memory estimate; 400 when even recomputing every context leaves too much working memory.

    The kept part needs no check: the context budget caps it (recomputation replaces the rest).
    """
    memory = estimate_training_memory(dims, config, examples, batch_size=batch_size,
                                      context_budget_bytes=s.training_context_budget_bytes,
                                      max_micro_batch_tokens=s.training_max_micro_batch_tokens)
    if memory.working_bytes > s.max_training_working_bytes:
        raise APIError(400, f"this job's largest micro-batch needs about {_mib(memory.working_bytes)} of working "
                       f"memory; the limit (max_training_working_bytes) is {_mib(s.max_training_working_bytes)}: "
                       "use shorter examples, a smaller batch_size, or a higher lowest layer (fewer layers to run)",
                       param="examples", code="training_memory_exceeded")
    return memory


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"

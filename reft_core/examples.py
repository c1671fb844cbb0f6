"""Training examples: (prompt, completion) pairs turned into token ids the pyreft way.

The recipe: prompt (optionally wrapped in the model's chat template) + completion + EOS, with the loss on the
completion and EOS only. Prompt and completion are tokenised separately so the prompt length, and therefore the
intervened positions, are exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from reft_core.errors import InvalidConfigError


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatExample:
    """A conversation whose last turn (the assistant's) is the completion to learn; the turns before it are the
    prompt, rendered with the model's chat template."""

    messages: tuple[tuple[str, str], ...]  # (role, content), oldest first

    @property
    def completion(self) -> str:
        return self.messages[-1][1]


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # includes the trailing EOS

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.completion_ids


def render_prompt(tokenizer: Any, prompt: str, *, chat_template: bool) -> str:
    """The prompt text the model sees; with `chat_template` it is one user turn plus the assistant header."""
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer: Any, prompt: str, *, chat_template: bool) -> list[int]:
    return list(tokenizer(render_prompt(tokenizer, prompt, chat_template=chat_template), add_special_tokens=False)["input_ids"])


def encode_chat_prompt(tokenizer: Any, example: ChatExample) -> list[int]:
    """Every turn before the last, in the chat template, up to and including the assistant header."""
    turns = [{"role": role, "content": content} for role, content in example.messages[:-1]]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_examples(
    tokenizer: Any, examples: Iterable[Example | ChatExample], *, chat_template: bool = True
) -> list[TokenizedExample]:
    """`chat_template` applies to prompt/completion examples; a ChatExample always uses the template."""
    if tokenizer.eos_token_id is None:
        raise InvalidConfigError("the tokenizer has no EOS token: cannot build training targets")
    tokenized = []
    for index, example in enumerate(examples):
        if isinstance(example, ChatExample):
            prompt_ids = encode_chat_prompt(tokenizer, example)
        else:
            prompt_ids = encode_prompt(tokenizer, example.prompt, chat_template=chat_template)
        completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            raise InvalidConfigError(f"example {index}: the prompt is empty")
        if not completion_ids:
            raise InvalidConfigError(f"example {index}: the completion is empty")
        tokenized.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids) + (tokenizer.eos_token_id,)))
    if not tokenized:
        raise InvalidConfigError("at least one training example is required")
    return tokenized

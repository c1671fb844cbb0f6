"""A finished training job's evaluation: greedy answers of the new persona and of the bare model to a few prompts.

The prompts are the job's `eval_prompts`, else its validation prompts (up to `MAX_EVAL_PROMPTS`), else none. The
answers are ordinary greedy requests on the engine, each prompt once with the new intervention and once without,
so evaluating never stops serving (the engine batches them with everyone else's rows) and a sample is exactly what a
client would get from the persona with `temperature: 0`. `evaluate` blocks its caller until every answer is in: it
runs on a worker thread of the training manager, never on the engine's thread or the event loop.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

from server.engine.remote import EngineHandle
from server.engine.types import FinishReason, GenerationEvent, GenerationRequest, InterventionRef, SamplingParams

MAX_EVAL_PROMPTS = 8


@dataclass(frozen=True)
class EvalPrompt:
    text: str  # as shown in the sample (the user's text, not the templated prompt)
    prompt_ids: tuple[int, ...]


class _Answer:
    """Collects one request's events (engine thread) until the final one."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, event: GenerationEvent) -> None:
        self.parts.append(event.text)
        if event.finish_reason is not None:
            if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                self.error = event.error or event.finish_reason.value
            self.done.set()


def evaluate(
    engine: EngineHandle, prompts: list[EvalPrompt], ref: InterventionRef, *, max_tokens: int, timeout_s: float,
) -> list[dict[str, Any]]:
    """[{prompt, persona, base}] for each prompt, in order; raises RuntimeError if an answer failed or timed out."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    answers: list[tuple[_Answer, _Answer]] = []
    submitted: list[str] = []
    for prompt in prompts:
        pair = (_Answer(), _Answer())
        for answer, intervention in zip(pair, (ref, None)):
            request = GenerationRequest(f"eval-{uuid.uuid4().hex}", prompt.prompt_ids, params, intervention)
            submitted.append(request.request_id)
            engine.submit(request, answer)
        answers.append(pair)
    samples = []
    try:
        for prompt, pair in zip(prompts, answers):
            for answer in pair:
                if not answer.done.wait(timeout_s):
                    raise RuntimeError(f"evaluation timed out after {timeout_s:g} s")
                if answer.error is not None:
                    raise RuntimeError(f"evaluation failed: {answer.error}")
            persona, base = ("".join(a.parts) for a in pair)
            samples.append({"prompt": prompt.text, "persona": persona, "base": base})
    except RuntimeError:
        for request_id in submitted:  # nobody will read the rest: free their rows
            engine.cancel(request_id)
        raise
    return samples

"""Plain data crossing the boundary between HTTP handlers and the engine thread.

Handlers build a `GenerationRequest` (already tokenized, already validated) and receive `GenerationEvent`s; nothing
here references torch, so the HTTP side never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string / stop token
    LENGTH = "length"  # max_tokens reached or context full
    CANCELLED = "cancelled"  # client went away or asked to stop
    ERROR = "error"  # this request failed (the engine keeps running); `error_kind` says why


class ErrorKind(str, Enum):
    """Why a request failed: one value per outcome, mapped to an HTTP status in one table (server.generation)."""

    INTERNAL = "internal"  # something inside the engine failed for this request (unusable logits, a forward)
    SHUTDOWN = "shutdown"  # the server is draining or stopping
    ENGINE_DEAD = "engine_dead"  # the engine thread stopped; the process must be restarted
    TIMEOUT = "timeout"  # the request ran past request_timeout_s
    OVERLOADED = "overloaded"  # every engine replica's queue was full (Ray Serve): 429, retry shortly


class TrainingEnd(str, Enum):
    """Why a training job ended without an intervention (the job record's status follows from it, server.training)."""

    FAILED = "failed"  # set-up, a step or the result failed; the message says why
    CANCELLED = "cancelled"  # the owner cancelled it
    SHUTDOWN = "shutdown"  # the engine stopped (or died) before the job finished


@dataclass(frozen=True)
class TrainingFailure:
    kind: TrainingEnd
    message: str


SHUTDOWN_BEFORE_JOB_ENDED = TrainingFailure(TrainingEnd.SHUTDOWN, "the server shut down before the job finished")
CANCELLED_JOB = TrainingFailure(TrainingEnd.CANCELLED, "cancelled")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> disabled
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1 and 0 <= self.min_tokens <= self.max_tokens
        assert self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class InterventionRef:
    """Which intervention a request runs with; `key` (the artifact digest) identifies the exact version."""

    name: str
    key: str
    intervention: Any  # reft_core.Intervention; typed loosely so this module stays torch-free


@dataclass(frozen=True)
class ComposedRef:
    """Several interventions applied to one row in one forward (`model: "a+b"`), in this order: where two edit the
    same layer and position, the later one sees the earlier one's output (docs/architecture.md)."""

    parts: tuple[InterventionRef, ...]

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    intervention: InterventionRef | ComposedRef | None = None
    client_request_id: str | None = None  # the HTTP request's X-Request-Id, for the engine's log lines

    @property
    def parts(self) -> tuple[InterventionRef, ...]:
        """The interventions this request runs with, in the order they apply (empty: the bare model)."""
        if self.intervention is None:
            return ()
        return self.intervention.parts if isinstance(self.intervention, ComposedRef) else (self.intervention,)


@dataclass(frozen=True)
class GenerationEvent:
    """One increment of a request's output; the last one has `finish_reason` set."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None  # set when finish_reason is ERROR
    # on the final event: queue_s, prefill_s, decode_s, ttft_s, total_s, engine_s (seconds, measured by the engine)
    timings: dict[str, float] = field(default_factory=dict)

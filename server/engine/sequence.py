"""A sequence: one request's evolving state inside the engine (all per-request state lives on this object)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from server.engine.detokenizer import Detokenizer
from server.engine.sampler import RowSampling
from server.engine.speculative import NgramProposer
from server.engine.types import GenerationEvent, GenerationRequest

EventSink = Callable[[GenerationEvent], None]


class SequenceStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    sink: EventSink
    detokenizer: Detokenizer
    sampling: RowSampling
    status: SequenceStatus = SequenceStatus.WAITING
    slots: tuple[int, ...] = ()  # bank slots of the request's interventions, in the order they apply
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None  # given a batch row (queue time ends, prefill begins)
    first_token_at: float | None = None
    last_token_at: float | None = None
    proposer: NgramProposer | None = None  # speculative decoding's draft source, made when the row first needs it

    @classmethod
    def create(
        cls, seq_id: int, request: GenerationRequest, sink: EventSink, tokenizer: object,
        device: torch.device | str = "cpu",
    ) -> Sequence:
        params = request.params
        # the generator lives where the logits are, so drawing a seeded row's noise needs no host round trip
        generator = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
        return cls(
            seq_id=seq_id,
            request=request,
            sink=sink,
            detokenizer=Detokenizer(tokenizer, params.stop),
            sampling=RowSampling(params=params, generated=0, generator=generator),
        )

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

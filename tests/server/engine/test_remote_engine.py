"""The engine in its own process: same outputs as the reference (mixed batches, training), metrics relayed to the
API process, and a dead engine process fails everything at once."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
import torch

from reft_core.config import InterventionConfig
from reft_core.examples import TokenizedExample
from reft_core.generate import generate
from reft_core.trainer import ReftTrainer, TrainingConfig, train_intervention
from server.engine.engine import EngineSettings, TrainingTask
from server.engine.launch import launch
from server.engine.remote import EngineProcessSpec, RemoteEngine
from server.engine.types import (
    ComposedRef, ErrorKind, FinishReason, GenerationEvent, GenerationRequest, InterventionRef, SamplingParams,
)
from server.metrics import Metrics
from tests import tiny
from tests.builders import composed_reference_generate
from tests.reft_core.conftest import random_intervention

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [60, 61], [7, 7, 7, 100, 3, 1, 2], [1, 2, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model_dir(tmp_path_factory.mktemp("tiny-remote"))


def start(model_dir, **engine) -> RemoteEngine:
    remote = RemoteEngine(EngineProcessSpec(model_dir, "cpu", "float32", EngineSettings(**engine), "warning"), Metrics())
    remote.start(timeout=120)
    return remote


@pytest.fixture(scope="module")
def remote(model_dir):
    engine = start(model_dir, max_running=3)
    yield engine
    engine.stop()


class Collector:
    def __init__(self) -> None:
        self.events: dict[str, list[GenerationEvent]] = {}
        self._done: dict[str, threading.Event] = {}

    def sink(self, request_id: str):
        self.events[request_id], self._done[request_id] = [], threading.Event()

        def sink(event: GenerationEvent) -> None:
            self.events[request_id].append(event)
            if event.finish_reason is not None:
                self._done[request_id].set()
        return sink

    def wait(self, timeout: float = 60) -> None:
        for request_id, done in self._done.items():
            assert done.wait(timeout), f"request {request_id} did not finish"

    def tokens(self, request_id: str) -> list[int]:
        return [t for e in self.events[request_id] for t in e.token_ids]


def test_an_engine_process_launched_ahead_is_adopted_and_names_the_model_it_loaded(model_dir) -> None:
    """`reft-serve serve` launches the engine process before its own heavy imports; `RemoteEngine` then adopts
    that very process, waits for its model and learns where it loaded it from (for the tokenizer)."""
    launched = launch(EngineProcessSpec(model_dir, "cpu", "float32", EngineSettings(), "warning"))
    remote = RemoteEngine(launched, Metrics())
    try:
        info = remote.start(timeout=120)
        assert remote.pid == launched.process.pid and info.model_dir == model_dir
        collector = Collector()
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        remote.submit(GenerationRequest("r", tuple(PROMPTS[0]), params, None), collector.sink("r"))
        collector.wait()
        assert collector.tokens("r") == generate(tiny.tiny_llama(), [PROMPTS[0]], [None], max_new_tokens=5)[0]
    finally:
        remote.stop()
    assert not launched.process.is_alive()


def test_mixed_batch_in_the_engine_process_equals_the_reference(remote) -> None:
    model = tiny.tiny_llama()  # the same seed as the saved directory
    personas = [random_intervention(InterventionConfig(layers=(1,), rank=4, positions="l1"), seed=1, scale=3.0),
                random_intervention(InterventionConfig(layers=(0, 3), rank=2, positions="f1+l1"), seed=2, scale=3.0)]
    chosen = [personas[0], None, personas[1], personas[0]]
    collector = Collector()
    for i, (prompt, persona) in enumerate(zip(PROMPTS, chosen)):
        ref = InterventionRef(f"p{i}", f"key{id(persona)}", persona) if persona is not None else None
        request = GenerationRequest(str(i), tuple(prompt), SamplingParams(max_tokens=3 + 2 * i, temperature=0,
                                                                          ignore_eos=True), ref)
        remote.submit(request, collector.sink(str(i)))  # 4 requests, 3 rows: one joins as another leaves
    composed = ComposedRef(tuple(InterventionRef(f"c{i}", f"key{id(p)}", p) for i, p in enumerate(personas[::-1])))
    remote.submit(GenerationRequest("composed", tuple(PROMPTS[0]), SamplingParams(max_tokens=4, temperature=0,
                                    ignore_eos=True), composed), collector.sink("composed"))  # crosses the pipe too
    collector.wait()
    for i, (prompt, persona) in enumerate(zip(PROMPTS, chosen)):
        assert collector.tokens(str(i)) == generate(model, [prompt], [persona], max_new_tokens=3 + 2 * i)[0]
    assert collector.tokens("composed") == composed_reference_generate(model, PROMPTS[0], personas[::-1], 4)
    generated = sum(len(collector.tokens(str(i))) for i in range(len(PROMPTS)))
    deadline = time.time() + 5  # metrics ride with the events; the last batch may trail the final event by a moment
    while remote.metrics.tokens_generated._value.get() < generated and time.time() < deadline:
        time.sleep(0.01)
    assert remote.metrics.tokens_generated._value.get() >= generated
    assert remote.metrics.requests.labels(finish_reason="length")._value.get() >= len(PROMPTS)


def test_training_in_the_engine_process_equals_training_alone(remote) -> None:
    config = InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1")
    examples = [TokenizedExample((5, 6, 7, 8), (9, 10, 257)), TokenizedExample((1, 2, 3), (4, 257))]
    training = TrainingConfig(epochs=3, batch_size=2)
    alone = train_intervention(tiny.tiny_llama(), config, examples, training)
    finished: list = []
    done = threading.Event()

    def on_finish(result, losses, error) -> None:  # noqa: ANN001
        finished.append((result, losses, error))
        done.set()

    remote.submit_training(TrainingTask(
        "job", functools.partial(ReftTrainer, config=config, examples=examples, training=training),
        on_start=lambda total: None, on_progress=lambda p: None, on_finish=on_finish,
    ))
    assert done.wait(60)
    [(result, losses, error)] = finished
    assert error is None
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(alone.losses), rtol=1e-5, atol=1e-6)
    for unit in config.units():
        torch.testing.assert_close(result.units[unit].W, alone.intervention.units[unit].W, rtol=1e-4, atol=1e-5)


def test_a_killed_engine_process_fails_running_and_new_requests_at_once(model_dir) -> None:
    remote = start(model_dir)
    try:
        collector = Collector()
        request = GenerationRequest("long", (1, 2, 3), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        remote.submit(request, collector.sink("long"))
        deadline = time.time() + 30
        while not collector.events["long"] and time.time() < deadline:
            time.sleep(0.01)
        os.kill(remote.pid, signal.SIGKILL)
        collector.wait(10)
        final = collector.events["long"][-1]
        assert final.finish_reason is FinishReason.ERROR and final.error_kind is ErrorKind.ENGINE_DEAD
        assert remote.failure is not None and "exit code" in remote.failure and not remote.running
        late: list[GenerationEvent] = []
        remote.submit(GenerationRequest("late", (1,), SamplingParams(max_tokens=2)), late.append)
        assert late and late[0].error_kind is ErrorKind.ENGINE_DEAD
    finally:
        remote.stop()

"""The engine thread survives anything one request can cause; if it does die, requests fail at once.

Faults are injected into each verb of a step (admission / bank load, sampling, postprocessing, event delivery,
a whole step) and each test checks that the faulty row fails alone while the others are served exactly as without
the fault.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.config import InterventionConfig
from server.engine import engine as engine_module
from server.engine.engine import Engine, EngineSettings
from server.engine.sampler import RowSampling, sample
from server.engine.types import (
    ErrorKind, FinishReason, GenerationEvent, GenerationRequest, InterventionRef, SamplingParams,
)
from tests.reft_core.conftest import random_intervention

PROMPTS = [[5, 9, 17, 3], [60, 61, 62], [7, 7, 100, 3, 1], [1, 2, 3]]
VOCAB = 64

# Every value the API accepts (server.schemas.SamplingFields), with the awkward corners drawn more often.
temperatures = st.one_of(st.sampled_from([0.0, 1e-300, 5e-324, 1e-45, 1e-6, 1e-5, 2.0]), st.floats(0.0, 2.0))
top_ps = st.one_of(st.sampled_from([5e-324, 1e-300, 1e-9, 1.0]), st.floats(0.0, 1.0, exclude_min=True))
logit_values = st.one_of(
    st.floats(-3e38, 3e38), st.sampled_from([float("-inf"), -3.4e38, 3.4e38, 0.0]), st.floats(-10, 10)
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    rows=st.lists(
        st.tuples(temperatures, top_ps, st.integers(0, VOCAB + 5), st.integers(0, 3), st.integers(0, 3),
                  st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        min_size=1, max_size=6,
    ),
)
def test_sampling_never_raises_on_accepted_parameters(data, rows) -> None:
    samplings = []
    for temperature, top_p, top_k, min_tokens, generated, seed in rows:
        params = SamplingParams(max_tokens=4, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_tokens=min_tokens, seed=seed)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        samplings.append(RowSampling(params, generated, generator))
    logits = torch.tensor(
        [data.draw(st.lists(logit_values, min_size=VOCAB, max_size=VOCAB)) for _ in rows], dtype=torch.float32
    )
    tokens = sample(logits, samplings, eos_token_ids=[0, 1])
    assert len(tokens) == len(rows)
    for token, row_logits, row in zip(tokens, logits, samplings):
        usable = torch.isfinite(row_logits).any() and not (row_logits == float("inf")).any()
        assert (token is None) == (not usable)
        if token is not None:
            assert 0 <= token < VOCAB and row_logits[token] > float("-inf")
            if row.generated < row.params.min_tokens and torch.isfinite(row_logits[2:]).any():
                assert token not in (0, 1)


def test_a_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    tiny_rows = [RowSampling(SamplingParams(temperature=t), 0, None) for t in (1e-300, 5e-324, 1e-7)]
    assert sample(logits, tiny_rows, []) == logits.argmax(-1).tolist()


def test_a_seeded_row_does_not_depend_on_its_batch_mates() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))

    def seeded() -> RowSampling:
        return RowSampling(SamplingParams(temperature=1.0, seed=7), 0, torch.Generator().manual_seed(7))

    alone = sample(logits[2:3], [seeded()], [])
    mates = [RowSampling(SamplingParams(temperature=1.3), 0, None) for _ in range(2)]
    batched = sample(logits[[0, 1, 2, 3]], [mates[0], mates[1], seeded(), RowSampling(SamplingParams(), 0, None)], [])
    assert batched[2] == alone[0]


# -- the engine loop ---------------------------------------------------------------------------------------------

def request(i: int, *, intervention=None, max_tokens: int = 6, **params) -> GenerationRequest:
    ref = InterventionRef(f"p{i}", f"key{i}", intervention) if intervention is not None else None
    params = {"temperature": 0.0} | params
    return GenerationRequest(str(i), tuple(PROMPTS[i % len(PROMPTS)]), SamplingParams(max_tokens=max_tokens, **params),
                             ref)


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, GenerationEvent]:
    """Drive the engine on this thread; the final event of each request."""
    finals: dict[str, GenerationEvent] = {}
    tokens: dict[str, list[int]] = {}

    def sink_for(request_id: str):
        def sink(event: GenerationEvent) -> None:
            tokens.setdefault(request_id, []).extend(event.token_ids)
            if event.finish_reason is not None:
                finals[request_id] = event
        return sink

    engine.run_until_idle((r, sink_for(r.request_id)) for r in requests)
    assert set(finals) == {r.request_id for r in requests}
    return {rid: (event, tokens.get(rid, [])) for rid, event in finals.items()}


def healthy_outputs(model, tokenizer, requests) -> dict[str, list[int]]:
    return {rid: tokens for rid, (_, tokens) in run(Engine(model, tokenizer), requests).items()}


def test_a_tiny_temperature_request_is_served_and_so_is_the_next(model, tokenizer) -> None:
    engine = Engine(model, tokenizer)
    results = run(engine, [request(0, temperature=1e-300), request(1, temperature=1e-300, top_p=1e-300, top_k=3)])
    assert all(event.finish_reason is FinishReason.LENGTH for event, _ in results.values())
    assert run(engine, [request(2)])["2"][0].finish_reason is FinishReason.LENGTH


def test_a_failing_intervention_load_fails_that_request_only(model, tokenizer, monkeypatch) -> None:
    good = random_intervention(InterventionConfig(layers=(1,), rank=2, positions="l1"), seed=1, scale=3.0)
    bad = random_intervention(InterventionConfig(layers=(0, 2), rank=4, positions="f1+l1"), seed=2, scale=3.0)
    requests = [request(0, intervention=good), request(1, intervention=bad), request(2), request(3)]
    expected = healthy_outputs(model, tokenizer, [requests[0], requests[2], requests[3]])

    engine = Engine(model, tokenizer)
    original = engine.slots.bank.load

    def load(slot, intervention):  # fails half way through writing the bad one's layers
        if intervention is bad:
            raise RuntimeError("CUDA out of memory (injected)")
        return original(slot, intervention)

    monkeypatch.setattr(engine.slots.bank, "load", load)
    results = run(engine, requests)
    assert results["1"][0].finish_reason is FinishReason.ERROR and results["1"][0].error_kind is ErrorKind.INTERNAL
    assert {rid: tokens for rid, (_, tokens) in results.items() if rid != "1"} == expected
    assert engine.slots.resident == 1  # the failed load left no slot behind


def test_a_failing_detokenizer_or_sink_fails_that_row_only(model, tokenizer) -> None:
    requests = [request(i) for i in range(4)]
    expected = healthy_outputs(model, tokenizer, [requests[0], requests[3]])
    engine = Engine(model, tokenizer)
    finals: dict[str, GenerationEvent] = {}
    tokens: dict[str, list[int]] = {}

    def sink_for(request_id: str, broken: bool):
        def sink(event: GenerationEvent) -> None:
            if broken:
                raise RuntimeError("event loop is closed (injected)")
            tokens.setdefault(request_id, []).extend(event.token_ids)
            if event.finish_reason is not None:
                finals[request_id] = event
        return sink

    engine.submit(requests[0], sink_for("0", False))
    engine.submit(requests[1], sink_for("1", False))
    engine.submit(requests[2], sink_for("2", True))
    engine.submit(requests[3], sink_for("3", False))
    engine._apply_commands()
    seq = engine._by_request["1"]
    seq.detokenizer.add = lambda token: (_ for _ in ()).throw(UnicodeDecodeError("utf-8", b"", 0, 1, "injected"))
    while not engine.idle:
        engine.step()
        engine._apply_commands()
    assert finals["1"].finish_reason is FinishReason.ERROR
    assert {"0": tokens["0"], "3": tokens["3"]} == expected
    assert engine.scheduler.idle and engine.runner.row_ids == []


def test_a_failing_sampler_falls_back_to_rows_and_fails_only_the_bad_row(model, tokenizer, monkeypatch) -> None:
    requests = [request(0), request(1, temperature=0.7, seed=3), request(2)]
    expected = healthy_outputs(model, tokenizer, [requests[0], requests[2]])
    real_sample = engine_module.sample

    def flaky(logits, rows, eos):
        if any(r.params.seed == 3 for r in rows):
            raise RuntimeError("multinomial: invalid distribution (injected)")
        return real_sample(logits, rows, eos)

    monkeypatch.setattr(engine_module, "sample", flaky)
    results = run(Engine(model, tokenizer), requests)
    assert results["1"][0].finish_reason is FinishReason.ERROR
    assert {"0": results["0"][1], "2": results["2"][1]} == expected


def test_a_failing_step_fails_the_running_rows_and_the_engine_goes_on(model, tokenizer, monkeypatch) -> None:
    engine = Engine(model, tokenizer)
    finals: dict[str, GenerationEvent] = {}
    done = threading.Event()

    def sink(event: GenerationEvent) -> None:
        if event.finish_reason is not None:
            finals[str(len(finals))] = event
            done.set()

    original = engine._decode
    calls = {"n": 0}

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 1:  # the first decode step raises outside the forward's own handling
            raise IndexError("injected")
        return original()

    monkeypatch.setattr(engine, "_decode", broken_once)
    engine.start()
    try:
        engine.submit(request(0), sink)
        assert done.wait(10) and finals["0"].finish_reason is FinishReason.ERROR
        done.clear()
        engine.submit(request(1), sink)
        assert done.wait(10) and finals["1"].finish_reason is FinishReason.LENGTH
        assert engine.failure is None and engine.running
    finally:
        engine.stop()


def test_a_dead_engine_fails_waiting_and_new_requests_at_once(model, tokenizer, monkeypatch) -> None:
    engine = Engine(model, tokenizer, EngineSettings(max_running=1))
    monkeypatch.setattr(engine_module, "MAX_CONSECUTIVE_STEP_FAILURES", 3)
    monkeypatch.setattr(engine.scheduler, "admit", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    events: list[GenerationEvent] = []
    engine.start()
    try:
        engine.submit(request(0), events.append)
        deadline = time.time() + 10
        while engine.failure is None and time.time() < deadline:
            time.sleep(0.01)
        engine._thread.join(5)
        assert engine.failure is not None and "device lost" in engine.failure and not engine.running
        assert events and events[-1].error_kind is ErrorKind.ENGINE_DEAD
        late: list[GenerationEvent] = []
        engine.submit(request(1), late.append)  # answered on this thread, at once
        assert late and late[0].finish_reason is FinishReason.ERROR and late[0].error_kind is ErrorKind.ENGINE_DEAD
    finally:
        engine.stop()

"""Chunked prefill: a long prompt that arrives while rows decode is prefilled a chunk per iteration, and its output
(interventions at the right absolute positions across chunk boundaries included) equals a prefill in one forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.bank import InterventionBank
from reft_core.config import InterventionConfig
from reft_core.generate import generate
from server.engine.engine import Engine, EngineSettings
from server.engine.runner import ModelRunner, PrefillRow
from server.engine.types import GenerationEvent, GenerationRequest, InterventionRef, SamplingParams
from tests import tiny
from tests.reft_core.conftest import random_intervention

LONG_PROMPTS = [list(range(5, 5 + n)) for n in (17, 9, 23)]
RUNNING_PROMPT = [60, 61, 62]


@pytest.fixture(scope="module")
def personas():
    return [
        random_intervention(InterventionConfig(layers=(0, 3), rank=2, positions="f3+l3"), seed=1, scale=3.0),
        random_intervention(InterventionConfig(layers=(1,), rank=4, positions="f2+l2", share_weights=True), seed=2,
                            scale=3.0),
        None,
    ]


def _request(request_id: str, prompt, persona, max_tokens: int) -> GenerationRequest:
    ref = InterventionRef(request_id, f"key-{request_id}", persona) if persona is not None else None
    return GenerationRequest(request_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                       ignore_eos=True), ref)


class TokenSinks:
    """Sinks that collect each request's tokens, by request id."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}

    def sink(self, request_id: str):  # noqa: ANN201
        self.tokens[request_id] = []
        return lambda event: self.tokens[request_id].extend(event.token_ids)


def start_running_row(engine: Engine, sinks: TokenSinks, persona, max_tokens: int) -> None:  # noqa: ANN001
    """The "running" request, admitted and prefilled: it decodes from the engine's next step on."""
    engine.submit(_request("running", RUNNING_PROMPT, persona, max_tokens), sinks.sink("running"))
    engine._apply_commands()
    engine.step()


def run_with_chunks(model, personas, chunk: int, packed: bool) -> tuple[dict[str, list[int]], dict[str, int]]:
    """A row decodes; then the long prompts arrive. Returns tokens per request and the number of chunks prefilled
    in forwards of their own ("alone") and packed into decode forwards ("packed")."""
    engine = Engine(model, tiny.tiny_tokenizer(), EngineSettings(max_running=4, prefill_chunk_tokens=chunk))
    engine.runner.packs_chunks = packed
    chunks = {"alone": 0, "packed": 0}

    def counting(kind: str, forward):  # noqa: ANN001, ANN202
        def counted(*args):  # noqa: ANN202
            chunks[kind] += 1
            return forward(*args)
        return counted

    engine.runner.prefill_chunk = counting("alone", engine.runner.prefill_chunk)
    engine.runner.decode_with_chunks = counting("packed", engine.runner.decode_with_chunks)
    sinks = TokenSinks()
    start_running_row(engine, sinks, personas[0], 40)
    engine.run_until_idle(
        (_request(str(i), prompt, persona, 6), sinks.sink(str(i)))
        for i, (prompt, persona) in enumerate(zip(LONG_PROMPTS, personas))
    )
    return sinks.tokens, chunks


@pytest.mark.parametrize("packed", [True, False], ids=["packed into decode", "alone"])
@pytest.mark.parametrize("chunk", [1, 2, 5, 8])
def test_chunked_prefill_equals_prefill_in_one_forward(model, personas, chunk, packed) -> None:
    tokens, chunks = run_with_chunks(model, personas, chunk, packed)
    assert sum(chunks.values()) > len(LONG_PROMPTS), "the long prompts should have been prefilled in several chunks"
    assert (chunks["packed"] > 0) == packed
    for i, (prompt, persona) in enumerate(zip(LONG_PROMPTS, personas)):
        assert tokens[str(i)] == generate(model, [prompt], [persona], max_new_tokens=6)[0]
    assert tokens["running"] == generate(model, [RUNNING_PROMPT], [personas[0]], max_new_tokens=40)[0]


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 30), chunk=st.integers(1, 12), persona_index=st.integers(0, 2))
def test_chunk_logits_equal_whole_prefill_logits(model, personas, length, chunk, persona_index) -> None:
    prompt = [(7 * i + 3) % 250 for i in range(length)]
    persona = personas[persona_index]
    bank = InterventionBank.for_interventions([persona] if persona else [], num_layers=4)
    slot = 1 if persona else 0
    whole = ModelRunner(model, bank, 257).prefill([PrefillRow(0, prompt, slot)])
    runner = ModelRunner(model, bank, 257)
    runner.begin_chunked_prefill(PrefillRow(0, prompt, slot))
    logits = None
    while logits is None:
        logits = runner.prefill_chunk(0, chunk)
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-5)
    assert runner.row_ids == [0]


def test_rows_joining_while_others_decode_ride_in_the_decode_forward(model, personas) -> None:
    """Short prompts admitted while rows decode are packed whole into the decode forward (several side by side,
    each with its own intervention), and every row's tokens equal its generation alone."""
    engine = Engine(model, tiny.tiny_tokenizer(), EngineSettings(max_running=8))
    packed_pieces: list[int] = []
    original = engine.runner.decode_with_chunks

    def counted(last_tokens, chunks, joins):  # noqa: ANN001, ANN202
        packed_pieces.append(len(chunks) + len(joins))
        return original(last_tokens, chunks, joins)

    engine.runner.decode_with_chunks = counted
    sinks = TokenSinks()
    tokens = sinks.tokens
    start_running_row(engine, sinks, personas[0], 30)
    engine.step()  # a plain decode step, timed: from now on joining prompts are packed
    joining = [([70 + i, 71 + i, 72 + i, 73 + i][: 2 + i], personas[i % 3]) for i in range(3)]
    engine.run_until_idle((_request(str(i), prompt, persona, 5), sinks.sink(str(i)))
                          for i, (prompt, persona) in enumerate(joining))
    assert packed_pieces == [3], "the three prompts should have joined in one packed forward"
    for i, (prompt, persona) in enumerate(joining):
        assert tokens[str(i)] == generate(model, [prompt], [persona], max_new_tokens=5)[0]
    assert tokens["running"] == generate(model, [RUNNING_PROMPT], [personas[0]], max_new_tokens=30)[0]


@pytest.mark.parametrize("speculative", [0, 4], ids=["plain", "speculative"])
def test_long_prompts_decode_in_their_own_cache_and_equal_alone(model, personas, speculative) -> None:
    """Long prompts (here: 9 tokens or more) are prefilled into the staging cache, even with nothing decoding, and
    decode there among short rows; every row's tokens equal its generation alone, and the slot cache never holds a
    long row (with speculative decoding on, nothing drafts while long rows decode)."""
    settings_ = EngineSettings(max_running=8, long_row_tokens=9, speculative_tokens=speculative,
                               speculative_min_acceptance=0.0, speculative_step_tokens=64)
    engine = Engine(model, tiny.tiny_tokenizer(), settings_)
    steps_with_long_rows: list[bool] = []
    original = engine.runner.decode

    def watched(last_tokens):  # noqa: ANN001, ANN202
        ids = engine.runner.row_ids
        long_ids = [i for i in ids if engine.scheduler.running[i].prompt_len >= 9]
        assert ids[len(ids) - len(long_ids) :] == long_ids  # after the slot cache's rows: in the staging cache
        assert engine.runner.drafts_allowed == (not long_ids)
        steps_with_long_rows.append(bool(long_ids))
        return original(last_tokens)

    engine.runner.decode = watched
    sinks = TokenSinks()
    jobs = [(LONG_PROMPTS[0], personas[0], 12), ([60, 61, 62], personas[1], 15), (LONG_PROMPTS[1], None, 7),
            ([9, 9, 9, 9], None, 10), (LONG_PROMPTS[2], personas[1], 9)]
    engine.run_until_idle((_request(str(i), prompt, persona, n), sinks.sink(str(i)))
                          for i, (prompt, persona, n) in enumerate(jobs))
    for i, (prompt, persona, n) in enumerate(jobs):
        assert sinks.tokens[str(i)] == generate(model, [prompt], [persona], max_new_tokens=n)[0]
    assert any(steps_with_long_rows) and engine.runner.cache_bytes == 0


def test_a_packed_forward_failing_midway_fails_its_rows_and_leaves_no_cache_behind(model, personas,
                                                                                   monkeypatch) -> None:
    """A packed forward raises after some layers wrote the decoding rows' keys, the joining rows' new slots and a
    chunk: every running row fails (the joining ones too, whose slots already exist), the runner is left with no
    rows and no cache, and the next requests equal their generation alone."""
    from server.engine import packed

    engine = Engine(model, tiny.tiny_tokenizer(), EngineSettings(max_running=8, prefill_chunk_tokens=4))
    finals: dict[str, GenerationEvent] = {}
    tokens: dict[str, list[int]] = {}

    def sink(request_id: str):  # noqa: ANN202
        def collect(event: GenerationEvent) -> None:
            tokens.setdefault(request_id, []).extend(event.token_ids)
            if event.finish_reason is not None:
                finals[request_id] = event
        return collect

    engine.submit(_request("running", RUNNING_PROMPT, personas[0], 30), sink("running"))
    engine._apply_commands()
    engine.step()
    engine.step()  # a plain decode step, timed: from now on joining prompts are packed
    original, calls = packed.PackedCaches.update, {"n": 0}

    def failing(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:  # the third layer of the first packed forward
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(packed.PackedCaches, "update", failing)
    for i, prompt in enumerate(([70, 71], [72, 73, 74], LONG_PROMPTS[0])):
        engine.submit(_request(f"join{i}", prompt, personas[i % 3], 5), sink(f"join{i}"))
    engine._apply_commands()
    engine.step()
    assert calls["n"] == 3 and set(finals) == {"running", "join0", "join1", "join2"}
    assert all(event.finish_reason.value == "error" for event in finals.values())
    assert engine.runner.row_ids == [] and engine.runner.cache_bytes == 0 and engine.runner.cache_lengths == {}
    monkeypatch.setattr(packed.PackedCaches, "update", original)
    engine.run_until_idle((_request(f"after{i}", prompt, persona, 5), sink(f"after{i}"))
                          for i, (prompt, persona) in enumerate(zip(LONG_PROMPTS, personas)))
    for i, (prompt, persona) in enumerate(zip(LONG_PROMPTS, personas)):
        assert tokens[f"after{i}"] == generate(model, [prompt], [persona], max_new_tokens=5)[0]

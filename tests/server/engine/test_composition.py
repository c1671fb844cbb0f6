"""Composed personas in the engine (`a+b`: one row, several interventions in order) and residency bounded in bytes.

Composed rows, single rows and bare rows in one continuously batched run each equal a plain-hook reference that
applies the parts one after another (tests.builders); a long composed prompt prefilled in chunks does too. With
`max_resident_bank_bytes` the bank's tables never exceed the bound, not even during a load, evicted interventions
reload transparently (outputs unchanged), and interventions in use are never evicted.
"""

from __future__ import annotations

import pytest

from reft_core.bank import InterventionBank
from reft_core.config import InterventionConfig
from reft_core.generate import generate
from server.engine.engine import Engine, EngineSettings
from server.engine.residency import SlotTable
from server.engine.types import ComposedRef, GenerationEvent, GenerationRequest, InterventionRef, SamplingParams
from tests import tiny
from tests.builders import composed_reference_generate
from tests.reft_core.conftest import random_intervention

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [60, 61, 62], [7, 7, 7, 100, 3, 1, 2, 3, 4, 5, 6, 99], [1, 2, 3, 4], [9, 9, 9, 9]]


@pytest.fixture(scope="module")
def personas():
    return [
        random_intervention(InterventionConfig(layers=(1,), rank=4, positions="l1"), seed=1, scale=3.0),
        random_intervention(InterventionConfig(layers=(1, 3), rank=2, positions="f1+l1"), seed=2, scale=3.0),
        random_intervention(InterventionConfig(layers=(0, 1), rank=8, positions="f2+l2", type="direft"), seed=3,
                            scale=3.0),
        random_intervention(InterventionConfig(layers=(2,), rank=6, positions="l2"), seed=4, scale=3.0),
    ]


def ref(persona) -> InterventionRef:
    return InterventionRef(f"p{id(persona)}", f"key{id(persona)}", persona)


def request(i: int, prompt, parts, max_tokens: int) -> GenerationRequest:
    target = None if not parts else ref(parts[0]) if len(parts) == 1 else ComposedRef(tuple(ref(p) for p in parts))
    return GenerationRequest(str(i), tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                   ignore_eos=True), target)


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    engine.run_until_idle((r, lambda e, out=tokens[r.request_id]: out.extend(e.token_ids)) for r in requests)
    return tokens


def test_composed_single_and_bare_rows_in_one_run_equal_the_reference(model, tokenizer, personas) -> None:
    a, b, c, d = personas
    chosen = [[a, b], [b, a], [a], [], [c, a, d, b]]
    engine = Engine(model, tokenizer, EngineSettings(max_running=3, resident_interventions=4))
    requests = [request(i, p, parts, max_tokens=2 + i) for i, (p, parts) in enumerate(zip(PROMPTS, chosen))]
    out = run(engine, requests)
    for i, (prompt, parts) in enumerate(zip(PROMPTS, chosen)):
        assert out[str(i)] == composed_reference_generate(model, prompt, parts, 2 + i), i
    assert out["0"] != out["2"]  # b really changed a's output
    assert engine.slots.loads == 4  # a part shared between requests is loaded once


def test_a_composed_prompt_prefilled_in_chunks_equals_the_reference(model, tokenizer, personas) -> None:
    a, b, c, _ = personas
    engine = Engine(model, tokenizer, EngineSettings(max_running=4, prefill_chunk_tokens=3))
    out: dict[str, list[int]] = {"running": [], "long": []}
    engine.submit(request(0, PROMPTS[1], [a], 30), lambda e: out["running"].extend(e.token_ids))
    engine._apply_commands()
    engine.step()  # a row is decoding: the long prompt that arrives now is chunked
    long_prompt = PROMPTS[2] + PROMPTS[0]
    engine.submit(request(1, long_prompt, [c, a, b], 6), lambda e: out["long"].extend(e.token_ids))
    engine.run_until_idle([])
    assert out["long"] == composed_reference_generate(model, long_prompt, [c, a, b], 6)


def test_bank_bytes_stay_bounded_and_evicted_personas_reload_transparently(model, tokenizer, personas) -> None:
    probe = InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=5)
    probe.load(1, personas[2])
    bound = probe.nbytes_with(2, personas[3])  # room for about two of them at a time
    engine = Engine(model, tokenizer, EngineSettings(max_running=2, resident_interventions=4,
                                                     max_resident_bank_bytes=bound))
    peak = 0
    resize = engine.slots.bank._resize_layer

    def watched(*args) -> None:  # noqa: ANN002 - every table allocation goes through here
        nonlocal peak
        resize(*args)
        peak = max(peak, engine.slots.bank.nbytes)

    engine.slots.bank._resize_layer = watched
    order = [0, 1, 2, 3, 0, 2, 1]
    requests = [request(i, PROMPTS[i % len(PROMPTS)], [personas[p]], 4) for i, p in enumerate(order)]
    out = run(engine, requests)
    for i, p in enumerate(order):
        assert out[str(i)] == generate(model, [PROMPTS[i % len(PROMPTS)]], [personas[p]], max_new_tokens=4)[0]
    assert 0 < peak <= bound
    assert engine.slots.evictions > 0 and engine.slots.loads > len(personas)  # some were evicted and came back


def test_residency_is_all_or_nothing_and_never_evicts_what_runs(personas) -> None:
    a, b, c, d = personas
    bank = InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=4)
    probe = InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=4)
    probe.load(1, c)
    slots = SlotTable(bank, max_bytes=probe.nbytes_with(2, d))
    first = slots.acquire_all([("c", c), ("d", d)])
    assert first is not None and slots.nbytes <= slots.max_bytes
    assert slots.acquire_all([("a", a), ("b", b)]) is None  # c and d are in use: no room, nothing left pinned
    assert slots.resident == 2 and slots.evictions == 0
    slots.release_all(first[::-1])  # d is now the least recently used
    second = slots.acquire_all([("c", c), ("a", a)])  # c is still resident (not reloaded); d makes room for a
    assert second is not None and second[0] == first[0] and slots.loads == 3 and slots.evictions == 1
    assert slots.nbytes <= slots.max_bytes
    slots.release_all(second)

    load = bank.load

    def failing_load(slot: int, intervention) -> None:  # noqa: ANN001
        load(slot, intervention)
        if intervention is b:
            raise RuntimeError("the device ran out of memory")

    bank.load = failing_load
    with pytest.raises(RuntimeError):
        slots.acquire_all([("a", a), ("b", b)])
    assert slots.pinned == 0 and slots.resident == 1  # `a` is unpinned again; c made room for b, whose slot was cleared


def test_composed_requests_alone_over_the_byte_bound_still_run(model, tokenizer, personas) -> None:
    """A bound smaller than one request's interventions would otherwise keep it waiting forever."""
    engine = Engine(model, tokenizer, EngineSettings(max_running=2, max_resident_bank_bytes=1))
    out = run(engine, [request(0, PROMPTS[0], personas[:3], 3)])
    assert out["0"] == composed_reference_generate(model, PROMPTS[0], personas[:3], 3)

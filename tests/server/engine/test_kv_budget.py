"""The running batch's KV cache stays within its budget: the slot cache's buffers (row capacity x column capacity)
never outgrow it, rows wait for room instead, and outputs are unchanged."""

from __future__ import annotations

from reft_core.frozen_context import ModelDims
from reft_core.generate import generate
from server.engine.kv_cache import capacity_bytes
from server.engine.engine import Engine, EngineSettings
from server.engine.types import GenerationRequest, SamplingParams
from tests import tiny

SHORT = [[5, 9, 17], [60, 61], [7, 7, 100], [1, 2, 3, 4], [9, 9], [200, 3, 4]]
LONG = [10 + i % 200 for i in range(200)]  # with 8 new tokens: 256 columns, twice the short rows' 128


def test_the_batch_kv_cache_never_exceeds_its_budget_and_outputs_are_unchanged() -> None:
    model, tokenizer = tiny.tiny_llama(), tiny.tiny_tokenizer()
    per_token = ModelDims.from_model(model).kv_bytes_per_token(tiny.LAYERS)
    budget = capacity_bytes(4, len(LONG) + 8, per_token)  # four rows as wide as the long one, or eight short ones
    prompts = [*SHORT[:3], LONG, *SHORT[3:]]
    requests = [GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    engine = Engine(model, tokenizer, EngineSettings(max_running=8, kv_cache_budget_bytes=budget))
    for request in requests:
        engine.submit(request, lambda event, key=request.request_id: tokens[key].extend(event.token_ids))
    engine._apply_commands()
    peak, rows_beside_long, most_rows = 0, 0, 0
    while not engine.idle:
        engine.step()
        peak = max(peak, engine.runner.cache_bytes)
        most_rows = max(most_rows, len(engine.runner.row_ids))
        if engine.runner.cache_allocated[1] > len(LONG):
            rows_beside_long = max(rows_beside_long, len(engine.runner.row_ids))
    assert peak <= budget, (peak, budget)
    assert rows_beside_long == most_rows == 4  # the long row's columns limited the batch to four of seven rows
    for request, prompt in zip(requests, prompts):
        assert tokens[request.request_id] == generate(model, [prompt], [None], max_new_tokens=8)[0]


def test_without_a_budget_every_row_is_admitted_and_keeps_its_own_length() -> None:
    """What the budget prevents (and why the test above can fail): with no bound every row joins at once and the
    buffers take the long row's columns for every slot; each row's own length is still its own."""
    model, tokenizer = tiny.tiny_llama(), tiny.tiny_tokenizer()
    prompts = [*SHORT[:3], LONG, *SHORT[3:]]
    engine = Engine(model, tokenizer, EngineSettings(max_running=8))
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=4, temperature=0)), lambda e: None)
    engine._apply_commands()
    engine.step()
    assert len(engine.runner.row_ids) == len(prompts) and engine.runner.cache_allocated == (8, 256)
    assert sorted(engine.runner.cache_lengths.values()) == sorted(len(p) + 1 for p in prompts)


def test_a_long_row_is_counted_in_its_own_cache_so_short_rows_fit_beside_it() -> None:
    """With LONG a long row (it decodes in a cache of its own), the budget that held four rows as wide as LONG
    holds all seven: six short rows at 128 columns and LONG alone at 256; outputs unchanged."""
    model, tokenizer = tiny.tiny_llama(), tiny.tiny_tokenizer()
    per_token = ModelDims.from_model(model).kv_bytes_per_token(tiny.LAYERS)
    budget = capacity_bytes(8, 128, per_token) + 256 * per_token  # the slot cache for 8 short rows + LONG alone
    assert budget < capacity_bytes(8, len(LONG) + 8, per_token)  # in the slot cache, seven rows would not fit
    prompts = [*SHORT[:3], LONG, *SHORT[3:]]
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    engine = Engine(model, tokenizer, EngineSettings(max_running=8, kv_cache_budget_bytes=budget, long_row_tokens=100))
    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), tuple(prompt), SamplingParams(max_tokens=8, temperature=0,
                                                                              ignore_eos=True)),
                      lambda event, key=str(i): tokens[key].extend(event.token_ids))
    engine._apply_commands()
    peak, most_admitted = 0, 0
    while not engine.idle:
        engine.step()
        peak = max(peak, engine.runner.cache_bytes)
        most_admitted = max(most_admitted, len(engine.scheduler.running))
    assert peak <= budget, (peak, budget)
    assert most_admitted == len(prompts)  # all admitted at once (LONG prefilled in chunks while the others decode)
    for i, prompt in enumerate(prompts):
        assert tokens[str(i)] == generate(model, [prompt], [None], max_new_tokens=8)[0]

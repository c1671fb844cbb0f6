"""The running batch's KV cache stays within its budget: a long prompt among short ones waits for room instead of
making every row pay for its columns, and outputs are unchanged."""

from __future__ import annotations

from reft_core.frozen_context import ModelDims
from reft_core.generate import generate
from server.engine.engine import Engine, EngineSettings
from server.engine.types import GenerationRequest, SamplingParams
from tests import tiny

SHORT = [[5, 9, 17], [60, 61], [7, 7, 100], [1, 2, 3, 4], [9, 9], [200, 3, 4]]
LONG = list(range(10, 130))  # 120 tokens


def cache_bytes(engine: Engine) -> int:
    cache = engine.runner._cache
    if cache is None:
        return 0
    return sum(layer._key_buffer.nbytes + layer._value_buffer.nbytes
               for layer in cache.layers if getattr(layer, "is_initialized", False))


def test_the_batch_kv_cache_never_exceeds_its_budget_and_outputs_are_unchanged() -> None:
    model, tokenizer = tiny.tiny_llama(), tiny.tiny_tokenizer()
    per_token = ModelDims.from_model(model).kv_bytes_per_token(tiny.LAYERS)
    budget = 2 * 3 * (len(LONG) + 8) * per_token  # room for three rows as wide as the long one
    prompts = [*SHORT[:3], LONG, *SHORT[3:]]
    requests = [GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    engine = Engine(model, tokenizer, EngineSettings(max_running=8, kv_cache_budget_bytes=budget))
    for request in requests:
        engine.submit(request, lambda event, key=request.request_id: tokens[key].extend(event.token_ids))
    engine._apply_commands()
    peak, widest_rows = 0, 0
    while not engine.idle:
        engine.step()
        peak = max(peak, cache_bytes(engine))
        if engine.runner.cache_columns > len(LONG):
            widest_rows = max(widest_rows, len(engine.runner.row_ids))
    assert peak <= budget, (peak, budget)
    assert 1 <= widest_rows <= 3  # rows sharing the long prompt's width were limited by the budget
    for request, prompt in zip(requests, prompts):
        assert tokens[request.request_id] == generate(model, [prompt], [None], max_new_tokens=8)[0]


def test_without_a_budget_every_row_shares_the_long_width() -> None:
    """What the budget prevents (and why the test above can fail): all rows pay the long prompt's columns."""
    model, tokenizer = tiny.tiny_llama(), tiny.tiny_tokenizer()
    engine = Engine(model, tokenizer, EngineSettings(max_running=8))
    prompts = [*SHORT[:3], LONG, *SHORT[3:]]
    engine.run_until_idle(
        (GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=2, temperature=0)), lambda e: None)
        for i, p in enumerate(prompts)
    )
    assert engine.metrics.running_rows._value.get() == 0
    engine = Engine(model, tokenizer, EngineSettings(max_running=8))
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=4, temperature=0)), lambda e: None)
    engine._apply_commands()
    engine.step()
    assert len(engine.runner.row_ids) == len(prompts) and engine.runner.cache_columns > len(LONG)

"""The slot KV cache: rows joining (whole or in chunks) and leaving in any order give every row the tokens and the
logits it gets alone; a row's slot holds exactly its own tokens (no widening by others); capacity grows by powers
of two and the scheduler's budget counts exactly what is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.config import InterventionConfig
from reft_core.frozen_context import ModelDims
from reft_core.generate import generate
from reft_core.hooks import editing_layers
from server.engine.kv_cache import MIN_COLUMNS, MIN_ROWS, capacity, capacity_bytes
from server.engine.runner import LONG_GROUP_SLACK, ModelRunner, PrefillRow
from server.engine.scheduler import KVBudget
from tests import tiny
from tests.builders import random_intervention

PAD = 257
INF = float("inf")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    model = tiny.tiny_llama()
    model.config._attn_implementation = request.param  # the runner's 4D mask must suit both
    return model


@pytest.fixture(scope="module")
def personas():
    return [
        None,
        random_intervention(InterventionConfig(layers=(0, 3), rank=2, positions="f3+l3"), seed=1, scale=3.0),
        random_intervention(InterventionConfig(layers=(1,), rank=4, positions="f2+l2", share_weights=True), seed=2,
                            scale=3.0),
    ]


@dataclass
class Job:
    """One sequence of a schedule: joins at step `join` (whole, or in chunks of `chunk` tokens), leaves after
    `tokens` tokens or, if `leave` is set, at that step (cancelled)."""

    prompt: list[int]
    persona: int
    tokens: int
    join: int
    chunk: int | None = None
    leave: int | None = None
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def run_schedule(model, bank: InterventionBank, jobs: list[Job], packed: bool = False,
                 long_row_tokens: int = 512, long_group_slack: float = LONG_GROUP_SLACK) -> ModelRunner:
    """Drive a runner through the schedule the way the engine does: joins, one chunk per chunked row, a decode.
    With `packed`, whenever rows decode, the prompts joining whole (into new slot cache rows) and every chunked
    row's chunk ride in the decode forward (several pieces side by side). Prompts of `long_row_tokens` or more prefilled in chunks (or packed)
    stay in the staging cache and decode there as long rows."""
    runner = ModelRunner(model, bank, PAD, long_row_tokens=long_row_tokens, long_group_slack=long_group_slack)
    live: dict[int, Job] = {}
    chunking: dict[int, Job] = {}

    def take(seq_id: int, logits: torch.Tensor) -> None:
        job = live[seq_id]
        job.out.append(int(logits.argmax()))
        job.logits.append(logits)
        if len(job.out) == job.tokens:
            runner.release([seq_id])
            del live[seq_id]

    step = 0
    while step <= max(j.join for j in jobs) or live:
        for seq_id, job in enumerate(jobs):
            if job.leave is not None and job.leave == step and seq_id in live:
                runner.release([seq_id])
                del live[seq_id]
                chunking.pop(seq_id, None)
        whole = [(i, j) for i, j in enumerate(jobs) if j.join == step and j.chunk is None]
        packing = packed and bool(runner.row_ids)
        pieces, joins = {}, []
        for i, job in enumerate(jobs):
            if job.join == step and job.chunk is not None:
                live[i], chunking[i] = job, job
                runner.begin_chunked_prefill(PrefillRow(i, job.prompt, job.persona))
        if packing:
            joins, whole = whole, []
            live.update(joins)
            pieces = {i: job.chunk for i, job in chunking.items()}
        if whole:
            live.update(whole)
            logits = runner.prefill([PrefillRow(i, j.prompt, j.persona) for i, j in whole])
            for (i, _), row in zip(whole, logits):
                take(i, row)
        for i, job in list(chunking.items()):
            if i in pieces:
                continue
            logits = runner.prefill_chunk(i, job.chunk)
            if logits is not None:
                del chunking[i]
                take(i, logits[0])
        decoding = [i for i in runner.row_ids if live[i].out]
        assert decoding == runner.row_ids  # every decoding row has a token to feed
        if packing and (pieces or joins):
            rows, first, joined = runner.decode_with_chunks([live[i].out[-1] for i in decoding], list(pieces.items()),
                                                            [PrefillRow(i, j.prompt, j.persona) for i, j in joins])
            for i, logits in zip(pieces, first):
                if logits is not None:
                    del chunking[i]
                    take(i, logits[0])
            for (i, _), logits in zip(joins, joined if joins else ()):
                take(i, logits)
        elif decoding:
            rows = runner.decode([live[i].out[-1] for i in decoding])
        for i, row in zip(decoding, rows if decoding else ()):
            take(i, row)
        step += 1
    return runner


def reference_logits(model, bank: InterventionBank, job: Job) -> torch.Tensor:
    """The next-token logits at every generated position, from one forward over prompt + tokens, without a cache."""
    tokens = job.prompt + job.out[:-1]
    plan = bank.plan([RowPlacement(job.persona, len(job.prompt), 0)])
    with torch.inference_mode(), editing_layers(model, bank.edits(plan)):
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return logits[len(job.prompt) - 1 :].float()


def check_alone(model, personas, bank, jobs: list[Job]) -> None:
    for job in jobs:
        expected = generate(model, [job.prompt], [personas[job.persona]], max_new_tokens=job.tokens)[0]
        assert job.out == expected[: len(job.out)]
        torch.testing.assert_close(torch.stack(job.logits), reference_logits(model, bank, job), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("long_row_tokens", "long_group_slack"), [(512, LONG_GROUP_SLACK), (8, 0.0), (8, INF)],
                         ids=["no long rows", "long rows, each a piece", "long rows, one group"])
@pytest.mark.parametrize("packed", [False, True], ids=["chunks alone", "chunks packed into decode"])
def test_rows_joining_and_leaving_decode_as_alone(model, personas, packed, long_row_tokens, long_group_slack) -> None:
    bank = InterventionBank.for_interventions(personas[1:], num_layers=tiny.LAYERS)
    jobs = [
        Job(list(range(5, 13)), 1, 9, join=0),
        Job([40, 41], 0, 4, join=2),  # leaves first: the last row moves into its slot
        Job([100, 101, 102, 103], 2, 7, join=2),
        Job(list(range(20, 150)), 1, 6, join=3, chunk=16),  # 130 tokens in chunks: grows the columns past 128
        Job([9, 9, 9], 0, 8, join=4),
        Job([7, 8], 2, 3, join=4),  # the fifth row: grows the rows past 4
        Job([60, 61, 62], 0, 12, join=1, leave=5),  # cancelled mid-run
    ]
    runner = run_schedule(model, bank, jobs, packed, long_row_tokens, long_group_slack)
    assert runner.row_ids == [] and runner.cache_bytes == 0  # an idle runner holds no cache memory
    check_alone(model, personas, bank, [j for j in jobs if j.leave is None])


@pytest.mark.parametrize(("packed", "long_row_tokens", "long_group_slack"),
                         [(False, 512, INF), (True, 512, INF), (True, 8, 0.0), (True, 8, INF)],
                         ids=["chunks alone", "packed", "packed, long rows each a piece", "packed, long rows grouped"])
def test_in_bfloat16_every_row_gets_the_logits_of_a_forward_without_cache(personas, packed, long_row_tokens,
                                                                         long_group_slack) -> None:
    """bf16, the dtype served on GPUs: prefill, chunks (alone and packed), joins and long rows give each row the
    logits of one forward over its own tokens without a cache, within bf16 rounding. (Greedy tokens can differ from
    a batch of one at near-ties in bf16, so logits are compared along each row's own tokens.)"""
    model = tiny.tiny_llama().to(torch.bfloat16)
    bank = InterventionBank.for_interventions(personas[1:], num_layers=tiny.LAYERS)
    jobs = [
        Job(list(range(5, 13)), 1, 9, join=0),
        Job([40, 41], 0, 4, join=2),
        Job([100, 101, 102, 103], 2, 7, join=2),
        Job(list(range(20, 150)), 1, 6, join=3, chunk=16),
        Job([9, 9, 9], 0, 8, join=4),
        Job([7, 8], 2, 3, join=4),
    ]
    run_schedule(model, bank, jobs, packed, long_row_tokens, long_group_slack)
    for job in jobs:
        torch.testing.assert_close(torch.stack(job.logits), reference_logits(model, bank, job), rtol=0.02, atol=0.06)


def test_a_slot_holds_only_its_own_tokens(model) -> None:
    """A long row joining does not widen the others, a prompt being prefilled in chunks stays out of the slot cache
    until it is complete, and a row moved into a freed slot keeps its length."""
    runner = ModelRunner(model, InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1), PAD)
    runner.prefill([PrefillRow(0, [5, 6], 0), PrefillRow(1, [7, 8, 9], 0)])
    runner.decode([1, 2])
    runner.prefill([PrefillRow(2, list(range(100)), 0)])
    runner.begin_chunked_prefill(PrefillRow(3, list(range(50)), 0))
    runner.prefill_chunk(3, 20)
    assert runner.cache_lengths == {0: 3, 1: 4, 2: 100, 3: 20}
    runner.decode([3, 4, 5])  # the chunked row is not carried
    assert runner.cache_lengths == {0: 4, 1: 5, 2: 101, 3: 20}
    runner.release([0])
    assert list(runner.cache_lengths.items()) == [(2, 101), (1, 5), (3, 20)]  # the last row moved into slot 0
    assert runner.row_ids == [2, 1]
    assert runner.prefill_chunk(3, 30) is not None  # complete: it joins the slot cache as its last row
    assert list(runner.cache_lengths.items()) == [(2, 101), (1, 5), (3, 50)] and runner.row_ids == [2, 1, 3]


@settings(max_examples=30, deadline=None)
@given(data=st.data(), packed=st.booleans(), long_row_tokens=st.sampled_from([512, 6, 20]),
       long_group_slack=st.sampled_from([0.0, LONG_GROUP_SLACK, INF]))
def test_random_join_and_leave_schedules_equal_one_row_at_a_time(model, personas, data, packed, long_row_tokens,
                                                                  long_group_slack) -> None:
    bank = InterventionBank.for_interventions(personas[1:], num_layers=tiny.LAYERS)
    jobs = []
    for _ in range(data.draw(st.integers(1, 7))):
        length = data.draw(st.integers(1, 40))
        start = data.draw(st.integers(0, 250))
        jobs.append(Job(
            prompt=[(start + 13 * k) % 256 for k in range(length)],
            persona=data.draw(st.integers(0, 2)),
            tokens=data.draw(st.integers(1, 8)),
            join=data.draw(st.integers(0, 6)),
            chunk=data.draw(st.one_of(st.none(), st.integers(1, 12))),
            leave=data.draw(st.one_of(st.none(), st.integers(1, 10))),
        ))
    run_schedule(model, bank, jobs, packed, long_row_tokens, long_group_slack)
    check_alone(model, personas, bank, [j for j in jobs if j.out])


def test_a_long_row_decodes_in_its_own_cache_and_widens_nobody(model) -> None:
    """A 300-token prompt prefilled through the staging cache decodes there; the slot cache keeps its 128
    columns; its tokens equal the same rows decoded with the long row in the slot cache."""
    bank = InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1)
    long_prompt = [(7 * k) % 256 for k in range(300)]
    outputs = []
    for long_row_tokens in (100, 10_000):  # a long row, and the slot cache as before
        runner = ModelRunner(model, bank, PAD, long_row_tokens=long_row_tokens)
        tokens = runner.prefill([PrefillRow(0, [5, 6, 7], 0), PrefillRow(1, [8, 9], 0)]).argmax(-1).tolist()
        runner.begin_chunked_prefill(PrefillRow(2, long_prompt, 0))
        tokens += runner.prefill_chunk(2, len(long_prompt)).argmax(-1).tolist()
        assert runner.row_ids == [0, 1, 2]
        out = [tokens]
        for _ in range(5):
            tokens = runner.decode(tokens).argmax(-1).tolist()
            out.append(tokens)
        if long_row_tokens == 100:
            assert not runner.drafts_allowed
            assert runner.cache_allocated[1] == 128  # the slot cache's columns: the short rows' only
            assert runner.cache_lengths == {0: 8, 1: 7, 2: 305}
            runner.release([2])
            assert runner.drafts_allowed
        outputs.append(out)
    assert outputs[0] == outputs[1]


def test_staging_holds_only_the_prompt_being_chunked(model) -> None:
    """Chunked prompts waiting their turn hold no staging row, and prompts joining whole in a packed forward go
    straight into new slot cache rows: the staging cache stays one row as wide as the prompt being chunked (through
    it, four joins made it 8 rows of that width). The joined rows then decode as alone."""
    runner = ModelRunner(model, InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1), PAD)
    tokens = runner.prefill([PrefillRow(0, [5, 6, 7], 0), PrefillRow(1, [8, 9], 0)]).argmax(-1).tolist()
    runner.begin_chunked_prefill(PrefillRow(2, [(7 * k) % 256 for k in range(300)], 0))
    runner.begin_chunked_prefill(PrefillRow(3, [(5 * k) % 256 for k in range(200)], 0))
    assert runner._staging.allocated == (0, 0)
    joins = [PrefillRow(10 + i, [20 + i, 30, 40 + i], 0) for i in range(4)]
    decoded, chunks, joined = runner.decode_with_chunks(tokens, [(2, 100)], joins)
    assert chunks == [None] and joined is not None and joined.shape[0] == 4
    assert runner._staging.allocated == (1, 512) and runner.row_ids == [0, 1, 10, 11, 12, 13]
    assert runner.cache_lengths == {0: 4, 1: 3, 10: 3, 11: 3, 12: 3, 13: 3, 2: 100, 3: 0}
    tokens = [*decoded.argmax(-1).tolist(), *joined.argmax(-1).tolist()]
    out = [tokens]
    for _ in range(4):
        tokens = runner.decode(tokens).argmax(-1).tolist()
        out.append(tokens)
    for column, row in enumerate(joins, start=2):
        assert [step[column] for step in out] == generate(model, [list(row.prompt_ids)], [None], max_new_tokens=5)[0]
    assert runner.prefill_chunk(2, 200) is not None and runner._staging.rows == 0
    assert runner.prefill_chunk(3, 50) is None and runner._staging.rows == 1  # its row, taken at its first chunk


def test_capacity_is_a_power_of_two_and_the_budget_counts_it() -> None:
    assert [capacity(n, 4) for n in (0, 1, 4, 5, 8, 9, 1000)] == [4, 4, 4, 8, 8, 16, 1024]
    model = tiny.tiny_llama()
    per_token = ModelDims.from_model(model).kv_bytes_per_token(tiny.LAYERS)
    runner = ModelRunner(model, InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1), PAD)
    runner.prefill([PrefillRow(i, [5] * (10 + i), 0) for i in range(MIN_ROWS + 1)])
    assert runner.cache_allocated == (2 * MIN_ROWS, MIN_COLUMNS)
    assert runner.cache_bytes == capacity_bytes(MIN_ROWS + 1, 15, per_token) == KVBudget(per_token).cost(MIN_ROWS + 1, 15)
    runner.prefill([PrefillRow(99, [5] * (MIN_COLUMNS + 1), 0)])
    assert runner.cache_allocated == (2 * MIN_ROWS, 2 * MIN_COLUMNS)
    assert KVBudget(per_token).cost(1, 1, runner.cache_allocated) == runner.cache_bytes  # it does not shrink


def test_unused_slots_may_hold_anything(model) -> None:
    """Buffers are never filled when allocated; columns are cleared lazily, just ahead of what a forward reads, and
    only past each row's length: NaN left in a slot cannot leak into attention (0 * NaN), outputs equal the row
    alone."""
    runner = ModelRunner(model, InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1), PAD)
    runner.prefill([PrefillRow(0, [5, 6, 7], 0)])
    with torch.inference_mode():
        for buffer in (*runner._cache.keys, *runner._cache.values):
            buffer[1:] = float("nan")
    first = runner.prefill([PrefillRow(1, [40, 41], 0)]).argmax(-1).tolist()
    out = [first[0]]
    for _ in range(5):
        out.append(int(runner.decode([9, out[-1]])[1].argmax()))
    assert out == generate(model, [[40, 41]], [None], max_new_tokens=6)[0]


def test_rows_joining_together_clear_their_slots_at_once(model) -> None:
    """Several rows joining in one prefill take over slots a former row used and that hold NaN: each is cleared
    (in one op for the group) and decodes as alone; the LM head's contiguity hook is gone after every forward."""
    runner = ModelRunner(model, InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1), PAD)
    runner.prefill([PrefillRow(0, list(range(5, 25)), 0)])
    last = [int(runner.decode([9])[0].argmax())]
    with torch.inference_mode():
        for buffer in (*runner._cache.keys, *runner._cache.values):
            buffer[1:] = float("nan")
    prompts = [[40, 41], [50, 51, 52, 53], [60]]
    first = runner.prefill([PrefillRow(1 + i, p, 0) for i, p in enumerate(prompts)]).argmax(-1).tolist()
    outs = [[t] for t in first]
    for _ in range(4):
        logits = runner.decode([last[-1], *(o[-1] for o in outs)])
        last.append(int(logits[0].argmax()))
        for out, row in zip(outs, logits[1:]):
            out.append(int(row.argmax()))
    assert outs == generate(model, prompts, [None] * 3, max_new_tokens=5)
    assert not model.get_output_embeddings()._forward_pre_hooks

"""Chunk sizing: a chunk is sized to cost about `share` of a decode step from the averaged cost per chunk token,
within [MIN_PREFILL_CHUNK, 2x the last chunk]; short prompts are never chunked."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from server.engine.chunk_sizing import CHUNKED_PROMPT_MIN_TOKENS, FIRST_PREFILL_CHUNK, MIN_PREFILL_CHUNK, ChunkSizer


@given(share=st.floats(0.1, 2.0), costs=st.lists(st.tuples(st.integers(1, 512), st.floats(1e-4, 1.0)), min_size=1,
                                                  max_size=8), step_s=st.floats(0.01, 1.0))
def test_next_chunk_costs_about_the_share_of_a_step_within_bounds(share, costs, step_s) -> None:
    sizer = ChunkSizer(share)
    assert sizer.tokens == FIRST_PREFILL_CHUNK
    last = FIRST_PREFILL_CHUNK
    for tokens, cost in costs:
        sizer.record(tokens, cost)
        sizer.resize(last, step_s)
        assert MIN_PREFILL_CHUNK <= sizer.tokens <= max(MIN_PREFILL_CHUNK, 2 * last)
        last = sizer.tokens
    # with one steady cost per token, the size settles where a chunk costs the share of a step
    steady = ChunkSizer(share)
    for _ in range(40):
        steady.record(100, 100 * 1e-3)
        steady.resize(steady.tokens, step_s)
    expected = int(share * step_s / 1e-3)
    assert steady.tokens == max(MIN_PREFILL_CHUNK, expected) or abs(steady.tokens - expected) <= 1


@dataclass
class Row:
    prompt_len: int


def test_only_long_prompts_are_chunked_and_a_fixed_size_chunks_anything_longer() -> None:
    rows = [Row(10), Row(CHUNKED_PROMPT_MIN_TOKENS), Row(CHUNKED_PROMPT_MIN_TOKENS + 1)]
    assert ChunkSizer(0.5).split(rows) == (rows[:2], rows[2:])
    assert ChunkSizer(0.0).split(rows) == (rows, [])  # chunking off
    assert ChunkSizer(0.0, fixed_tokens=10).split(rows) == (rows[:1], rows[1:])
    assert ChunkSizer(0.0, fixed_tokens=8).tokens == 8


def test_a_prompt_is_prefilled_whole_unless_rows_decode_and_chunking_is_on() -> None:
    assert ChunkSizer(0.5).next_chunk(1000, rows_decoding=True) == FIRST_PREFILL_CHUNK
    assert ChunkSizer(0.5).next_chunk(10, rows_decoding=True) == 10
    assert ChunkSizer(0.5).next_chunk(1000, rows_decoding=False) == 1000  # nobody waits on it
    assert ChunkSizer(0.0).next_chunk(1000, rows_decoding=True) == 1000  # chunking off

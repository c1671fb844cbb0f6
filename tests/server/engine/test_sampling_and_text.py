"""Sampler filters and the incremental detokenizer (property tests)."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.engine.detokenizer import Detokenizer
from server.engine.sampler import RowSampling, _filter_top_k_top_p, sample
from server.engine.types import SamplingParams
from tests import tiny

TOKENIZER = tiny.tiny_tokenizer()


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row through the batched filter."""
    return _filter_top_k_top_p(logits[None], torch.tensor([top_k]), torch.tensor([top_p]))[0]


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=40), st.integers(1, 40))
def test_top_k_keeps_exactly_the_k_largest(values, k) -> None:
    logits = torch.tensor(values) + torch.arange(len(values)) * 1e-3  # break ties
    kept = torch.isfinite(_filter(logits, k, 1.0))
    assert int(kept.sum()) == min(k, len(values))
    assert logits[kept].min() >= logits[~kept].max() if (~kept).any() else True


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=40), st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(values, p) -> None:
    logits = torch.tensor(values) + torch.arange(len(values)) * 1e-3
    kept = torch.isfinite(_filter(logits, 0, p))
    probs = torch.softmax(logits, -1)
    assert probs[kept].sum() >= p - 1e-5 or kept.all()
    assert probs[kept].min() >= probs[~kept].max() if (~kept).any() else True
    without_smallest = probs[kept].sum() - probs[kept].min()
    assert without_smallest < p + 1e-5  # minimal: dropping the least likely kept token falls below p


def test_greedy_rows_take_argmax_and_nan_rows_fail() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 0.0, 0.0]])
    rows = [RowSampling(SamplingParams(temperature=0), 0, None)] * 2
    assert sample(logits, rows, eos_token_ids=[]) == [1, None]


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40), stop=st.text(min_size=1, max_size=4))
@example(text="\x80", stop="\ufffd")  # half of a two-byte character decodes as U+FFFD: not a stop string
def test_stream_never_leaks_a_stop_string_and_equals_truncated_text(text, stop) -> None:
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(TOKENIZER, (stop,))
    released, hit = [], False
    for token in ids:
        chunk, hit = detok.add(token)
        released.append(chunk)
        if hit:
            break
    if not hit:
        released.append(detok.flush())
    decoded = TOKENIZER.decode(ids)
    expected = decoded[: decoded.find(stop)] if stop in decoded else decoded
    assert "".join(released) == expected
    assert stop not in "".join(released)


def test_multibyte_characters_are_not_split() -> None:
    ids = TOKENIZER("a👋b", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(TOKENIZER, ())
    chunks = [detok.add(t)[0] for t in ids]
    assert all("\ufffd" not in c for c in chunks) and "".join(chunks) == "a👋b"

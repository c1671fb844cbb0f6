"""Position selection equals pyreft's `get_intervention_locations` (re-stated literally below) on every input."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reft_core.config import InterventionConfig
from reft_core.errors import InvalidConfigError
from reft_core.positions import MAX_POSITIONS_PER_SIDE, PositionSpec

PAD = -1


def pyreft_locations(prompt_len: int, first_n: int, last_n: int, share_weights: bool, n: int) -> list[list[int]]:
    """pyreft's rule as its source states it: clamp to L//2, pad with a sink, split halves when not shared."""
    first, last = min(prompt_len // 2, first_n), min(prompt_len // 2, last_n)
    pad_amount = (first_n - first) if first_n > last_n else (last_n - last)
    if share_weights or first == 0 or last == 0:
        locations = list(range(first)) + list(range(prompt_len - last, prompt_len)) + [PAD] * pad_amount
        return [locations] * n
    left = list(range(first)) + [PAD] * (first_n - first)
    right = list(range(prompt_len - last, prompt_len)) + [PAD] * (last_n - last)
    width = max(len(left), len(right))
    left, right = left + [PAD] * (width - len(left)), right + [PAD] * (width - len(right))
    return [left] * (n // 2) + [right] * (n // 2)


@given(
    prompt_len=st.integers(1, 64),
    first_n=st.integers(0, 9),
    last_n=st.integers(0, 9),
    share=st.booleans(),
    layers=st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True),
)
def test_units_select_pyreft_positions(prompt_len: int, first_n: int, last_n: int, share: bool, layers: list[int]) -> None:
    if first_n + last_n == 0:
        return
    spec = "+".join(([f"f{first_n}"] if first_n else []) + ([f"l{last_n}"] if last_n else []))
    config = InterventionConfig(layers=tuple(layers), rank=2, positions=spec, share_weights=share)
    units = config.units()
    expected = pyreft_locations(prompt_len, first_n, last_n, share, len(units))
    ours = [config.positions_for(unit.group, prompt_len) for unit in units]
    assert ours == [[p for p in locations if p != PAD] for locations in expected]


@given(st.integers(1, 200), st.integers(0, 20), st.integers(0, 20))
def test_prefix_and_suffix_never_overlap_and_stay_in_prompt(prompt_len: int, first: int, last: int) -> None:
    if first + last == 0:
        return
    spec = PositionSpec(first, last)
    prefix, suffix = spec.prefix(prompt_len), spec.suffix(prompt_len)
    assert not set(prefix) & set(suffix)
    assert all(0 <= p < prompt_len for p in prefix + suffix)
    if suffix:
        assert suffix[-1] == prompt_len - 1  # the true last prompt token


@pytest.mark.parametrize(
    "text,first,last",
    [("l1", 0, 1), ("f3", 3, 0), ("f1+l1", 1, 1), ("f5+l5", 5, 5), ("f12+l7", 12, 7)],
)
def test_parse_accepts_pyreft_notation(text: str, first: int, last: int) -> None:
    spec = PositionSpec.parse(text)
    assert (spec.first, spec.last) == (first, last)
    assert str(spec) == text


@pytest.mark.parametrize("text", ["", "l", "f", "l0", "f0+l0", "1", "l1+f1", "f1l1", "f1+", "+l1", " l1", "x3", "l-1",
                                  "f1+l1+l2", "l1\n", "f1+l1\n", "l\u0661", "f\uff11", "l1" + "0" * 5000])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidConfigError):
        PositionSpec.parse(text)


@given(st.integers(0, 30), st.integers(0, 30))
def test_parse_round_trips(first: int, last: int) -> None:
    if first + last == 0:
        return
    spec = PositionSpec(first, last)
    assert PositionSpec.parse(str(spec)) == spec


# the grammar's own characters plus look-alikes: a trailing newline, spaces, non-ASCII digits (Arabic-Indic,
# Devanagari, fullwidth), mixed with arbitrary text
NEAR_MISSES = "fl+0123456789\n\t \u0661\u0966\uff11"
GRAMMAR = re.compile(r"f[0-9]+\+l[0-9]+|f[0-9]+|l[0-9]+", re.ASCII)
SPEC_TEXT = st.text(alphabet=NEAR_MISSES, max_size=12) | st.text(max_size=12)


@given(SPEC_TEXT)
def test_parse_accepts_exactly_the_ascii_grammar(text: str) -> None:
    """Any string either fully matches f<N>, l<N> or f<N>+l<M> in ASCII digits (and round trips), or is refused."""
    grammar = GRAMMAR.fullmatch(text)
    try:
        spec = PositionSpec.parse(text)
    except InvalidConfigError:
        numbers = [int(n) for n in re.findall(r"[0-9]+", text, re.ASCII)] if grammar else []
        assert grammar is None or sum(numbers) == 0 or max(numbers) > MAX_POSITIONS_PER_SIDE
        return
    assert grammar is not None and PositionSpec.parse(str(spec)) == spec


@given(st.sampled_from(["l1", "f2", "f1+l1"]), st.text(alphabet=NEAR_MISSES, min_size=1, max_size=3) | st.text(min_size=1))
def test_parse_refuses_anything_after_a_valid_spec(valid: str, tail: str) -> None:
    if GRAMMAR.fullmatch(valid + tail):  # "l1" + "2" is "l12", "f2" + "+l1" is "f2+l1": still valid
        return
    with pytest.raises(InvalidConfigError):
        PositionSpec.parse(valid + tail)

"""Position selection equals pyreft's `get_intervention_locations` (re-stated literally below) on every input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reft_core.config import InterventionConfig
from reft_core.errors import InvalidConfigError
from reft_core.positions import PositionSpec

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


@pytest.mark.parametrize("text", ["", "l", "f", "l0", "f0+l0", "1", "l1+f1", "f1l1", "f1+", "+l1", " l1", "x3", "l-1", "f1+l1+l2"])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidConfigError):
        PositionSpec.parse(text)


@given(st.integers(0, 30), st.integers(0, 30))
def test_parse_round_trips(first: int, last: int) -> None:
    if first + last == 0:
        return
    spec = PositionSpec(first, last)
    assert PositionSpec.parse(str(spec)) == spec

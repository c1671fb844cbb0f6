"""Prompt-position selection in pyreft's notation (`l1`, `f3`, `f1+l1`, `f5+l5`).

pyreft picks intervened positions with `get_intervention_locations`: for a prompt of length L it takes the first
`min(L // 2, f)` and the last `min(L // 2, l)` tokens, so short prompts are clamped to half their length and the two
sides never overlap. We reproduce that rule exactly (parity with pyreft-trained artifacts depends on it). Positions
that pyreft pads to a "sink" are simply absent here: the batched bank masks them instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reft_core.errors import InvalidConfigError

# used with `fullmatch` on ASCII `[0-9]`: `$` would accept a trailing newline ("l1\n") and `\d` any Unicode digit
# ("l١"); at most 9 digits, so `int` stays cheap and bounded (MAX_POSITIONS_PER_SIDE refuses the large ones)
_N = "[0-9]{1,9}"
_POSITIONS_PATTERN = re.compile(rf"f(?P<both_f>{_N})\+l(?P<both_l>{_N})|f(?P<f>{_N})|l(?P<l>{_N})", re.ASCII)
MAX_POSITIONS_PER_SIDE = 512


@dataclass(frozen=True)
class PositionSpec:
    """How many prompt tokens to intervene on from the front (`first`) and from the back (`last`)."""

    first: int
    last: int

    @classmethod
    def parse(cls, spec: str) -> PositionSpec:
        """Parse `f<A>`, `l<B>` or `f<A>+l<B>`; raise InvalidConfigError with the accepted grammar otherwise."""
        match = _POSITIONS_PATTERN.fullmatch(spec) if isinstance(spec, str) else None
        if match is None:
            raise InvalidConfigError(
                f"invalid positions {spec!r}: expected 'f<N>', 'l<N>' or 'f<N>+l<M>' (e.g. 'l1', 'f1+l1')"
            )
        groups = match.groupdict()
        first = int(groups["both_f"] or groups["f"] or 0)
        last = int(groups["both_l"] or groups["l"] or 0)
        if first + last == 0:
            raise InvalidConfigError(f"invalid positions {spec!r}: at least one position is required")
        if first > MAX_POSITIONS_PER_SIDE or last > MAX_POSITIONS_PER_SIDE:
            raise InvalidConfigError(f"invalid positions {spec!r}: at most {MAX_POSITIONS_PER_SIDE} per side")
        return cls(first=first, last=last)

    def __str__(self) -> str:
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)

    @property
    def two_sided(self) -> bool:
        return self.first > 0 and self.last > 0

    def prefix(self, prompt_len: int) -> list[int]:
        """Positions (0-based, relative to the prompt start) of the clamped first-N tokens."""
        return list(range(min(prompt_len // 2, self.first)))

    def suffix(self, prompt_len: int) -> list[int]:
        """Positions of the clamped last-N tokens; the last one is the true last prompt token."""
        count = min(prompt_len // 2, self.last)
        return list(range(prompt_len - count, prompt_len))

    def all(self, prompt_len: int) -> list[int]:
        return self.prefix(prompt_len) + self.suffix(prompt_len)

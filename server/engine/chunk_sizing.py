"""How much of a long prompt to prefill per engine iteration while rows decode (chunked prefill).

A chunk is sized so that it adds about `share` of a decode step to the iteration (running rows' inter-token latency
grows by about that much), from the measured cost of a chunk token. That cost is averaged over chunks: one chunk's
cost, less a decode step's, swings with the machine's noise. The first chunk starts small and sizes grow at most
2x per chunk, so a wrong guess costs running rows one short stall at most.

The engine owns one `ChunkSizer`; nothing else reads or writes its state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

# Chunk sizes stay within these bounds; in between, each chunk is sized from the measured cost per chunk token.
MIN_PREFILL_CHUNK = 16
FIRST_PREFILL_CHUNK = 32
# Prompts up to this length are always prefilled whole, together with the others admitted in the same iteration:
# chunking them would admit a burst of chat-sized prompts one chunk at a time and starve the batch of rows.
CHUNKED_PROMPT_MIN_TOKENS = 512


class HasPromptLength(Protocol):
    @property
    def prompt_len(self) -> int: ...


Row = TypeVar("Row", bound=HasPromptLength)


class ChunkSizer:
    def __init__(self, share: float, fixed_tokens: int | None = None) -> None:
        """`share`: the fraction of a decode step a chunk should add (0 with no fixed size: chunking off);
        `fixed_tokens`: a fixed chunk size instead of the measured one (tests, tuning), which also chunks any
        prompt longer than it."""
        self.share, self.fixed_tokens = share, fixed_tokens
        self._size = FIRST_PREFILL_CHUNK  # tokens in the next chunk
        self._token_s = 0.0  # moving average of what one chunk token costs a step

    @property
    def enabled(self) -> bool:
        return self.fixed_tokens is not None or self.share > 0

    @property
    def tokens(self) -> int:
        """Prompt tokens in the next chunk."""
        return self.fixed_tokens if self.fixed_tokens is not None else self._size

    def next_chunk(self, remaining: int, rows_decoding: bool) -> int:
        """Tokens to prefill now of a prompt with `remaining` tokens left: a chunk while rows decode, else (or with
        chunking off) all of them."""
        return min(self.tokens, remaining) if rows_decoding and self.enabled else remaining

    def split(self, admitted: Sequence[Row]) -> tuple[list[Row], list[Row]]:
        """Rows to prefill whole, and rows whose prompts are long enough to chunk (call only while rows decode)."""
        if not self.enabled:
            return list(admitted), []
        threshold = self.fixed_tokens if self.fixed_tokens is not None else CHUNKED_PROMPT_MIN_TOKENS
        return [s for s in admitted if s.prompt_len <= threshold], [s for s in admitted if s.prompt_len > threshold]

    def record(self, tokens: int, cost_s: float) -> None:
        """What `tokens` prompt tokens cost: the whole forward of a chunk alone (a fixed part for reading the
        weights, and a part per token that grows with the prompt prefilled so far), or what packed pieces added to
        a decode step."""
        per_token = cost_s / tokens
        self._token_s = per_token if not self._token_s else 0.7 * self._token_s + 0.3 * per_token

    def resize(self, last: int, decode_step_s: float) -> None:
        """Size the next chunk to cost about `share` of a decode step; growth is capped at 2x the `last` chunk."""
        target = self.share * decode_step_s
        if target > 0:
            scaled = int(target / max(self._token_s, 1e-9))
            self._size = max(MIN_PREFILL_CHUNK, min(scaled, 2 * last))

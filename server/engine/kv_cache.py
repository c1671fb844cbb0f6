"""The slot KV cache: one preallocated buffer per layer, one slot (buffer row) per batch row, every row's tokens
starting at column 0 with its own length (right padding).

The batch's rows are the first `rows` slots, compact, so a decode step is one forward over a view of the buffer
(`[rows, kv_heads, width, head_dim]`, width = the longest row + 1) with per-row positions and a 4D mask built by the
runner. Nothing aligns rows to each other: a joining row writes only its own slot, a leaving row is replaced by the
last row (that one row is copied), and a long row never widens the others. The buffer grows geometrically (powers
of two, rows and columns apart) when a row or a column does not fit; `capacity_bytes` is that size, and it is what
the scheduler's KV budget counts.

Each forward writes in one of three ways, set by the runner just before it:
  decode  - every row appends one token at its own length (one indexed write per layer), or a few (speculative
            decoding: its last token and its draft; `advance` then keeps as many as were accepted);
  prefill - new rows' left-padded prompts are stored into their slots shifted to column 0 (their attention runs on
            the forward's own keys, they have no past);
  chunk   - one row appends a run of prompt tokens and attends to its whole slot so far (the runner keeps prompts
            being prefilled in chunks in a cache of their own, so decoding rows never read their columns).
A packed forward (`server.engine.packed`) writes decode tokens here, whole prompts joining into new rows here
(`extend`, after `plan_decode`), and a chunk to the staging cache, at once.

Only the runner touches this object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache

MIN_ROWS = 4
MIN_COLUMNS = 128
CLEAN_AHEAD = 64  # columns cleared past the read width at once, so clearing is one op per layer every 64 steps


def capacity(needed: int, minimum: int) -> int:
    """The buffer size that holds `needed`: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(needed - 1, 0).bit_length())


def capacity_bytes(rows: int, columns: int, bytes_per_token: int) -> int:
    """Bytes of the keys and values the cache allocates to hold `rows` rows of up to `columns` tokens."""
    return capacity(rows, MIN_ROWS) * capacity(columns, MIN_COLUMNS) * bytes_per_token


@dataclass(frozen=True)
class _Decode:
    rows: Tensor  # [B] 0..B-1, or [B, 1] when each row writes several tokens
    columns: Tensor  # [B] where each row writes: its length; or [B, T]: its length and the T - 1 columns after
    width: int  # columns the forward reads: the longest row + the tokens each row writes


@dataclass(frozen=True)
class _Prefill:
    first: int  # slot of the first new row
    source: Tensor | None  # [n, H, T, D] input column landing at each slot column; None: no padding to remove


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, end) of one row."""

    row: int
    start: int
    end: int


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 min_rows: int = MIN_ROWS) -> None:
        super().__init__(layers=[])  # we keep our own buffers; transformers only calls `update`
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.min_rows = min_rows  # a cache of a few very long rows grows a row at a time (powers of two)
        self.dtype, self.device = dtype, device
        self.keys: list[Tensor] = []  # per layer [row capacity, H, column capacity, D]
        self.values: list[Tensor] = []
        self.lengths = torch.zeros((0,), dtype=torch.long, device=device)  # [row capacity] tokens in each slot
        self.host_lengths: list[int] = []  # the same for the rows in use, on the host (no device sync to read)
        # Columns [0, clean) hold finite values in every row in use. Buffers are allocated uninitialised and
        # cleared lazily, just ahead of what a forward reads: masked columns still enter attention's matmuls
        # (0 * NaN is NaN), and clearing a long row's columns for every row at once would stall the batch.
        self.clean = 0
        self._write: _Decode | _Prefill | Chunk | None = None

    @property
    def rows(self) -> int:
        return len(self.host_lengths)

    @property
    def allocated(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.host_lengths, default=0)

    # -- rows ------------------------------------------------------------------------------------------------------
    def add_rows(self, count: int, columns: int = 1) -> int:
        """`count` new empty rows at the end, each with room for `columns` tokens; returns the first one's index.
        One growth and one clearing op per buffer for all of them: a prefill of 64 prompts added row by row spent
        ~5% of a fixed-length benchmark in thousands of tiny per-row ops and repeated doublings."""
        first = self.rows
        self.reserve(first + count, columns)
        if self.clean:
            for buffer in (*self.keys, *self.values):
                buffer[first : first + count, :, : self.clean] = 0  # former rows' tokens, or never-written memory
        self.lengths[first : first + count] = 0
        self.host_lengths.extend([0] * count)
        return first

    def adopt_row(self, source: SlotKVCache, row: int) -> int:
        """A new last row holding a copy of `source`'s `row` (a prompt prefilled in the staging cache joins the
        batch: one copy of its tokens, once); returns its index."""
        length = source.host_lengths[row]
        new = self.add_rows(1, length + 1)
        for mine, theirs in zip((*self.keys, *self.values), (*source.keys, *source.values)):
            mine[new, :, :length] = theirs[row, :, :length]
        self.set_length(new, length)
        return new

    def set_length(self, row: int, length: int) -> None:
        self.host_lengths[row] = length
        self.lengths[row] = length

    def remove_row(self, row: int) -> None:
        """Drop `row`; the last row moves into its slot (only that row's tokens are copied)."""
        last = self.rows - 1
        if row != last:
            n = self.host_lengths[last]
            for buffer in (*self.keys, *self.values):
                buffer[row, :, :n] = buffer[last, :, :n]
            self.set_length(row, n)
        self.host_lengths.pop()
        if not self.host_lengths:
            self.clear()  # an idle engine holds no cache memory

    def clear(self) -> None:
        self.keys, self.values, self.host_lengths = [], [], []
        self.lengths = self.lengths[:0]
        self.clean = 0
        self._write = None

    def reserve(self, rows: int, columns: int) -> None:
        """Grow the buffers (geometrically) so that `rows` rows of `columns` tokens fit."""
        have_rows, have_columns = self.allocated
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = max(have_rows, capacity(rows, self.min_rows))
        new_columns = max(have_columns, capacity(columns, MIN_COLUMNS))
        shape = (new_rows, self.kv_heads, new_columns, self.head_dim)
        # Only the rows in use are copied; nothing else is filled (see `clean`): touching a whole new buffer at
        # once is a stall of seconds on a CPU when a long row arrives.
        rows_in_use = self.rows
        grown = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2 * self.num_layers)]
        for old, new in zip((*self.keys, *self.values), grown):
            new[:rows_in_use, :, : old.shape[2]] = old[:rows_in_use]
        self.keys, self.values = grown[: self.num_layers], grown[self.num_layers :]
        lengths = torch.zeros((new_rows,), dtype=torch.long, device=self.device)
        lengths[: self.lengths.shape[0]] = self.lengths
        self.lengths = lengths

    # -- what the next forward writes ------------------------------------------------------------------------------
    def plan_decode(self, row_index: Tensor, tokens: int = 1) -> int:
        """Every row appends `tokens` tokens at its length; returns the width the forward reads. `row_index`:
        0..rows-1. Lengths change only with `advance`."""
        width = max(self.host_lengths) + tokens
        self.reserve(self.rows, width)
        self._clean_to(width)
        columns = self.lengths[: self.rows]
        if tokens == 1:
            self._write = _Decode(row_index, columns, width)
        else:
            offsets = torch.arange(tokens, device=self.device)
            self._write = _Decode(row_index[:, None], columns[:, None] + offsets[None, :], width)
        return width

    def _clean_to(self, width: int) -> None:
        """Zero every row's columns from `clean` up to past `width`, where they are beyond that row's length."""
        if width <= self.clean:
            return
        end = min(self.keys[0].shape[2], width + CLEAN_AHEAD)
        columns = torch.arange(self.clean, end, device=self.device)
        unused = (columns[None, :] >= self.lengths[: self.rows, None])[:, None, :, None]  # [B, 1, new columns, 1]
        for buffer in (*self.keys, *self.values):
            buffer[: self.rows, :, self.clean : end].masked_fill_(unused, 0)
        self.clean = end

    def advance(self, kept: Sequence[int] | None = None) -> None:
        """After a decode forward: every row it wrote grew by one token, or by `kept[row]` of the tokens it wrote
        (the columns past those hold rejected draft tokens: beyond the row's length, never attended, overwritten
        later). Rows added since `plan_decode` (prompts joining in a packed forward) keep their lengths."""
        assert isinstance(self._write, _Decode), "advance follows a decode forward"
        rows = self._write.rows.shape[0]
        if kept is None:
            self.lengths[:rows] += 1
            self.host_lengths[:rows] = [n + 1 for n in self.host_lengths[:rows]]
            return
        assert len(kept) == rows
        self.lengths[:rows] += torch.tensor(list(kept), dtype=torch.long, device=self.device)
        self.host_lengths[:rows] = [n + k for n, k in zip(self.host_lengths[:rows], kept)]

    def plan_prefill(self, first: int, lengths: Sequence[int], width: int) -> None:
        """Rows first.. receive left-padded prompts of these `lengths`, padded to `width`."""
        source = None
        if any(n != width for n in lengths):
            offsets = torch.tensor([width - n for n in lengths], device=self.device)
            columns = (offsets[:, None] + torch.arange(width, device=self.device)).clamp(max=width - 1)
            source = columns[:, None, :, None].expand(len(lengths), self.kv_heads, width, self.head_dim)
        self._write = _Prefill(first, source)
        for i, n in enumerate(lengths):
            self.set_length(first + i, n)

    def plan_chunk(self, row: int, start: int, end: int) -> None:
        """`row` appends prompt tokens [start, end)."""
        self._write = self.extend(Chunk(row, start, end))

    def extend(self, chunk: Chunk) -> Chunk:
        """Room and length for `chunk`, whose keys and values the caller writes with `write_chunk`."""
        self.reserve(self.rows, chunk.end)
        self.set_length(chunk.row, chunk.end)
        return chunk

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        keys, values, write = self.keys[layer_idx], self.values[layer_idx], self._write
        if isinstance(write, _Decode):  # states: [B, H, T, D]
            if write.columns.dim() == 1:
                keys[write.rows, :, write.columns] = key_states[:, :, 0]
                values[write.rows, :, write.columns] = value_states[:, :, 0]
            else:  # indexing [B, 1] rows with [B, T] columns selects [B, T, H, D]
                keys[write.rows, :, write.columns] = key_states.transpose(1, 2)
                values[write.rows, :, write.columns] = value_states.transpose(1, 2)
            rows = write.rows.shape[0]
            return keys[:rows, :, : write.width], values[:rows, :, : write.width]
        if isinstance(write, _Prefill):  # states: [n, H, T, D], left-padded
            n, width = key_states.shape[0], key_states.shape[2]
            for buffer, states in ((keys, key_states), (values, value_states)):
                shifted = states if write.source is None else states.gather(2, write.source)
                buffer[write.first : write.first + n, :, :width] = shifted
            return key_states, value_states
        assert isinstance(write, Chunk), "plan the forward before running it"
        return self.write_chunk(layer_idx, write, key_states, value_states)

    def write_chunk(self, layer_idx: int, chunk: Chunk, key_states: Tensor,
                    value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Store a chunk's states ([1, H, n, D]); returns its row's keys and values so far ([1, H, end, D])."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[chunk.row, :, chunk.start : chunk.end] = key_states[0]
        values[chunk.row, :, chunk.start : chunk.end] = value_states[0]
        return keys[chunk.row : chunk.row + 1, :, : chunk.end], values[chunk.row : chunk.row + 1, :, : chunk.end]

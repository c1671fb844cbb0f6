"""A packed forward: every decoding row's next token and prompt pieces being prefilled (new short prompts whole,
one chunk of a long one), in one forward.

Why: on a CPU (and for small batches anywhere) a forward's cost is mostly reading the weights. A prompt chunk run
as a forward of its own pays that read again, so a chunk sized not to stall the decoding rows held only ~20 tokens
of a 2,000-token prompt on the 2-core test machine, and the prompt took ~100 iterations to join; a request joining
a running batch paid a whole forward for its ~40-token prompt. Packed into the decode forward, a piece adds only
its own compute.

The batch is one packed row `[decoding rows' tokens..., long rows' tokens..., piece 1..., piece 2...]` (long rows
decode in a cache of their own, see `server.engine.runner`: together, as a second group, or each as a piece of one
token; a prompt joining whole is a piece written straight into its new row of the slot cache): the linear layers
and the bank's
edits run on it as on any row, with per-token positions. Attention is the one place where the parts differ (each
decoding row attends to its own slot, each piece to its own prompt so far), so for this forward the model's
attention is swapped for `packed_attention`, which splits the query and runs one SDPA call for the decoding rows,
one for the long rows when they decode as a group, and one per piece. The KV writes go through the `PackedCaches` wrapper: the decoding rows' keys to the slot cache,
each piece's to the row and cache it belongs to.

Only architectures whose attention is plain scaled dot-product attention over the cache take this path
(`packable`); others prefill chunks in forwards of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.cache_utils import Cache

from server.engine.kv_cache import Chunk, SlotKVCache

PACKED_ATTENTION = "reft_packed"
# Families whose attention module projects, applies rotary embeddings, updates the cache and then calls the
# configured attention function with nothing else (no sliding window, logit soft-capping or sinks).
_PLAIN_ATTENTION_FAMILIES = {"llama"}


def packable(model: nn.Module) -> bool:
    config = model.config
    return config.model_type in _PLAIN_ATTENTION_FAMILIES and getattr(config, "sliding_window", None) is None


@dataclass(frozen=True)
class PackedLayout:
    decode_rows: int  # the first `decode_rows` tokens are one token of each slot cache row, in cache order
    decode_mask: Tensor | None  # [B, 1, 1, width] bool: each row's own tokens and its new one (None: no such row)
    # other rows' new tokens (a long row's next token, or prompt tokens), side by side after the decoding rows' (and
    # the long rows' group)
    pieces: tuple[Chunk, ...]
    piece_masks: tuple[Tensor, ...]  # [1, 1, n, end] bool each: causal at the piece's absolute positions
    long_rows: int = 0  # then one token of each long row, in long cache order, decoding as a group (planned with
    # `plan_decode` on the long rows' cache)
    long_mask: Tensor | None = None  # [L, 1, 1, long width] bool, as `decode_mask`

    @property
    def grouped(self) -> int:
        """Tokens before the pieces: the decoding rows' and the long rows' group's."""
        return self.decode_rows + self.long_rows


@dataclass(frozen=True)
class PackedStates:
    """What `PackedCaches.update` hands the attention of one layer (keys or values)."""

    decode: Tensor | None  # [B, kv_heads, width, D]: the slot cache rows' slots (None: no such row)
    pieces: tuple[Tensor, ...]  # [1, kv_heads, end, D] each: a piece's prompt so far
    layout: PackedLayout
    long: Tensor | None = None  # [L, kv_heads, long width, D]: the long rows' slots, when they decode as a group


class PackedCaches(Cache):
    """The cache of a packed forward: splits each layer's new keys and values between the slot cache (one token per
    decoding row, planned with `plan_decode`), the long rows' cache (one token per long row when they decode as a
    group, planned the same way) and each piece's cache (`piece_caches`, in the layout's order: the
    long rows' cache, the staging cache or the slot cache); pieces are `extend`ed beforehand."""

    def __init__(self, layout: PackedLayout, piece_caches: tuple[SlotKVCache, ...], slots: SlotKVCache,
                 long: SlotKVCache | None = None) -> None:
        super().__init__(layers=[])
        assert len(piece_caches) == len(layout.pieces) and (long is not None or not layout.long_rows)
        self.layout, self.piece_caches, self.slots, self.long = layout, piece_caches, slots, long

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.slots.get_seq_length(layer_idx)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[PackedStates, PackedStates]:  # type: ignore[override]
        rows, grouped = self.layout.decode_rows, self.layout.grouped  # states: [1, H, B + L + pieces' tokens, D]
        decode_keys = decode_values = long_keys = long_values = None
        if rows:
            decode_keys, decode_values = self.slots.update(  # [B, H, 1, D] each, as a plain decode forward has them
                key_states[0, :, :rows].transpose(0, 1).unsqueeze(2),
                value_states[0, :, :rows].transpose(0, 1).unsqueeze(2), layer_idx)
        if grouped > rows:
            assert self.long is not None
            long_keys, long_values = self.long.update(key_states[0, :, rows:grouped].transpose(0, 1).unsqueeze(2),
                                                      value_states[0, :, rows:grouped].transpose(0, 1).unsqueeze(2),
                                                      layer_idx)
        piece_keys, piece_values, column = [], [], grouped
        for piece, cache in zip(self.layout.pieces, self.piece_caches):
            width = piece.end - piece.start
            keys, values = cache.write_chunk(layer_idx, piece, key_states[:, :, column : column + width],
                                             value_states[:, :, column : column + width])
            piece_keys.append(keys)
            piece_values.append(values)
            column += width
        return (PackedStates(decode_keys, tuple(piece_keys), self.layout, long_keys),
                PackedStates(decode_values, tuple(piece_values), self.layout, long_values))


def packed_attention(module: nn.Module, query: Tensor, key: PackedStates, value: PackedStates,
                     attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[Tensor, None]:
    """Attention of a packed forward. query: [1, heads, T, D]; returns [1, T, heads, D]."""
    if not isinstance(key, PackedStates):  # a plain forward of another thread sharing the model (tests do) ran
        # while this one's attention was swapped in: plain attention is what it asked for
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layout = key.layout
    rows = layout.decode_rows
    outputs: list[Tensor] = []
    if rows:
        decode_query = query[0, :, :rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, D]
        decoded = F.scaled_dot_product_attention(decode_query, key.decode, value.decode,
                                                 attn_mask=layout.decode_mask, scale=scaling, enable_gqa=True)
        outputs.append(decoded[:, :, 0])  # [B, heads, D]
    if layout.long_rows:
        long_query = query[0, :, rows : layout.grouped].transpose(0, 1).unsqueeze(2)  # [L, heads, 1, D]
        decoded = F.scaled_dot_product_attention(long_query, key.long, value.long, attn_mask=layout.long_mask,
                                                 scale=scaling, enable_gqa=True)
        outputs.append(decoded[:, :, 0])  # [L, heads, D]
    column = layout.grouped
    for piece, mask, piece_keys, piece_values in zip(layout.pieces, layout.piece_masks, key.pieces, value.pieces):
        width = piece.end - piece.start
        attended = F.scaled_dot_product_attention(query[:, :, column : column + width], piece_keys, piece_values,
                                                  attn_mask=mask, scale=scaling, enable_gqa=True)
        outputs.append(attended[0].transpose(0, 1))  # [n, heads, D]
        column += width
    return torch.cat(outputs)[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextmanager
def attention_swapped(model: nn.Module) -> Iterator[None]:
    """`packed_attention` for the forwards inside (the engine's thread is the model's only user meanwhile)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous

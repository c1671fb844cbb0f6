"""A packed forward: every decoding row's next token and one chunk of a prompt being prefilled, in one forward.

Why: on a CPU (and for small batches anywhere) a forward's cost is mostly reading the weights. A prompt chunk run
as a forward of its own pays that read again, so a chunk sized not to stall the decoding rows held only ~20 tokens
of a 2,000-token prompt on the 2-core test machine, and the prompt took ~100 iterations to join. Packed into the
decode forward, the chunk adds only its own compute.

The batch is one packed row `[decoding rows' tokens..., chunk tokens...]`: the linear layers and the bank's edits
run on it as on any row, with per-token positions. Attention is the one place where the pieces differ (each decoding
row attends to its own slot, the chunk to its own prompt so far), so for this forward the model's attention is
swapped for `packed_attention`, which splits the query and runs two SDPA calls. The KV writes go through the
`PackedCaches` wrapper: the decoding rows' keys to the slot cache, the chunk's to the staging cache holding the
prompts being prefilled.

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
from transformers.cache_utils import Cache

from server.engine.kv_cache import SlotKVCache

PACKED_ATTENTION = "reft_packed"
# Families whose attention module projects, applies rotary embeddings, updates the cache and then calls the
# configured attention function with nothing else (no sliding window, logit soft-capping or sinks).
_PLAIN_ATTENTION_FAMILIES = {"llama"}


def packable(model: nn.Module) -> bool:
    config = model.config
    return config.model_type in _PLAIN_ATTENTION_FAMILIES and getattr(config, "sliding_window", None) is None


@dataclass(frozen=True)
class PackedLayout:
    decode_rows: int  # the first `decode_rows` tokens are one token of each decoding row, in cache order
    decode_mask: Tensor  # [B, 1, 1, width] bool: each row's own tokens and its new one
    chunk_mask: Tensor  # [1, 1, n, end] bool: causal at the chunk's absolute positions


@dataclass(frozen=True)
class PackedStates:
    """What `PackedCaches.update` hands the attention of one layer (keys or values)."""

    decode: Tensor  # [B, kv_heads, width, D]: the decoding rows' slots
    chunk: Tensor  # [1, kv_heads, end, D]: the chunk's prompt so far
    layout: PackedLayout


class PackedCaches(Cache):
    """The cache of a packed forward: splits each layer's new keys and values between the slot cache (one token per
    decoding row, planned with `plan_decode`) and the staging cache (the chunk, planned with `plan_chunk`)."""

    def __init__(self, slots: SlotKVCache, staging: SlotKVCache, layout: PackedLayout) -> None:
        super().__init__(layers=[])
        self.slots, self.staging, self.layout = slots, staging, layout

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.slots.get_seq_length(layer_idx)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[PackedStates, PackedStates]:  # type: ignore[override]
        rows = self.layout.decode_rows  # states: [1, H, B + n, D]
        decode_keys, decode_values = self.slots.update(
            key_states[0, :, :rows].transpose(0, 1).unsqueeze(2), value_states[0, :, :rows].transpose(0, 1).unsqueeze(2),
            layer_idx)
        chunk_keys, chunk_values = self.staging.update(key_states[:, :, rows:], value_states[:, :, rows:], layer_idx)
        return (PackedStates(decode_keys, chunk_keys, self.layout),
                PackedStates(decode_values, chunk_values, self.layout))


def packed_attention(module: nn.Module, query: Tensor, key: PackedStates, value: PackedStates,
                     attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[Tensor, None]:
    """Attention of a packed forward. query: [1, heads, B + n, D]; returns [1, B + n, heads, D]."""
    layout = key.layout
    rows = layout.decode_rows
    decode_query = query[0, :, :rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, D]
    decoded = F.scaled_dot_product_attention(decode_query, key.decode, value.decode, attn_mask=layout.decode_mask,
                                             scale=scaling, enable_gqa=True)
    chunked = F.scaled_dot_product_attention(query[:, :, rows:], key.chunk, value.chunk, attn_mask=layout.chunk_mask,
                                             scale=scaling, enable_gqa=True)
    return torch.cat([decoded[:, :, 0], chunked[0].transpose(0, 1)])[None], None


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

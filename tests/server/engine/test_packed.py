"""The packed forward's attention, beyond what the schedule tests in test_kv_cache.py check end to end."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.packed import packed_attention
from tests import tiny


def test_a_plain_forward_that_meets_the_swapped_attention_gets_plain_attention() -> None:
    """Two engines sharing one model on two threads (tests do): while one packs, the other's plain forward reaches
    the swapped-in attention with ordinary keys and values, and must get exactly sdpa's answer."""
    module = tiny.tiny_llama().model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 16, generator=generator)
    key, value = (torch.randn(2, 2, 5, 16, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, 3, 5, generator=generator) > 0.3
    mask[..., 0] = True  # no empty row
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=module.scaling)
    got, _ = packed_attention(module, query, key, value, mask, scaling=module.scaling)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

"""Tiny random-weight Llama models and random interventions for reft_core unit tests (no hub, no GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reft_core.config import InterventionConfig
from reft_core.intervention import Intervention, UnitWeights

HIDDEN = 64
LAYERS = 4
VOCAB = 128


def tiny_llama(seed: int = 0, std: float = 0.1) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=std,  # larger than default so greedy continuations are not one repeated token
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_intervention(config: InterventionConfig, seed: int = 0, hidden: int = HIDDEN, scale: float = 1.0) -> Intervention:
    generator = torch.Generator().manual_seed(seed)
    units = {}
    for unit in config.units():
        q, _ = torch.linalg.qr(torch.randn(hidden, config.rank, generator=generator))
        units[unit] = UnitWeights(
            R=q.T.contiguous(),
            W=scale * torch.randn(config.rank, hidden, generator=generator),
            b=scale * torch.randn(config.rank, generator=generator),
        )
    return Intervention(config=config, hidden_size=hidden, units=units)


@pytest.fixture(scope="session")
def model() -> LlamaForCausalLM:
    return tiny_llama()

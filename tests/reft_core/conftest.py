"""Tiny random-weight Llama models and random interventions for reft_core unit tests (no hub, no GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from reft_core.config import InterventionConfig
from reft_core.intervention import Intervention, UnitWeights
from tests import tiny

HIDDEN = tiny.HIDDEN
LAYERS = tiny.LAYERS
VOCAB = 128


def tiny_llama(seed: int = 0, std: float = 0.1) -> LlamaForCausalLM:
    return tiny.tiny_llama(seed=seed, std=std, vocab=VOCAB)


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

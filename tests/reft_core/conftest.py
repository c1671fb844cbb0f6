"""Tiny random-weight Llama models and random interventions for reft_core unit tests (no hub, no GPU)."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from tests import tiny
from tests.builders import random_intervention  # noqa: F401 - many tests import it from here

HIDDEN = tiny.HIDDEN
LAYERS = tiny.LAYERS
VOCAB = 128


def tiny_llama(seed: int = 0, std: float = 0.1) -> LlamaForCausalLM:
    return tiny.tiny_llama(seed=seed, std=std, vocab=VOCAB)


@pytest.fixture(scope="session")
def model() -> LlamaForCausalLM:
    return tiny_llama()

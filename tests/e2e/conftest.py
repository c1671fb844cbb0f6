"""End-to-end fixtures: the emoji persona trained once per session on the embedded SmolLM2 (the seeds' recipe)."""

from __future__ import annotations

import pytest

from reft_core.config import InterventionConfig
from reft_core.examples import tokenize_examples
from reft_core.trainer import TrainingConfig, TrainingResult, train_intervention

from .emoji import emoji_examples

RECIPE = InterventionConfig(layers=(8,), rank=4, positions="l1")
TRAINING = TrainingConfig(epochs=100, learning_rate=4e-3, batch_size=10, seed=42)


@pytest.fixture(scope="session")
def emoji_training(smollm2) -> tuple[TrainingResult, list]:
    examples = tokenize_examples(smollm2.tokenizer, emoji_examples(), chat_template=True)
    progress: list = []
    return train_intervention(smollm2.model, RECIPE, examples, TRAINING, on_progress=progress.append), progress

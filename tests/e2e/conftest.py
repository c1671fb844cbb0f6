"""End-to-end fixtures: the emoji persona trained once per session on the embedded SmolLM2.

The one default recipe (reft_core/recipe.py: LoReFT rank 2 at layers 8/16/24 on the first two and last two
prompt tokens, unshared, 20 epochs at lr 4e-3, batch 10, loss on completion + EOS), chosen by measurement over four
kinds of persona. The single-layer `l1` placement of pyreft's demo (rank 4, layer 8, 100 epochs) trains to
pyreft's loss on this model but does not reliably answer unseen prompts in emojis, with pyreft or with us; editing
the first tokens, which every later token attends to, is what carries the persona through a whole answer.
"""

from __future__ import annotations

import pytest

from reft_core import recipe
from reft_core.config import InterventionConfig
from reft_core.examples import tokenize_examples
from reft_core.trainer import TrainingConfig, TrainingResult, train_intervention

from .emoji import emoji_examples

# The one default recipe (reft_core/recipe.py): this test is what keeps it a recipe that works on the embedded model.
RECIPE = InterventionConfig(layers=recipe.default_layers(30), rank=recipe.RANK, positions=recipe.POSITIONS,
                            share_weights=recipe.SHARE_WEIGHTS)
TRAINING = TrainingConfig()


@pytest.fixture(scope="session")
def emoji_training(smollm2) -> tuple[TrainingResult, list]:
    examples = tokenize_examples(smollm2.tokenizer, emoji_examples(), chat_template=True)
    progress: list = []
    return train_intervention(smollm2.model, RECIPE, examples, TRAINING, on_progress=progress.append), progress

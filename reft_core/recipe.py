"""The default training recipe, defined once: the library trainer, `reft-serve train` (locally and with --server)
and the HTTP API all take their defaults from here, so one examples file trains the same persona wherever it runs.

Placement is relative to the model's depth, so it carries to other models. The values were chosen by measurement
(bench/recipe_search.py; BENCHMARKS.md, "Choosing the default recipe"): 12 candidate recipes trained four kinds of
persona (emoji-only and bullet-list formats, a shouted tone, French) from 10 examples each on SmolLM2-135M-Instruct,
then answered 20 unseen prompts. LoReFT rank 2 at layers 8/16/24 of 30 on the first two and last two prompt tokens
(unshared), 20 epochs at lr 4e-3, had the best mean: 100% / 95% / 80% / 80% in persona (bare model 0%). Editing
first tokens matters because every later token attends to them. Close behind: last token only (`l1`, 88%) and
the former default `f1+l1` at 10 epochs, lr 8e-3 (88%, half the steps, but its loss jumps from 2.9 to 6.9 on the
second step); the former default `f1+l1` at 20 epochs got 80%. `epochs="auto"` measured worse as a default on
10-example personas (on training loss it runs to its cap and overfits; holding out 2 examples to validate costs
more than stopping early gains), so the default is a fixed count and "auto" is for users with validation data.
"""

from __future__ import annotations

from typing import Literal

DEPTH_FRACTIONS = (8 / 30, 16 / 30, 24 / 30)  # where the edited layers sit, as fractions of the model's depth
RANK = 2
POSITIONS = "f2+l2"
SHARE_WEIGHTS = False
TYPE = "loreft"
# An epoch count, or "auto": stop on a plateau of the validation loss (else of the training loss) by the rule
# below (reft_core/early_stop.py). A fixed count measured better as the default (see the module docstring).
EPOCHS: int | Literal["auto"] = 20
AUTO_MAX_EPOCHS = 40  # the cap of "auto"
AUTO_PATIENCE = 3  # epochs without an improvement before "auto" stops
AUTO_MIN_DELTA = 0.01  # an improvement is a loss at least 1% below the best so far
LEARNING_RATE = 4e-3
BATCH_SIZE = 10
SEED = 42


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The recipe's layers for a model with `num_layers` decoder layers (8/16/24 for 30)."""
    assert num_layers >= 1
    return tuple(sorted({min(num_layers - 1, round(f * num_layers)) for f in DEPTH_FRACTIONS}))

"""The default training recipe, defined once: the library trainer, `reft-serve train` (locally and with --server)
and the HTTP API all take their defaults from here, so one examples file trains the same persona wherever it runs.

Placement is relative to the model's depth, so it carries to other models. The values are the placement that was
measured to carry a persona through whole answers on SmolLM2-135M-Instruct (the emoji persona, the end-to-end
test's recipe): LoReFT rank 2 at layers 8/16/24 of 30, on the first and last prompt tokens (unshared: every later
token attends to the first one), 20 epochs at lr 4e-3. The former server default (one middle layer, last token,
rank 4, 100 epochs) reached a low loss but answered fewer than half of unseen prompts in persona, and took ~3x as
long. Measured on four kinds of persona (bench/recipe_search.py; BENCHMARKS.md, "Choosing the default recipe"):
emoji-only 100%, bullet-list format 95%, shouted tone 75% and French 50% of 20 unseen prompts, against 0% for the
bare model; a last-token-only placement (`l1`) matched it on emoji and did better on tone (85%) in the part of the
comparison that finished, so the choice between them is still open for tone and language personas.
"""

from __future__ import annotations

from typing import Literal

DEPTH_FRACTIONS = (8 / 30, 16 / 30, 24 / 30)  # where the edited layers sit, as fractions of the model's depth
RANK = 2
POSITIONS = "f2+l2"
SHARE_WEIGHTS = False
TYPE = "loreft"
# An epoch count, or "auto": stop on a plateau of the validation loss (else of the training loss) by the rule
# below (reft_core/early_stop.py). Switching the default to "auto" is this one line.
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

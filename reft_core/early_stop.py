"""The stop rule of `epochs: "auto"`: train until the monitored loss stops improving, then keep the best epoch.

A pure rule over the sequence of per-epoch losses (validation loss when there is validation data, else the epoch's
mean training loss), so it is the same in the library trainer, the CLI and the server, and testable without a
model. An epoch *improves* when its loss is below the best so far by more than a relative `min_delta`; after
`patience` epochs without an improvement, or at `max_epochs`, training stops. The epoch kept is the one with the
lowest loss seen (ties: the earliest), which may be a small, non-improving step past the last improvement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from reft_core import recipe
from reft_core.errors import InvalidConfigError

StopReason = Literal["plateau", "max_epochs"]


@dataclass(frozen=True)
class StopRule:
    patience: int = recipe.AUTO_PATIENCE
    min_delta: float = recipe.AUTO_MIN_DELTA  # relative: 0.01 means "at least 1% below the best so far"
    max_epochs: int = recipe.AUTO_MAX_EPOCHS

    def __post_init__(self) -> None:
        if self.patience < 1 or self.max_epochs < 1 or not 0 <= self.min_delta < 1:
            raise InvalidConfigError(f"invalid stop rule {self!r}: patience and max_epochs >= 1, 0 <= min_delta < 1")


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    best_epoch: int  # 1-based epoch with the lowest loss so far
    best_loss: float
    reason: StopReason | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(losses: Sequence[float], rule: StopRule) -> StopDecision:
    """Whether to stop after the epochs whose losses are `losses` (one per epoch, in order; at least one)."""
    assert losses, "decide after at least one epoch"
    best_epoch, best_loss = 1, math.inf
    last_improvement, reference = 0, math.inf  # the epoch and loss of the last improvement by min_delta
    for epoch, loss in enumerate(losses, start=1):
        if loss < best_loss:
            best_epoch, best_loss = epoch, loss
        if loss < reference * (1 - rule.min_delta) or reference == math.inf:
            last_improvement, reference = epoch, loss
    epoch = len(losses)
    if epoch - last_improvement >= rule.patience:
        return StopDecision(True, best_epoch, best_loss, "plateau")
    if epoch >= rule.max_epochs:
        return StopDecision(True, best_epoch, best_loss, "max_epochs")
    return StopDecision(False, best_epoch, best_loss)

"""Epoch ends and the stop rule of `epochs: "auto"`: train until the monitored loss stops improving, then keep the
best epoch.

A pure rule over the sequence of per-epoch losses (validation loss when there is validation data, else the epoch's
mean training loss), so it is the same in the library trainer, the CLI and the server, and testable without a
model. An epoch *improves* when its loss is below the best so far by more than a relative `min_delta`; after
`patience` epochs without an improvement, or at `max_epochs`, training stops. The epoch kept is the one with the
lowest loss seen (ties: the earliest), which may be a small, non-improving step past the last improvement.
`epoch_metadata` and `auto_stop_summary` say how a run's epochs went, in the one shape the library trainer, the CLI
and the server store with an artifact.
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


@dataclass(frozen=True)
class EpochEnd:
    """What the end of an epoch measured, and (with epochs="auto") the stop rule's decision after it."""

    epoch: int
    train_loss: float  # mean of the epoch's step losses
    validation_loss: float | None  # None without validation examples
    decision: StopDecision | None = None


def epoch_metadata(epochs: Sequence[EpochEnd]) -> dict[str, Any]:
    """What a finished run adds to an artifact's training metadata about its epochs: the validation losses and
    the kept validation loss (when validated), and the stop rule's outcome (with epochs="auto"). Empty otherwise,
    so a plain run's metadata (and digest) is unchanged."""
    out: dict[str, Any] = {}
    validation = [e.validation_loss for e in epochs if e.validation_loss is not None]
    last = epochs[-1] if epochs else None
    summary = auto_stop_summary(last, validated=bool(validation)) if last is not None else None
    if validation:
        out["validation_losses"] = validation
        out["validation_loss"] = validation[(summary["kept_epoch"] if summary else len(validation)) - 1]
    if summary is not None:
        out["auto_stop"] = summary
    return out


def auto_stop_summary(last: EpochEnd, *, validated: bool) -> dict[str, Any] | None:
    """How an epochs="auto" run ended, from its last epoch (None for a fixed epoch count): the epochs it ran, the
    epoch whose weights it kept (the best validated one, else the last), and why it stopped."""
    if last.decision is None:
        return None
    return {"epochs_run": last.epoch, "kept_epoch": last.decision.best_epoch if validated else last.epoch,
            "reason": last.decision.reason, "monitor": "validation_loss" if validated else "train_loss"}

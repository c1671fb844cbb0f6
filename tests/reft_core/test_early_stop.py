"""The stop rule of epochs="auto", as a pure function over per-epoch losses; then real short runs of the trainer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.config import InterventionConfig
from reft_core.early_stop import StopRule, decide
from reft_core.errors import InvalidConfigError
from reft_core.examples import TokenizedExample
from reft_core.trainer import ReftTrainer, TrainingConfig, train_intervention

RULE = StopRule(patience=2, min_delta=0.1, max_epochs=10)


@pytest.mark.parametrize(
    "losses,stop,best,reason",
    [
        ([1.0], False, 1, None),
        ([1.0, 0.5, 0.3], False, 3, None),  # still improving
        ([1.0, 0.95, 0.94], True, 3, "plateau"),  # 5% then 1%: below min_delta twice -> stop, keep the lowest
        ([1.0, 2.0, 3.0], True, 1, "plateau"),  # getting worse
        ([1.0, 0.95, 0.8], False, 3, None),  # 0.8 < 0.9: an improvement resets the wait
        ([1.0 - 0.2 * i for i in range(5)] + [0.15] * 0, False, 5, None),
        ([10.0 / (i + 1) for i in range(10)], True, 10, "max_epochs"),  # the cap
    ],
)
def test_stop_rule_table(losses, stop, best, reason) -> None:
    decision = decide(losses, RULE)
    assert (decision.stop, decision.best_epoch, decision.reason) == (stop, best, reason)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=12),
       st.integers(1, 4), st.floats(0.0, 0.5))
def test_stop_rule_properties(losses, patience, min_delta) -> None:
    rule = StopRule(patience=patience, min_delta=min_delta, max_epochs=12)
    decision = decide(losses, rule)
    assert losses[decision.best_epoch - 1] == min(losses) == decision.best_loss
    assert decision.best_epoch == losses.index(min(losses)) + 1  # ties: the earliest
    # a plateau is exactly: no loss in the last `patience` epochs beat the reference of the epoch before them
    if decision.reason == "plateau":
        assert len(losses) > patience
    # deciding is a function of the prefix: stopping earlier never depends on later epochs
    first_stop = next((n for n in range(1, len(losses) + 1) if decide(losses[:n], rule).stop), None)
    if first_stop is not None:
        assert decide(losses[:first_stop], rule).stop
    if len(losses) == 12:
        assert decision.stop


def test_a_flat_sequence_stops_after_patience_and_a_falling_one_runs_to_the_cap() -> None:
    assert [decide([1.0] * n, RULE).stop for n in range(1, 5)] == [False, False, True, True]
    falling = [0.5**i for i in range(10)]
    assert [decide(falling[:n], RULE).stop for n in range(1, 11)] == [False] * 9 + [True]
    with pytest.raises(InvalidConfigError):
        StopRule(patience=0)
    with pytest.raises(InvalidConfigError, match="auto"):
        TrainingConfig(epochs="sometimes")  # type: ignore[arg-type]


# Every prompt is answered with token 50 then EOS; the validation prompts are unseen ones.
EXAMPLES = [TokenizedExample(tuple(range(3 + 5 * i, 10 + 6 * i)), (50, 2)) for i in range(6)]
VALIDATION = [TokenizedExample(tuple(range(40 + i, 48 + i)), (50, 2)) for i in range(3)]
# Held-out prompts whose answer is another token: the more the persona learns, the worse these get (overfitting).
DIVERGING = [TokenizedExample(tuple(range(40 + i, 48 + i)), (60, 2)) for i in range(3)]
CONFIG = InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1", share_weights=False)


def test_validation_loss_is_the_training_loss_on_held_out_examples_every_epoch(model) -> None:
    training = TrainingConfig(epochs=3, batch_size=6, learning_rate=5e-2, seed=7)
    trainer = ReftTrainer(model, CONFIG, EXAMPLES, training, validation=VALIDATION)
    ends = []
    while not trainer.done:
        progress = trainer.step()
        if progress.epoch_end is not None:
            ends.append(progress.epoch_end)
            # the same loss, computed at once with no gradient, on the same weights
            assert progress.epoch_end.validation_loss == pytest.approx(float(trainer.loss(trainer.validation_indices)),
                                                                        rel=1e-5)
    assert [e.epoch for e in ends] == [1, 2, 3] and all(e.decision is None for e in ends)
    assert ends[-1].validation_loss < ends[0].validation_loss  # it generalises to the unseen prompts
    # validation changes nothing about training itself
    assert trainer.losses == train_intervention(model, CONFIG, EXAMPLES, training).losses


def test_sliced_like_the_server_runs_it_equals_whole_steps(model) -> None:
    """One slice per call (the server's shortest deadline): the last epoch's validation runs after the last
    optimizer step, and the run is not done before it."""
    training = TrainingConfig(epochs=2, batch_size=6, learning_rate=5e-2, seed=3)
    sliced = ReftTrainer(model, CONFIG, EXAMPLES, training, validation=DIVERGING)
    progress = drive_in_slices(sliced)
    whole = train_intervention(model, CONFIG, EXAMPLES, training, validation=DIVERGING)
    assert [p.loss for p in progress] == whole.losses
    assert [p.epoch_end for p in progress if p.epoch_end is not None] == whole.epochs
    assert len(whole.epochs) == 2 and all(e.validation_loss is not None for e in whole.epochs)


def drive_in_slices(trainer: ReftTrainer, snapshots: dict | None = None) -> list:
    progress = []
    while not trainer.done:
        step = trainer.advance(deadline=0.0)
        if step is not None:
            progress.append(step)
            if step.epoch_end is not None and snapshots is not None:
                snapshots[step.epoch] = trainer.intervention.export().tensors()
    return progress


def test_auto_stops_on_a_plateau_keeps_the_best_epoch_and_is_deterministic(model) -> None:
    training = TrainingConfig(epochs="auto", batch_size=6, learning_rate=5e-2, seed=3)
    whole = train_intervention(model, CONFIG, EXAMPLES, training, validation=DIVERGING)
    last = whole.epochs[-1].decision
    assert last is not None and last.stop and last.reason == "plateau" and len(whole.epochs) < 40
    validation = [e.validation_loss for e in whole.epochs]
    assert last.best_epoch == validation.index(min(validation)) + 1
    meta = whole.metadata(training, len(EXAMPLES))
    assert meta["auto_stop"]["kept_epoch"] == last.best_epoch < len(whole.epochs) == meta["auto_stop"]["epochs_run"]
    assert meta["validation_loss"] == min(validation) and meta["validation_losses"] == validation
    # again, in single slices and with another global RNG state: the same run, and its weights at every epoch end
    torch.manual_seed(99)
    trainer = ReftTrainer(model, CONFIG, EXAMPLES, training, validation=DIVERGING)
    snapshots: dict = {}
    progress = drive_in_slices(trainer, snapshots)
    assert [p.loss for p in progress] == whole.losses
    assert [p.epoch_end for p in progress if p.epoch_end is not None] == whole.epochs
    kept = trainer.result().tensors()  # the best epoch's weights, not the last epoch's
    assert all(torch.equal(kept[k], snapshots[last.best_epoch][k]) for k in kept)
    assert not all(torch.equal(kept[k], snapshots[len(snapshots)][k]) for k in kept)
    assert all(torch.equal(kept[k], whole.intervention.tensors()[k]) for k in kept)
    assert progress[-1].total_steps == progress[-1].step == trainer.step_count  # the plan shrank to what ran


def test_auto_without_validation_watches_the_training_loss_and_keeps_the_last_weights(model) -> None:
    training = TrainingConfig(epochs="auto", batch_size=3, learning_rate=1.0, seed=1)  # too high: it stalls at once
    result = train_intervention(model, CONFIG, EXAMPLES[:3], training)
    stop = result.metadata(training, len(EXAMPLES))["auto_stop"]
    assert stop["monitor"] == "train_loss" and stop["kept_epoch"] == stop["epochs_run"] == len(result.epochs)
    assert "validation_loss" not in result.metadata(training, len(EXAMPLES))
    assert stop["reason"] == "plateau" and len(result.losses) == len(result.epochs) < 40

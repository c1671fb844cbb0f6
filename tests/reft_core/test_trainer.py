"""Trainer: learns (loss falls), is deterministic for a seed, keeps R orthonormal, and reports progress."""

from __future__ import annotations

import pytest
import torch

from reft_core.config import InterventionConfig
from reft_core.errors import InvalidConfigError
from reft_core.examples import TokenizedExample
from reft_core.generate import generate
from reft_core.frozen_context import ModelDims
from reft_core.trainer import ReftTrainer, TrainingConfig, TrainingProgress, train_intervention
from reft_core.training_memory import estimate_training_memory
from tests import tiny

# Every prompt should be answered with token 50 then EOS (2): a persona a tiny random model can learn.
EXAMPLES = [TokenizedExample(tuple(range(3 + 5 * i, 10 + 6 * i)), (50, 2)) for i in range(6)]
TRAINING = TrainingConfig(epochs=30, batch_size=3, learning_rate=5e-2, seed=7)


@pytest.mark.parametrize(
    "config",
    [
        InterventionConfig(layers=(1,), rank=4, positions="l1"),
        InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1", share_weights=False),
    ],
    ids=["l1", "f1+l1"],
)
def test_training_learns_and_keeps_rotation_orthonormal(model, config) -> None:
    seen: list[TrainingProgress] = []
    result = train_intervention(model, config, EXAMPLES, TRAINING, on_progress=seen.append)
    assert [p.step for p in seen] == list(range(1, 61)) and seen[-1].total_steps == 60 and seen[-1].epoch == 30
    assert result.losses[-1] < 0.6 * result.losses[0]
    for weights in result.intervention.units.values():
        torch.testing.assert_close(weights.R @ weights.R.T, torch.eye(config.rank), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())
    unseen = [list(range(40, 49)), [9, 8, 7, 6, 5, 4]]
    answers = generate(model, unseen, [result.intervention] * 2, max_new_tokens=1)
    assert answers == [[50], [50]] != generate(model, unseen, [None] * 2, max_new_tokens=1)


def test_same_seed_same_result_other_seed_differs(model) -> None:
    config = InterventionConfig(layers=(2,), rank=4, positions="l1")
    short = TrainingConfig(epochs=3, batch_size=4, learning_rate=1e-2, seed=1)
    first = train_intervention(model, config, EXAMPLES, short)
    torch.manual_seed(123)  # the global RNG must not matter
    second = train_intervention(model, config, EXAMPLES, short)
    third = train_intervention(model, config, EXAMPLES, TrainingConfig(epochs=3, batch_size=4, learning_rate=1e-2, seed=2))
    assert first.losses == second.losses and first.losses != third.losses
    unit = config.units()[0]
    assert torch.equal(first.intervention.units[unit].W, second.intervention.units[unit].W)


def test_loss_only_counts_completion_tokens(model) -> None:
    """Changing prompt tokens' would-be labels cannot matter: the loss equals a hand-computed completion-only CE."""
    config = InterventionConfig(layers=(2,), rank=4, positions="l1")
    trainer = ReftTrainer(model, config, EXAMPLES[:2], TrainingConfig(epochs=1, batch_size=2))
    with torch.no_grad():
        ours = trainer.loss([0, 1])
        logits_rows, targets = [], []
        for ex in EXAMPLES[:2]:
            edits = trainer._edits([len(ex.prompt_ids)], [0])
            from reft_core.hooks import editing_layers

            with editing_layers(model, edits):
                logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            start = len(ex.prompt_ids)
            logits_rows.append(logits[start - 1 : len(ex.input_ids) - 1])
            targets.extend(ex.completion_ids)
        expected = torch.nn.functional.cross_entropy(torch.cat(logits_rows), torch.tensor(targets))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_bad_training_input_is_refused(model) -> None:
    with pytest.raises(InvalidConfigError, match="out of range"):
        ReftTrainer(model, InterventionConfig(layers=(9,), rank=2), EXAMPLES)
    with pytest.raises(InvalidConfigError, match="at least one"):
        ReftTrainer(model, InterventionConfig(layers=(1,), rank=2), [])
    with pytest.raises(InvalidConfigError, match="epochs"):
        TrainingConfig(epochs=0)


@pytest.mark.parametrize(
    "config",
    [
        InterventionConfig(layers=(2,), rank=4, positions="l1"),
        InterventionConfig(layers=(1, 3), rank=2, positions="f1+l1", share_weights=False),
        InterventionConfig(layers=(0,), rank=2, positions="f2+l2", share_weights=True),
    ],
    ids=["l1", "f1+l1", "f2+l2@0"],
)
def test_frozen_context_training_equals_full_forward_training(model, config) -> None:
    """Reusing the unchanging prefix and lower layers must not change the loss or the learned weights."""
    short = TrainingConfig(epochs=4, batch_size=4, learning_rate=2e-2, seed=3)
    fast_trainer = ReftTrainer(model, config, EXAMPLES, short)
    fast_trainer.step()
    assert max(c.start for c in fast_trainer._contexts.values()) > 0 or config.position_spec.first
    fast = train_intervention(model, config, EXAMPLES, short)
    full = train_intervention(model, config, EXAMPLES, short, reuse_frozen_context=False)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(full.losses), rtol=1e-4, atol=1e-5)
    for unit in config.units():
        torch.testing.assert_close(fast.intervention.units[unit].W, full.intervention.units[unit].W, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1"), InterventionConfig(layers=(3,), rank=4, positions="l1")],
    ids=["f1+l1", "l1@3"],
)
def test_sliced_training_equals_whole_steps_and_leaves_the_model_bare_between_slices(model, config) -> None:
    """Training paused after every slice (as the server runs it) learns exactly what uninterrupted steps learn,
    and in every pause the shared model computes what the bare model computes (nothing left attached)."""
    short = TrainingConfig(epochs=2, batch_size=4, learning_rate=2e-2, seed=5)
    whole = train_intervention(model, config, EXAMPLES, short)
    probe = torch.tensor([list(range(20, 32))])
    with torch.no_grad():
        bare = model(input_ids=probe).logits
    # one example per micro-batch, one label per LM-head slice
    trainer = ReftTrainer(model, config, EXAMPLES, short, micro_batch_tokens=1, head_chunk_tokens=1)
    slices, losses = 0, []
    while not trainer.done:
        progress = trainer.advance(deadline=0.0)  # already past: exactly one slice per call
        slices += 1
        if progress is not None:
            losses.append(progress.loss)
        assert torch.is_grad_enabled()  # grad mode is the thread's: no slice may leave it changed for the caller
        with torch.no_grad():
            assert torch.equal(model(input_ids=probe).logits, bare)
    layers_trained = tiny.LAYERS - min(config.layers)
    # Frozen contexts: per example, one slice per layer below the first edited one, plus one per layer above it when
    # the example has an unchanging prefix. Then per example (its own micro-batch) a forward and a backward slice per
    # trained layer, one per label for the head and loss, and per step one for the optimizer.
    first = min(config.layers)
    prefix = 0 if config.position_spec.first else tiny.LAYERS - first
    per_micro_batch = 2 * layers_trained + len(EXAMPLES[0].completion_ids)
    expected = len(EXAMPLES) * (first + prefix) + short.epochs * len(EXAMPLES) * per_micro_batch + trainer.total_steps
    assert slices == expected
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole.losses), rtol=1e-5, atol=1e-6)
    for unit in config.units():
        torch.testing.assert_close(trainer.result().units[unit].W, whole.intervention.units[unit].W, rtol=1e-4, atol=1e-5)


def test_a_job_stopped_in_its_first_slices_leaves_the_thread_able_to_train(model) -> None:
    """A server stops a job between slices (cancelled, or another replica took it over) and drops its trainer; the
    next job on the same thread must still get gradients (a slice that kept no_grad entered broke it)."""
    config = InterventionConfig(layers=(2,), rank=2, positions="f1+l1")
    short = TrainingConfig(epochs=1, batch_size=2, seed=3)
    expected = train_intervention(model, config, EXAMPLES[:2], short)
    stopped = ReftTrainer(model, config, EXAMPLES[:2], short)
    assert stopped.advance(deadline=0.0) is None  # one slice: inside the first example's frozen context
    assert torch.is_grad_enabled()
    del stopped  # abandoned mid-step (its generators are collected whenever the garbage collector gets to them)
    again = train_intervention(model, config, EXAMPLES[:2], short)
    assert again.losses == expected.losses


def _storage_bytes(trainer: ReftTrainer) -> int:
    """Bytes of the distinct storages behind the contexts a trainer keeps (a view of a larger tensor counts whole)."""
    storages = {}
    for context in trainer._contexts.values():
        for tensor in (*context.prefix_keys, *context.prefix_values, context.suffix_input):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(
    "config",
    [InterventionConfig(layers=(2,), rank=4, positions="l1"),
     InterventionConfig(layers=(1, 3), rank=2, positions="f1+l1", share_weights=False)],
    ids=["l1", "f1+l1"],
)
def test_recomputed_contexts_train_exactly_as_kept_ones(model, config) -> None:
    """A context budget only trades memory for time: none kept, some kept or all kept, the same seed learns the
    same losses and weights, and what is kept stays within the budget."""
    short = TrainingConfig(epochs=3, batch_size=4, learning_rate=2e-2, seed=11)
    runs = {}
    for budget in (None, 0, 10_000):
        trainer = ReftTrainer(model, config, EXAMPLES, short, context_budget_bytes=budget)
        while not trainer.done:
            trainer.step()
        runs[budget] = trainer
        assert budget is None or _storage_bytes(trainer) <= budget
    assert _storage_bytes(runs[0]) == 0 < _storage_bytes(runs[10_000]) < _storage_bytes(runs[None])
    for budget in (0, 10_000):
        torch.testing.assert_close(torch.tensor(runs[budget].losses), torch.tensor(runs[None].losses), rtol=1e-5, atol=1e-6)
        for unit in config.units():
            torch.testing.assert_close(runs[budget].result().units[unit].W, runs[None].result().units[unit].W,
                                       rtol=1e-5, atol=1e-6)


def test_micro_batch_cap_bounds_every_micro_batch_and_keeps_the_gradient(model) -> None:
    config = InterventionConfig(layers=(1,), rank=4, positions="f1+l1")
    short = TrainingConfig(epochs=2, batch_size=6, learning_rate=2e-2, seed=4)
    whole = train_intervention(model, config, EXAMPLES, short)
    capped = ReftTrainer(model, config, EXAMPLES, short, max_micro_batch_tokens=30)
    capped.fine_slices = False  # the cap holds even where slices may be long
    for chunk in capped._micro_batches(range(len(EXAMPLES))):
        padded = len(chunk) * max(len(EXAMPLES[i].input_ids) for i in chunk)
        assert padded <= 30 or len(chunk) == 1
    assert capped._head_chunk(1000) == 30
    while not capped.done:
        capped.step()
    torch.testing.assert_close(torch.tensor(capped.losses), torch.tensor(whole.losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", [None, 10_000])
@pytest.mark.parametrize("positions", ["l1", "f1+l1", "f2+l2"])
def test_memory_estimate_matches_the_contexts_a_trainer_keeps(model, positions, budget) -> None:
    """Predicted from token counts before training, measured as the storages the trainer holds after an epoch."""
    config = InterventionConfig(layers=(1, 2), rank=2, positions=positions)
    training = TrainingConfig(epochs=1, batch_size=3)
    estimate = estimate_training_memory(ModelDims.from_model(model), config, EXAMPLES, batch_size=3,
                                        context_budget_bytes=budget)
    trainer = ReftTrainer(model, config, EXAMPLES, training, context_budget_bytes=budget)
    while not trainer.done:
        trainer.step()
    measured = _storage_bytes(trainer)
    assert 0.5 * measured <= estimate.kept_bytes <= 2 * measured
    assert budget is None or estimate.kept_bytes <= budget < estimate.context_bytes
    capped = estimate_training_memory(ModelDims.from_model(model), config, EXAMPLES, batch_size=3,
                                      context_budget_bytes=budget, max_micro_batch_tokens=8)
    assert capped.working_bytes < estimate.working_bytes  # the cap bounds a micro-batch to one example here


def test_training_on_a_bfloat16_model_follows_float32() -> None:
    """The GPU dtype: the frozen model in bf16 (the intervention still learns in fp32) gives the loss curve of the
    same training in fp32, within bf16 rounding, and the learned intervention lowers the loss the same way."""
    examples = [TokenizedExample(tuple(range(3 + 5 * i, 10 + 6 * i)), (50, 2)) for i in range(6)]
    config = InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1")
    curves = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny.tiny_llama().to(dtype)
        result = train_intervention(model, config, examples, TrainingConfig(epochs=30, learning_rate=2e-2))
        assert all(t.dtype == torch.float32 for t in result.intervention.tensors().values())
        curves.append(torch.tensor(result.losses))
    fp32, bf16 = curves
    assert fp32[-1] < 0.5 * fp32[0]
    torch.testing.assert_close(bf16, fp32, rtol=0.03, atol=0.0)

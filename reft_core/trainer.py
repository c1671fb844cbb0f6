"""Train an intervention on a frozen model from tokenized (prompt, completion) examples.

pyreft's recipe: AdamW with a linear decay to zero, gradient-norm clipping at 1.0 (HF Trainer defaults),
cross-entropy on completion + EOS tokens only, intervening on the prompt positions given by the config. Seeded and
deterministic: the seed fixes the initial weights and the per-epoch shuffles, without touching the global RNG.

`ReftTrainer.step()` runs one optimizer step and returns progress, so a caller can interleave training with other
work (the server runs slices between serving steps); `train_intervention` is the run-to-completion wrapper.
Only the intervention's parameters require grad, so autograd does no work below the lowest intervened layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from reft_core.config import InterventionConfig
from reft_core.errors import InvalidConfigError
from reft_core.examples import TokenizedExample
from reft_core.frozen_context import FrozenContext, compute_frozen_context, forward_suffix, supports_frozen_context
from reft_core.functional import add_at_positions, gather_positions
from reft_core.hooks import LayerEdit, decoder_layers, editing_layers
from reft_core.intervention import Intervention
from reft_core.modules import TrainableIntervention, TrainableUnit


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 100
    learning_rate: float = 4e-3
    batch_size: int = 10
    seed: int = 42
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InvalidConfigError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1):
            raise InvalidConfigError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not isinstance(self.seed, int):
            raise InvalidConfigError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total_steps: int
    epoch: int  # 1-based epoch of this step
    loss: float


@dataclass
class TrainingResult:
    intervention: Intervention
    losses: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    def metadata(self, training: TrainingConfig, num_examples: int) -> dict[str, Any]:
        return training.to_dict() | {
            "examples": num_examples,
            "steps": len(self.losses),
            "final_loss": self.losses[-1] if self.losses else None,
            "duration_s": round(self.duration_s, 3),
        }


class ReftTrainer:
    def __init__(
        self,
        model: nn.Module,
        config: InterventionConfig,
        examples: Sequence[TokenizedExample],
        training: TrainingConfig = TrainingConfig(),
        *,
        reuse_frozen_context: bool = True,
    ) -> None:
        if not examples:
            raise InvalidConfigError("at least one training example is required")
        hidden_size = int(model.config.hidden_size)
        config.check_against_model(hidden_size, len(decoder_layers(model)))
        self.model = model.requires_grad_(False)  # frozen: only the intervention learns
        self.config = config
        self.examples = list(examples)
        self.training = training
        self.device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(training.seed)
            self.intervention = TrainableIntervention(config, hidden_size).to(self.device)
        self._shuffle = torch.Generator().manual_seed(training.seed)
        self.steps_per_epoch = math.ceil(len(self.examples) / training.batch_size)
        self.total_steps = self.steps_per_epoch * training.epochs
        self.optimizer = torch.optim.AdamW(
            self.intervention.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, (self.total_steps - step) / self.total_steps)
        )
        self.step_count = 0
        self.losses: list[float] = []
        self._epoch_batches: list[list[int]] = []
        self.first_layer = min(config.layers)
        self._contexts: list[FrozenContext] | None = None
        if reuse_frozen_context and supports_frozen_context(model):
            self._contexts = [
                compute_frozen_context(model, ex.input_ids, self._first_changing_position(ex), self.first_layer)
                for ex in self.examples
            ]

    def _first_changing_position(self, example: TokenizedExample) -> int:
        """Earliest position an edit can affect; also no later than the first position that predicts a label."""
        prompt_len = len(example.prompt_ids)
        edited = [p for group in self.config.groups for p in self.config.positions_for(group, prompt_len)]
        return min(edited + [prompt_len - 1])

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    def step(self) -> TrainingProgress:
        """One optimizer step on the next batch."""
        assert not self.done, "training already finished"
        if not self._epoch_batches:
            order = torch.randperm(len(self.examples), generator=self._shuffle).tolist()
            size = self.training.batch_size
            self._epoch_batches = [order[i : i + size] for i in range(0, len(order), size)]
        indices = self._epoch_batches.pop(0)
        self.intervention.train()
        loss = self._loss(indices)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.intervention.parameters(), self.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        self.losses.append(float(loss.detach()))
        epoch = (self.step_count - 1) // self.steps_per_epoch + 1
        return TrainingProgress(self.step_count, self.total_steps, epoch, self.losses[-1])

    def result(self) -> Intervention:
        return self.intervention.export()

    def _loss(self, indices: Sequence[int]) -> Tensor:
        """Mean cross-entropy over the completion + EOS tokens of the examples at `indices`.

        The batch runs as length buckets (one long example does not pad nine short ones); summing per-bucket
        token losses and dividing by the batch's token count gives exactly the one-batch mean.
        """
        total = sum(len(self.examples[i].completion_ids) for i in indices)
        losses = [self._loss_sum(bucket) for bucket in self._buckets(indices)]
        return torch.stack(losses).sum() / total

    def _buckets(self, indices: Sequence[int]) -> list[list[int]]:
        """Group examples whose computed lengths are within 2x of each other (bounds padding to half)."""
        def length(i: int) -> int:
            start = self._contexts[i].start if self._contexts is not None else 0
            return len(self.examples[i].input_ids) - start

        buckets: list[list[int]] = []
        for i in sorted(indices, key=length):
            if buckets and length(i) <= 2 * length(buckets[-1][0]):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        return buckets

    def _loss_sum(self, indices: Sequence[int]) -> Tensor:
        batch = [self.examples[i] for i in indices]
        contexts = [self._contexts[i] for i in indices] if self._contexts is not None else None
        starts = [c.start for c in contexts] if contexts is not None else [0] * len(batch)
        edits = self._edits([len(ex.prompt_ids) for ex in batch], starts)
        with editing_layers(self.model, edits):
            if contexts is not None:
                hidden = forward_suffix(self.model, contexts, self.first_layer)  # [B, S, d], S from each start
            else:
                hidden = self._forward_full(batch)  # [B, T, d]
        # Logit at position t predicts token t+1: predict each completion token from the position before it.
        rows, cols, targets = [], [], []
        for row, (ex, start) in enumerate(zip(batch, starts)):
            first = len(ex.prompt_ids) - 1 - start
            for offset, token in enumerate(ex.completion_ids):
                rows.append(row)
                cols.append(first + offset)
                targets.append(token)
        selected = hidden[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]
        logits = self.model.get_output_embeddings()(selected).float()  # only where there is a label
        return nn.functional.cross_entropy(logits, torch.tensor(targets, device=self.device), reduction="sum")

    def _forward_full(self, batch: Sequence[TokenizedExample]) -> Tensor:
        lengths = [len(ex.input_ids) for ex in batch]
        input_ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ex in enumerate(batch):  # right padding: prompt positions need no offset
            input_ids[row, : lengths[row]] = torch.tensor(ex.input_ids)
            attention_mask[row, : lengths[row]] = 1
        return self.model.get_decoder()(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
        ).last_hidden_state

    def _edits(self, prompt_lengths: list[int], starts: list[int]) -> dict[int, LayerEdit]:
        """Per-layer edit functions; positions are shifted by each row's `start` (where its sequence begins)."""
        by_layer: dict[int, list[tuple[TrainableUnit, Tensor, Tensor]]] = {}
        for unit, module in self.intervention.units():
            per_row = [[p - s for p in self.config.positions_for(unit.group, n)] for n, s in zip(prompt_lengths, starts)]
            width = max(len(p) for p in per_row)
            if width == 0:
                continue
            positions = torch.tensor([p + [0] * (width - len(p)) for p in per_row], device=self.device)
            mask = torch.tensor(
                [[1.0] * len(p) + [0.0] * (width - len(p)) for p in per_row], device=self.device
            ).unsqueeze(-1)
            by_layer.setdefault(unit.layer, []).append((module, positions, mask))

        def make_edit(entries: list[tuple[TrainableUnit, Tensor, Tensor]]) -> LayerEdit:
            def edit(h: Tensor) -> Tensor:
                for module, positions, mask in entries:  # units of one layer touch disjoint positions
                    gathered = gather_positions(h, positions).float()  # [B, P, d]
                    h = add_at_positions(h, positions, (module(gathered) - gathered) * mask)
                return h

            return edit

        return {layer: make_edit(entries) for layer, entries in by_layer.items()}


def train_intervention(
    model: nn.Module,
    config: InterventionConfig,
    examples: Sequence[TokenizedExample],
    training: TrainingConfig = TrainingConfig(),
    on_progress: Callable[[TrainingProgress], None] | None = None,
    *,
    reuse_frozen_context: bool = True,
) -> TrainingResult:
    started = time.perf_counter()
    trainer = ReftTrainer(model, config, examples, training, reuse_frozen_context=reuse_frozen_context)
    while not trainer.done:
        progress = trainer.step()
        if on_progress is not None:
            on_progress(progress)
    return TrainingResult(trainer.result(), trainer.losses, time.perf_counter() - started)

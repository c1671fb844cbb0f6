"""Train an intervention on a frozen model from tokenized (prompt, completion) examples.

pyreft's recipe: AdamW with a linear decay to zero, gradient-norm clipping at 1.0 (HF Trainer defaults),
cross-entropy on completion + EOS tokens only, intervening on the prompt positions given by the config. Seeded and
deterministic: the seed fixes the initial weights and the per-epoch shuffles, without touching the global RNG.

Training is cut into short slices so a caller can interleave it with other work on the same thread: the server
runs slices between serving steps. `ReftTrainer.advance(deadline)` runs slices until a deadline or the end of an
optimizer step; a slice is one example's frozen context, or one decoder layer's forward or backward for one
micro-batch (the layers are run one by one, and backpropagation goes layer by layer through detached layer
boundaries, which gives the same gradients as one backward call). `step()` runs a whole optimizer step and
`train_intervention` runs to completion. Only the intervention's parameters require grad, so autograd does no work
below the lowest intervened layer.

Validation examples, if given, are scored at the end of every epoch (the same loss, without gradient work, also in
slices). With `epochs="auto"` the trainer owns the stop rule (early_stop.py): it trains up to the rule's cap and
stops on a plateau of the validation loss (else of the epoch's mean training loss), then, with validation data,
returns the best epoch's weights. The learning rate decays linearly over the cap, so a run is deterministic for a
seed whether or not it stops early.

Frozen contexts (see frozen_context.py) are kept for the whole job only within `context_budget_bytes`: examples
in order, each kept if it still fits; the others are recomputed each time their micro-batch runs (same values, so
the same gradients; tested). `estimate_training_memory` predicts, from token counts alone, what a job keeps and the
working memory of its largest micro-batch, so a server can admit a job before it starts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from reft_core import recipe
from reft_core.config import InterventionConfig
from reft_core.early_stop import EpochEnd, StopRule, decide, epoch_metadata
from reft_core.errors import InvalidConfigError
from reft_core.examples import TokenizedExample
from reft_core.frozen_context import (
    FrozenContext,
    ModelDims,
    SuffixPass,
    first_changing_position,
    frozen_context_work,
    supports_frozen_context,
)
from reft_core.functional import add_at_positions, gather_positions
from reft_core.hooks import LayerEdit, decoder_layers, editing_layers
from reft_core.intervention import Intervention
from reft_core.modules import TrainableIntervention, TrainableUnit
from reft_core.training_memory import kept_contexts


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int | Literal["auto"] = recipe.EPOCHS  # "auto": stop on a plateau (StopRule), up to its cap
    learning_rate: float = recipe.LEARNING_RATE
    batch_size: int = recipe.BATCH_SIZE
    seed: int = recipe.SEED
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs != "auto" and (not isinstance(self.epochs, int) or isinstance(self.epochs, bool)
                                      or self.epochs < 1):
            raise InvalidConfigError(f'epochs must be a positive integer or "auto", got {self.epochs!r}')
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1):
            raise InvalidConfigError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not isinstance(self.seed, int):
            raise InvalidConfigError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def stop_rule(self) -> StopRule | None:
        return StopRule() if self.epochs == "auto" else None

    @property
    def max_epochs(self) -> int:
        """Epochs the job runs at most (the learning rate decays over them)."""
        return self.epochs if isinstance(self.epochs, int) else StopRule().max_epochs


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total_steps: int  # planned; with epochs="auto" this is `step` once the rule stops
    epoch: int  # 1-based epoch of this step
    loss: float
    epoch_end: EpochEnd | None = None  # set on an epoch's last step


@dataclass
class TrainingResult:
    intervention: Intervention
    losses: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    epochs: list[EpochEnd] = field(default_factory=list)

    def metadata(self, training: TrainingConfig, num_examples: int) -> dict[str, Any]:
        return training_metadata(training, num_examples, self.losses) | epoch_metadata(self.epochs)


def training_metadata(training: TrainingConfig, num_examples: int, losses: Sequence[float]) -> dict[str, Any]:
    """What a trained artifact records about its training, wherever it ran (library, CLI, server).

    Only what the result depends on, so the same examples, recipe and seed give the same artifact digest locally and
    on a server: no wall time, job id or name (a server keeps those in its job record). A run's epochs add their
    validation losses and stop (`epoch_metadata`), which depend only on the same inputs.
    """
    return training.to_dict() | {
        "examples": num_examples, "steps": len(losses), "final_loss": losses[-1] if losses else None,
    }


class ReftTrainer:
    def __init__(
        self,
        model: nn.Module,
        config: InterventionConfig,
        examples: Sequence[TokenizedExample],
        training: TrainingConfig = TrainingConfig(),
        *,
        validation: Sequence[TokenizedExample] = (),
        reuse_frozen_context: bool = True,
        micro_batch_tokens: int | None = None,
        head_chunk_tokens: int | None = None,
        context_budget_bytes: int | None = None,
        max_micro_batch_tokens: int | None = None,
    ) -> None:
        """`context_budget_bytes` caps the frozen contexts kept for the whole job (None: keep all; 0: keep none,
        recompute each when its micro-batch runs). `max_micro_batch_tokens` caps, in every mode, a micro-batch's
        padded prefix + suffix tokens and an LM-head slice's labels: what one micro-batch's working memory grows
        with (None: no cap; a longer example still runs, alone). `micro_batch_tokens` caps the padded tokens of one micro-batch (None: whole length buckets) and
        `head_chunk_tokens` the label positions per LM-head slice (None: all of a micro-batch's at once; the head is
        the costliest part per token for small models with large vocabularies). Smaller values make shorter slices;
        the gradient is the same (partial losses are summed, then divided once). Setting `fine_slices` to False
        (a caller with nothing else to do) uses whole buckets and heads from the next step or micro-batch on."""
        if not examples:
            raise InvalidConfigError("at least one training example is required")
        hidden_size = int(model.config.hidden_size)
        config.check_against_model(hidden_size, len(decoder_layers(model)))
        self.model = model.requires_grad_(False)  # frozen: only the intervention learns
        self.config = config
        self.examples = list(examples)
        # Training examples, then validation ones: indices below len(examples) are training examples. Validation
        # contexts are kept within the same budget (they are scored every epoch).
        self._pool = self.examples + list(validation)
        self.validation_indices = list(range(len(self.examples), len(self._pool)))
        self.training = training
        self.stop_rule = training.stop_rule
        self.micro_batch_tokens = micro_batch_tokens
        self.head_chunk_tokens = head_chunk_tokens
        self.max_micro_batch_tokens = max_micro_batch_tokens
        self.fine_slices = True
        self.device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(training.seed)
            self.intervention = TrainableIntervention(config, hidden_size).to(self.device)
        self._shuffle = torch.Generator().manual_seed(training.seed)
        self.steps_per_epoch = math.ceil(len(self.examples) / training.batch_size)
        self.total_steps = self.steps_per_epoch * training.max_epochs
        self.optimizer = torch.optim.AdamW(
            self.intervention.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, (self.total_steps - step) / self.total_steps)
        )
        self.step_count = 0
        self.losses: list[float] = []
        self.epochs: list[EpochEnd] = []
        self._stopped = False  # the stop rule ended the run before total_steps
        self._best_state: dict[str, Tensor] | None = None  # weights of the best validated epoch (epochs="auto")
        self._epoch_batches: list[list[int]] = []
        self.first_layer = min(config.layers)
        self._reuse_frozen_context = reuse_frozen_context and supports_frozen_context(model)
        self._starts = [first_changing_position(config, ex) if self._reuse_frozen_context else 0 for ex in self._pool]
        self._keep = kept_contexts(self._context_sizes(), context_budget_bytes)
        self._contexts: dict[int, FrozenContext] = {}  # example index -> context kept for the whole job
        self._work: Generator[None, None, TrainingProgress] | None = None

    def _context_sizes(self) -> list[int]:
        if not self._reuse_frozen_context:
            return []
        dims = ModelDims.from_model(self.model)
        return [dims.context_nbytes(len(ex.input_ids), start, self.first_layer)
                for ex, start in zip(self._pool, self._starts)]

    @property
    def done(self) -> bool:
        # a step's work runs past its step count (the epoch's validation follows the optimizer step): not done yet
        return self._work is None and (self._stopped or self.step_count >= self.total_steps)

    def advance(self, deadline: float | None = None) -> TrainingProgress | None:
        """Run slices until `deadline` (a `time.perf_counter()` value) passes or the current optimizer step ends.

        Runs at least one slice. Returns the step's progress when a step ended, else None (call again).
        """
        assert not self.done, "training already finished"
        if self._work is None:
            self._work = self._step_work()
        while True:
            try:
                next(self._work)
            except StopIteration as finished:
                self._work = None
                return finished.value
            if deadline is not None and time.perf_counter() >= deadline:
                return None

    def step(self) -> TrainingProgress:
        """One whole optimizer step on the next batch."""
        progress = self.advance()
        assert progress is not None
        return progress

    def result(self) -> Intervention:
        """The trained intervention: the best validated epoch's weights when the stop rule chose one, else the last."""
        if self._best_state is not None:
            self.intervention.load_state_dict(self._best_state)
        return self.intervention.export()

    @torch.no_grad()
    def loss(self, indices: Sequence[int]) -> Tensor:
        """The loss on the examples at `indices` (training ones, then validation ones: see `validation_indices`)
        with the current weights (no gradient work)."""
        return _drain(self._loss_work(indices))

    def _loss_work(self, indices: Sequence[int]) -> Generator[None, None, Tensor]:
        """`loss` in slices, each without gradient work (a validation pass between serving steps)."""
        total = sum(len(self._pool[i].completion_ids) for i in indices)
        loss = torch.zeros((), device=self.device)
        for chunk in self._micro_batches(indices):
            work = self._micro_batch(chunk, total, backward=False)
            while True:  # grad mode is thread state: set it per slice, never across a yield to the caller
                with torch.no_grad():
                    try:
                        next(work)
                    except StopIteration as finished:
                        loss = loss + finished.value
                        break
                yield
        return loss

    # -- slices ----------------------------------------------------------------------------------------------------
    def _step_work(self) -> Generator[None, None, TrainingProgress]:
        if not self._epoch_batches:
            order = torch.randperm(len(self.examples), generator=self._shuffle).tolist()
            size = self.training.batch_size
            self._epoch_batches = [order[i : i + size] for i in range(0, len(order), size)]
        indices = self._epoch_batches.pop(0)
        self.intervention.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Mean cross-entropy over the batch's completion + EOS tokens: each micro-batch backpropagates its token-loss
        # sum divided by the batch's token count, so the accumulated gradient is exactly the one-batch gradient.
        total = sum(len(self._pool[i].completion_ids) for i in indices)
        loss = torch.zeros((), device=self.device)
        for chunk in self._micro_batches(indices):
            loss = loss + (yield from self._micro_batch(chunk, total, backward=True))
        torch.nn.utils.clip_grad_norm_(self.intervention.parameters(), self.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        self.losses.append(float(loss))
        epoch = (self.step_count - 1) // self.steps_per_epoch + 1
        epoch_end = None
        if self.step_count % self.steps_per_epoch == 0:
            epoch_end = yield from self._end_epoch(epoch)
        total = self.step_count if self._stopped else self.total_steps
        return TrainingProgress(self.step_count, total, epoch, self.losses[-1], epoch_end)

    def _end_epoch(self, epoch: int) -> Generator[None, None, EpochEnd]:
        """Score the validation examples, and with epochs="auto" apply the stop rule (keeping the best weights)."""
        validation = None
        if self.validation_indices:
            validation = float((yield from self._loss_work(self.validation_indices)))
        steps = self.losses[-self.steps_per_epoch:]
        train_loss = sum(steps) / len(steps)
        decision = None
        if self.stop_rule is not None:
            monitored = [e.validation_loss if validation is not None else e.train_loss for e in self.epochs]
            decision = decide([*monitored, validation if validation is not None else train_loss], self.stop_rule)
            if validation is not None and decision.best_epoch == epoch:
                self._best_state = {k: v.detach().clone() for k, v in self.intervention.state_dict().items()}
            self._stopped = decision.stop
        end = EpochEnd(epoch, train_loss, validation, decision)
        self.epochs.append(end)
        return end

    def _frozen_contexts(self, indices: Sequence[int]) -> Generator[None, None, list[FrozenContext]]:
        """The examples' contexts: kept ones as they are, the others computed now (one decoder layer per slice) and
        kept only if the budget reserved room for them (then this is their first and only computation)."""
        contexts = []
        for i in indices:
            context = self._contexts.get(i)
            if context is None:
                context = yield from frozen_context_work(
                    self.model, self._pool[i].input_ids, self._starts[i], self.first_layer
                )
                if self._keep[i]:
                    self._contexts[i] = context
            contexts.append(context)
        return contexts

    @property
    def kept_context_bytes(self) -> int:
        """Tensor bytes of the frozen contexts held for the whole job (what `context_budget_bytes` caps)."""
        return sum(c.nbytes for c in self._contexts.values())

    def _micro_batches(self, indices: Sequence[int]) -> list[list[int]]:
        """Length buckets (examples within 2x of each other: padding at most half), split to `micro_batch_tokens`
        (suffix tokens, while slices must be fine) and `max_micro_batch_tokens` (prefix + suffix, always)."""
        buckets: list[list[int]] = []
        for i in sorted(indices, key=self._suffix_length):
            if buckets and self._fits(buckets[-1], i):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        return buckets

    def _suffix_length(self, i: int) -> int:
        return len(self._pool[i].input_ids) - self._starts[i]

    def _fits(self, bucket: list[int], i: int) -> bool:
        """Whether example `i` (the longest suffix so far: sorted) may join `bucket`."""
        suffix, rows = self._suffix_length(i), len(bucket) + 1
        if suffix > 2 * self._suffix_length(bucket[0]):
            return False
        if self.micro_batch_tokens is not None and self.fine_slices and suffix * rows > self.micro_batch_tokens:
            return False
        prefix = max(self._starts[j] for j in (*bucket, i))  # prefixes are left-padded to the longest
        return self.max_micro_batch_tokens is None or (prefix + suffix) * rows <= self.max_micro_batch_tokens

    def _micro_batch(self, indices: Sequence[int], total: int, *, backward: bool) -> Generator[None, None, Tensor]:
        """Loss contribution (token-loss sum / `total`) of one micro-batch; with `backward`, also its gradient."""
        batch = [self._pool[i] for i in indices]
        if not self._reuse_frozen_context:  # no layer-by-layer path for this architecture: one slice
            loss = self._loss_full(batch) / total
            if backward:
                loss.backward()
            yield
            return loss.detach()
        contexts = yield from self._frozen_contexts(indices)
        starts = [c.start for c in contexts]
        edits = self._edits([len(ex.prompt_ids) for ex in batch], starts)
        suffix = SuffixPass(self.model, contexts, self.first_layer)
        # Each layer runs on a detached copy of its input so that backpropagation can stop at every layer boundary.
        boundaries: list[tuple[Tensor, Tensor]] = []
        hidden = suffix.inputs
        for index in suffix.layer_indices:
            layer_input = hidden.detach().requires_grad_(backward and bool(boundaries))
            hidden = suffix.layer(index, layer_input)
            if index in edits:
                hidden = edits[index](hidden)
            boundaries.append((layer_input, hidden))
            yield
        top = hidden.detach().requires_grad_(backward)
        rows, cols, targets = self._labels(batch, starts)
        chunk = self._head_chunk(len(targets))
        loss = torch.zeros((), device=self.device)
        for first in range(0, len(targets), chunk):  # gradients of the chunks accumulate in top.grad
            pick = slice(first, first + chunk)
            part = self._head_loss(suffix.norm(top[rows[pick], cols[pick]]), targets[pick]) / total
            if backward:
                part.backward()
            loss = loss + part.detach()
            yield
        if not backward:
            return loss
        grad = top.grad
        for layer_input, layer_output in reversed(boundaries):
            if layer_output.requires_grad and grad is not None:
                torch.autograd.backward(layer_output, grad)
            grad = layer_input.grad
            yield
        return loss

    def _head_chunk(self, labels: int) -> int:
        """Labels per LM-head slice: its logits ([chunk, vocab] floats, three copies with the gradient) can dwarf the
        rest of a micro-batch, so `max_micro_batch_tokens` bounds them too, even when slices may be long."""
        caps = [self.head_chunk_tokens if self.fine_slices else None, self.max_micro_batch_tokens]
        return min([labels] + [c for c in caps if c is not None])

    def _labels(self, batch: Sequence[TokenizedExample], starts: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """(row, column, target) of every completion token; row r of the hidden states begins at `starts[r]`."""
        # Logit at position t predicts token t+1: predict each completion token from the position before it.
        rows, cols, targets = [], [], []
        for row, (ex, start) in enumerate(zip(batch, starts)):
            first = len(ex.prompt_ids) - 1 - start
            for offset, token in enumerate(ex.completion_ids):
                rows.append(row)
                cols.append(first + offset)
                targets.append(token)
        return tuple(torch.tensor(v, device=self.device) for v in (rows, cols, targets))  # type: ignore[return-value]

    def _head_loss(self, normed: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy of the LM head's logits at the label positions only."""
        logits = self.model.get_output_embeddings()(normed).float()
        return nn.functional.cross_entropy(logits, targets, reduction="sum")

    def _loss_full(self, batch: Sequence[TokenizedExample]) -> Tensor:
        lengths = [len(ex.input_ids) for ex in batch]
        input_ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ex in enumerate(batch):  # right padding: prompt positions need no offset
            input_ids[row, : lengths[row]] = torch.tensor(ex.input_ids)
            attention_mask[row, : lengths[row]] = 1
        edits = self._edits([len(ex.prompt_ids) for ex in batch], [0] * len(batch))
        with editing_layers(self.model, edits):
            hidden = self.model.get_decoder()(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
            ).last_hidden_state
        rows, cols, targets = self._labels(batch, [0] * len(batch))
        return self._head_loss(hidden[rows, cols], targets)

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
    validation: Sequence[TokenizedExample] = (),
    reuse_frozen_context: bool = True,
    context_budget_bytes: int | None = None,
    max_micro_batch_tokens: int | None = None,
) -> TrainingResult:
    started = time.perf_counter()
    trainer = ReftTrainer(model, config, examples, training, validation=validation,
                          reuse_frozen_context=reuse_frozen_context, context_budget_bytes=context_budget_bytes,
                          max_micro_batch_tokens=max_micro_batch_tokens)
    while not trainer.done:
        progress = trainer.step()
        if on_progress is not None:
            on_progress(progress)
    return TrainingResult(trainer.result(), trainer.losses, time.perf_counter() - started, trainer.epochs)


def _drain(work: Generator[None, None, Tensor]) -> Tensor:
    while True:
        try:
            next(work)
        except StopIteration as finished:
            return finished.value

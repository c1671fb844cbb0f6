"""How much memory a training job will hold, predicted from token counts and the model's shape alone.

Two parts, with different cures. Frozen contexts (frozen_context.py) are kept per example for the whole job and
grow with the job's size: `kept_contexts` chooses, before anything is computed, which ones fit a budget (the
trainer recomputes the others when needed). The working memory of one micro-batch (its contexts, the prefix keys
and values it attends to, the activations kept for backpropagation, the LM head's logits) remains whatever the
budget; the trainer's `max_micro_batch_tokens` bounds it, and a server refuses a job whose estimate is still too
large. The per-token constants were measured on SmolLM2-135M (CPU, fp32, sdpa attention) and come out within
about 10% of the peak RSS of one step there (see `estimate_training_memory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reft_core.config import InterventionConfig
from reft_core.examples import TokenizedExample
from reft_core.frozen_context import ModelDims, first_changing_position

# Float copies per LM-head label kept at once: the logits, their log-softmax, and the logits' gradient.
_HEAD_COPIES = 3


@dataclass(frozen=True)
class TrainingMemory:
    context_bytes: int  # every example's frozen context, were all of them kept
    kept_bytes: int  # the contexts a job keeps for its whole run (within the budget)
    working_bytes: int  # its largest micro-batch, which needs its memory even with every context recomputed

    @property
    def peak_bytes(self) -> int:
        return self.kept_bytes + self.working_bytes


def kept_contexts(sizes: Sequence[int], budget: int | None) -> list[bool]:
    """Which examples' contexts to keep: in example order, each one that still fits (None: all)."""
    keep, left = [], budget
    for size in sizes:
        fits = left is None or size <= left
        keep.append(fits)
        if fits and left is not None:
            left -= size
    return keep


def estimate_training_memory(
    dims: ModelDims, config: InterventionConfig, examples: Sequence[TokenizedExample], *, batch_size: int,
    context_budget_bytes: int | None = None, max_micro_batch_tokens: int | None = None,
) -> TrainingMemory:
    """Memory of a job run by `ReftTrainer` with the same budget and cap (on the frozen-context path).

    The largest micro-batch is taken as the longest examples, as many as one batch and the cap allow, padded to the
    longest prefix and suffix among them: an upper bound on what the trainer's length buckets form.
    """
    first_layer = min(config.layers)
    starts = [first_changing_position(config, ex) for ex in examples]
    sizes = [dims.context_nbytes(len(ex.input_ids), start, first_layer) for ex, start in zip(examples, starts)]
    keep = kept_contexts(sizes, context_budget_bytes)
    largest = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    rows = [largest[0]]
    for i in largest[1 : batch_size]:
        padded = (len(rows) + 1) * max(len(examples[j].input_ids) for j in rows)
        if max_micro_batch_tokens is not None and padded > max_micro_batch_tokens:
            break
        rows.append(i)
    prefix = max(starts[i] for i in rows)
    suffix = max(len(examples[i].input_ids) - starts[i] for i in rows)
    labels = sum(len(examples[i].completion_ids) for i in rows)
    head = min([labels] + ([max_micro_batch_tokens] if max_micro_batch_tokens is not None else []))
    working = (
        sum(sizes[i] for i in rows)  # recomputed contexts live while their micro-batch runs
        + len(rows) * _micro_batch_bytes_per_row(dims, first_layer, prefix, suffix)
        + head * dims.vocab_size * 4 * _HEAD_COPIES  # the head's logits are float32
    )
    return TrainingMemory(sum(sizes), sum(s for s, k in zip(sizes, keep) if k), working)


def _micro_batch_bytes_per_row(dims: ModelDims, first_layer: int, prefix: int, suffix: int) -> int:
    """One padded row of a micro-batch at every trained layer, kept until its backward pass."""
    layers = dims.num_layers - first_layer
    # Keys/values attended to: the stacked prefix, the cache after appending the suffix, and the copy that
    # grouped-query attention expands to every head (saved for backward).
    attended = (4 * dims.kv_heads + 2 * dims.num_heads) * dims.head_dim * dims.element_size
    # Activations saved for backward per suffix token: measured about 6 hidden-size and 3 intermediate-size vectors.
    activations = (6 * dims.hidden_size + 3 * dims.intermediate_size) * dims.element_size
    return layers * ((prefix + suffix) * attended + suffix * activations)

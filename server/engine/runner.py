"""The model runner: the only caller of `model(...)` and the only owner of the KV cache and the bank tensors.

Two verbs. `prefill(rows)` runs the new rows' prompts in one left-padded forward with the batched bank hooked in
(each row edited only at its own prompt positions); their keys and values land in new slots of the slot cache.
`decode()` feeds every running row its last sampled token in one bare forward: no hooks, so interventions cost
nothing per generated token. `release(ids)` drops finished rows at once.

A long prompt can instead be prefilled a chunk at a time (`begin_chunked_prefill`, `prefill_chunk`) straight into
its own slot, so it joins the batch without any copy. Until its prompt is complete the row is *held*: decode steps
carry it with a placeholder token whose key and value land at the row's next free column, where the next chunk
overwrites them, and its logits are dropped; `row_ids` lists only the rows that decode.

Every forward gets a 4D mask built here (bool for sdpa, additive for eager), so transformers never builds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.frozen_context import ModelDims
from reft_core.generate import left_pad
from reft_core.hf_compat import cache_kwargs
from reft_core.hooks import decoder_layers, editing_layers
from server.engine.kv_cache import SlotKVCache


@dataclass(frozen=True)
class PrefillRow:
    seq_id: int
    prompt_ids: Sequence[int]
    slot: int  # bank slot; 0 = no intervention
    then: tuple[int, ...] = ()  # a composed row: slots applied after `slot`, in this order

    @classmethod
    def for_slots(cls, seq_id: int, prompt_ids: Sequence[int], slots: Sequence[int]) -> PrefillRow:
        return cls(seq_id, prompt_ids, slots[0] if slots else 0, tuple(slots[1:]))


@dataclass
class _Row:
    """One cache row: a decoding sequence, or (with `chunked`) a prompt still being prefilled in chunks."""

    seq_id: int
    chunked: PrefillRow | None = None
    done: int = 0  # prompt tokens already in the cache while chunked


class ModelRunner:
    def __init__(self, model: nn.Module, bank: InterventionBank, pad_token_id: int) -> None:
        self.model = model
        self.bank = bank
        self.pad_token_id = pad_token_id
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        dims = ModelDims.from_model(model)
        self.num_layers = len(decoder_layers(model))
        self._cache = SlotKVCache(self.num_layers, dims.kv_heads, dims.head_dim, self.dtype, self.device)
        self._rows: list[_Row] = []  # in cache order
        self._bool_masks = "sdpa" in str(getattr(model.config, "_attn_implementation", "eager"))
        self._arange = torch.arange(0, device=self.device)
        self._head = model.get_output_embeddings()

    @property
    def row_ids(self) -> list[int]:
        """Seq ids of the rows that decode, in the order `decode` takes their tokens and returns their logits."""
        return [r.seq_id for r in self._rows if r.chunked is None]

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    @property
    def cache_allocated(self) -> tuple[int, int]:
        """(rows, columns) the KV cache's buffers hold."""
        return self._cache.allocated

    @property
    def cache_lengths(self) -> dict[int, int]:
        """Tokens in each row's slot, by seq id."""
        return {r.seq_id: n for r, n in zip(self._rows, self._cache.host_lengths)}

    @torch.inference_mode()
    def prefill(self, rows: Sequence[PrefillRow]) -> Tensor:
        """Prefill new rows, add them to the batch; returns their next-token logits [len(rows), V] (float32)."""
        batch = left_pad([r.prompt_ids for r in rows], self.pad_token_id, self.device)
        placements = [RowPlacement(r.slot, n, o, r.then) for r, n, o in zip(rows, batch.lengths, batch.offsets)]
        plan = self.bank.plan(placements)
        width = batch.input_ids.shape[1]
        first = self._cache.add_rows(len(rows), width)
        self._rows.extend(_Row(row.seq_id) for row in rows)
        self._cache.plan_prefill(first, batch.lengths, width)
        square = self._range(width)
        # causal, padding keys hidden; a padding query sees itself, so no row of the mask is empty (NaN in sdpa)
        allowed = (square[None, :] <= square[:, None]) & (batch.attention_mask.bool()[:, None, :] | torch.eye(
            width, dtype=torch.bool, device=self.device))
        with editing_layers(self.model, self.bank.edits(plan)):
            logits = self._forward(batch.input_ids, batch.position_ids, allowed[:, None])
        return logits[:, -1].float()

    @torch.inference_mode()  # the cache's tensors are inference tensors: change them only in this mode
    def begin_chunked_prefill(self, row: PrefillRow) -> None:
        """Prefill `row` in chunks (`prefill_chunk`) instead of at once, so running rows keep decoding between."""
        self._cache.add_rows(1, len(row.prompt_ids))  # room for the whole prompt now: one growth, not one per doubling
        self._rows.append(_Row(row.seq_id, chunked=row))

    def chunked_remaining(self, seq_id: int) -> int:
        row = self._rows[self._index(seq_id)]
        assert row.chunked is not None
        return len(row.chunked.prompt_ids) - row.done

    @torch.inference_mode()
    def prefill_chunk(self, seq_id: int, max_tokens: int) -> Tensor | None:
        """Prefill up to `max_tokens` more of a chunked row's prompt. When the prompt is complete the row decodes
        from the next step on and its next-token logits [1, V] (float32) are returned; until then None.

        The bank edits only the intervened positions inside this chunk (at their absolute positions); later chunks
        attend to the edited keys/values in the cache, so the result equals a prefill in one forward."""
        index = self._index(seq_id)
        row = self._rows[index]
        assert row.chunked is not None
        prompt = row.chunked.prompt_ids
        start, end = row.done, min(len(prompt), row.done + max_tokens)
        plan = self.bank.plan([RowPlacement(row.chunked.slot, len(prompt), 0, row.chunked.then)], window=(start, end))
        self._cache.plan_chunk(index, start, end)
        positions = self._range(end)
        allowed = positions[None, :] <= positions[start:end, None]  # [chunk, end] causal at absolute positions
        input_ids = torch.tensor([list(prompt[start:end])], dtype=torch.long, device=self.device)
        with editing_layers(self.model, self.bank.edits(plan)):
            logits = self._forward(input_ids, positions[None, start:end], allowed[None, None])
        row.done = end
        if end < len(prompt):
            return None
        row.chunked = None
        return logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, last_tokens: Sequence[int]) -> Tensor:
        """One bare step for every decoding row (in `row_ids` order); returns logits [B, V] (float32)."""
        held = [i for i, r in enumerate(self._rows) if r.chunked is not None]
        assert len(last_tokens) == len(self._rows) - len(held) > 0
        if held:
            tokens = iter(last_tokens)
            last_tokens = [self.pad_token_id if r.chunked is not None else next(tokens) for r in self._rows]
        rows = len(self._rows)
        width = self._cache.plan_decode(self._range(rows))
        lengths = self._cache.lengths[:rows]
        allowed = self._range(width)[None, :] <= lengths[:, None]  # [B, width]: each row's tokens and the new one
        input_ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device)[:, None]
        logits = self._forward(input_ids, lengths[:, None], allowed[:, None, None])[:, -1]
        self._cache.advance(held)
        if held:
            keep = [i for i, r in enumerate(self._rows) if r.chunked is None]
            logits = logits[torch.tensor(keep, device=self.device)]
        return logits.float()

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget every row, chunked prefills included (after a failed step left the cache in an unknown state)."""
        self._rows = []
        self._cache.clear()

    @torch.inference_mode()
    def release(self, seq_ids: Sequence[int]) -> None:
        """Drop finished or cancelled rows (chunked prefills included) from the batch immediately."""
        for seq_id in seq_ids:
            index = next((i for i, r in enumerate(self._rows) if r.seq_id == seq_id), None)
            if index is None:
                continue
            self._cache.remove_row(index)  # the last row moves into the freed slot
            self._rows[index] = self._rows[-1]
            self._rows.pop()

    def _forward(self, input_ids: Tensor, position_ids: Tensor, allowed: Tensor) -> Tensor:
        """The model over the cache with a ready 4D mask (`allowed`: True = attend); the last position's logits."""
        hook = self._head.register_forward_pre_hook(_contiguous_input) if self._head is not None else None
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=self._mask(allowed),
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, self._cache),
            )
        finally:
            if hook is not None:
                hook.remove()
        return out.logits

    def _mask(self, allowed: Tensor) -> Tensor:
        """The mask in the form the model's attention takes: bool for sdpa, additive for eager and the rest."""
        if self._bool_masks:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)

    def _range(self, n: int) -> Tensor:
        """0..n-1 on the device, from one tensor kept across steps (no allocation per step)."""
        if self._arange.shape[0] < n:
            self._arange = torch.arange(max(n, 2 * self._arange.shape[0]), device=self.device)
        return self._arange[:n]

    def _index(self, seq_id: int) -> int:
        return next(i for i, r in enumerate(self._rows) if r.seq_id == seq_id)


def _contiguous_input(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The LM head's input made contiguous. With `logits_to_keep=1` a multi-token forward hands the head a strided
    slice of the hidden states ([B, 1, H] out of [B, T, H]); torch then runs the projection as a broadcast batched
    matmul, measured 8x slower than the plain matmul on a CPU (240 vs 30 ms for 64 rows of SmolLM2's 49k vocabulary),
    about 7% of a 64-prompt prefill. Decode forwards are already contiguous (T = 1), so this costs them nothing."""
    return (args[0].contiguous(), *args[1:])

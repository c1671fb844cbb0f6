"""The model runner: the only caller of `model(...)` and the only owner of the KV cache and the bank tensors.

Two verbs. `prefill(rows)` runs the new rows' prompts in one left-padded forward with the batched bank hooked in
(each row edited only at its own prompt positions), then appends their cache rows to the running batch.
`decode()` feeds every running row its last sampled token in one bare forward: no hooks, so interventions cost
nothing per generated token. `release(ids)` drops finished rows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.hf_compat import cache_kwargs
from reft_core.generate import left_pad
from reft_core.hooks import decoder_layers, editing_layers
from server.engine.kv_cache import BatchKVCache


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
class _ChunkedPrefill:
    """A row whose prompt is being prefilled a chunk at a time, in its own cache until the prompt is complete."""

    row: PrefillRow
    cache: BatchKVCache
    done: int = 0  # prompt tokens already in the cache


class ModelRunner:
    def __init__(self, model: nn.Module, bank: InterventionBank, pad_token_id: int) -> None:
        self.model = model
        self.bank = bank
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.num_layers = len(decoder_layers(model))
        self.row_ids: list[int] = []  # seq id of each cache row, in cache order
        self._cache: BatchKVCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [B, T] 1 = real token
        self._next_position = torch.zeros((0,), dtype=torch.long, device=self.device)  # [B]
        self._chunked: dict[int, _ChunkedPrefill] = {}  # seq id -> a prompt being prefilled in chunks

    @property
    def cache_columns(self) -> int:
        return self._mask.shape[1]

    @torch.inference_mode()
    def prefill(self, rows: Sequence[PrefillRow]) -> Tensor:
        """Prefill new rows, add them to the batch; returns their next-token logits [len(rows), V] (float32)."""
        batch = left_pad([r.prompt_ids for r in rows], self.pad_token_id, self.device)
        placements = [RowPlacement(r.slot, n, o, r.then) for r, n, o in zip(rows, batch.lengths, batch.offsets)]
        plan = self.bank.plan(placements)
        cache = BatchKVCache(self.num_layers)
        with editing_layers(self.model, self.bank.edits(plan)):
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, cache),
            )
        self._append(cache, batch.attention_mask, torch.tensor(batch.lengths, device=self.device))
        self.row_ids.extend(r.seq_id for r in rows)
        return out.logits[:, -1].float()

    def begin_chunked_prefill(self, row: PrefillRow) -> None:
        """Prefill `row` in chunks (`prefill_chunk`) instead of at once, so running rows keep decoding between."""
        self._chunked[row.seq_id] = _ChunkedPrefill(row, BatchKVCache(self.num_layers))

    def chunked_remaining(self, seq_id: int) -> int:
        part = self._chunked[seq_id]
        return len(part.row.prompt_ids) - part.done

    @torch.inference_mode()
    def prefill_chunk(self, seq_id: int, max_tokens: int) -> Tensor | None:
        """Prefill up to `max_tokens` more of a chunked row's prompt. When the prompt is complete the row joins the
        batch and its next-token logits [1, V] (float32) are returned; until then None.

        The bank edits only the intervened positions inside this chunk (at their absolute positions); later chunks
        attend to the edited keys/values in the cache, so the result equals a prefill in one forward."""
        part = self._chunked[seq_id]
        prompt = part.row.prompt_ids
        start, end = part.done, min(len(prompt), part.done + max_tokens)
        plan = self.bank.plan([RowPlacement(part.row.slot, len(prompt), 0, part.row.then)], window=(start, end))
        with editing_layers(self.model, self.bank.edits(plan)):
            out = self.model(
                input_ids=torch.tensor([list(prompt[start:end])], dtype=torch.long, device=self.device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, end, device=self.device)[None],
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, part.cache),
            )
        part.done = end
        if end < len(prompt):
            return None
        del self._chunked[seq_id]
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        self._append(part.cache, mask, torch.tensor([end], device=self.device))
        self.row_ids.append(seq_id)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, last_tokens: Sequence[int]) -> Tensor:
        """One bare step for every running row (in `row_ids` order); returns logits [B, V] (float32)."""
        assert self._cache is not None and len(last_tokens) == len(self.row_ids)
        input_ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device)[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(last_tokens), 1))], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=self._next_position[:, None],
            use_cache=True,
            **cache_kwargs(self.model, self._cache),
        )
        self._next_position = self._next_position + 1
        return out.logits[:, -1].float()

    def reset(self) -> None:
        """Forget every row, chunked prefills included (after a failed step left the cache in an unknown state)."""
        self._chunked.clear()
        self._clear_batch()

    def _clear_batch(self) -> None:
        self.row_ids = []
        self._cache = None
        self._mask = self._mask[:0, :0]
        self._next_position = self._next_position[:0]

    def release(self, seq_ids: Sequence[int]) -> None:
        """Drop finished or cancelled rows from the batch immediately."""
        gone = set(seq_ids)
        for seq_id in gone:
            self._chunked.pop(seq_id, None)
        keep = [i for i, seq_id in enumerate(self.row_ids) if seq_id not in gone]
        if len(keep) == len(self.row_ids):
            return
        self.row_ids = [self.row_ids[i] for i in keep]
        if not keep:
            self._clear_batch()  # prompts still being prefilled in chunks keep their own caches
            return
        assert self._cache is not None
        self._cache.select(keep)
        index = torch.tensor(keep, device=self.device)
        self._mask, self._next_position = self._mask[index], self._next_position[index]
        leading_padding = int(self._mask.any(dim=0).int().argmax())  # first column some row still uses
        if leading_padding:
            self._cache.drop_leading(leading_padding)
            self._mask = self._mask[:, leading_padding:]

    def _append(self, cache: BatchKVCache, mask: Tensor, next_position: Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask, self._next_position = cache, mask, next_position
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache.extend(cache)
        pad = lambda m: nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731 - left-pad a mask
        self._mask = torch.cat([pad(self._mask), pad(mask)], dim=0)
        self._next_position = torch.cat([self._next_position, next_position])

"""The model runner: the only caller of `model(...)` and the only owner of the KV cache and the bank tensors.

Two verbs. `prefill(rows)` runs the new rows' prompts in one left-padded forward with the batched bank hooked in
(each row edited only at its own prompt positions); their keys and values land in new slots of the slot cache.
`decode()` feeds every running row its last sampled token in one bare forward: no hooks, so interventions cost
nothing per generated token. `release(ids)` drops finished rows at once. For speculative decoding,
`decode_drafts()` feeds each row its last token and a few draft tokens in the same kind of forward, and `accept()`
then keeps, per row, the tokens whose drafts stood (see `server.engine.speculative`).

A long prompt can instead be prefilled a chunk at a time (`begin_chunked_prefill`) into a staging cache of its own,
so the decoding rows never read its columns (in one cache, every decode step would attend over the longest row:
a 2,000-token prompt being prefilled made 16 rows' steps ~1.7x slower). A chunk runs either packed into the decode
forward (`decode_with_chunks`, see `server.engine.packed`: the weights are read once for both) or, when no row
decodes or the architecture cannot be packed, as a forward of its own (`prefill_chunk`). When its prompt is
complete the row's keys and values are copied into the slot cache once, and it decodes from the next step on;
`row_ids` lists only the rows that decode. A chunked prompt takes its staging row at its first chunk, so prompts
waiting their turn hold no memory.

Short prompts joining a decoding batch ride in the packed forward too (`joins`), written straight into new rows
of the slot cache, after the decoding rows. Through the staging cache they took rows as wide as the prompt being
chunked there: 8 chat prompts joining beside a 1,800-token prompt grew it from 1 to 16 rows of 2,048 columns
(1.5 GB of keys and values for ~400 tokens, allocated for real on a GPU), and each was copied again to join.

A *long row* (a prompt of at least `long_row_tokens`, packable architectures) is copied into a cache of long
rows instead, and decodes there in packed forwards. In the slot cache it would widen every row's slot to its
length: measured on the 2-core CPU with SmolLM2, one 1,800-token row among 16 chat rows made every decode step 2.1x
slower (81 -> 170 ms, all rows attending over 1,800 masked columns) and the cache 32x bigger (94 MB -> 3 GB). The
long rows decode as one group, as the slot cache's rows do (one attention call per layer over the long cache's
width), while that reads at most `long_group_slack` times the columns they hold; lengths further apart make each
a one-token piece with an attention call of its own. `row_ids` lists the slot cache's rows, then the long rows.

Every forward gets a 4D mask built here (bool for sdpa, additive for eager), so transformers never builds one.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.frozen_context import ModelDims
from reft_core.generate import left_pad
from reft_core.hf_compat import cache_kwargs
from reft_core.hooks import decoder_layers, editing_layers
from server.engine.kv_cache import Chunk, SlotKVCache
from server.engine.packed import PackedCaches, PackedLayout, attention_swapped, packable

# Long rows decode as one group while it reads at most this many times the columns they hold (see
# `ModelRunner._long_rows_as_group`); past it (lengths far apart) each is a piece with its own attention call.
LONG_GROUP_SLACK = 1.5


@dataclass(frozen=True)
class PrefillRow:
    seq_id: int
    prompt_ids: Sequence[int]
    slot: int  # bank slot; 0 = no intervention
    then: tuple[int, ...] = ()  # a composed row: slots applied after `slot`, in this order

    @classmethod
    def for_slots(cls, seq_id: int, prompt_ids: Sequence[int], slots: Sequence[int]) -> PrefillRow:
        return cls(seq_id, prompt_ids, slots[0] if slots else 0, tuple(slots[1:]))


@dataclass(eq=False)  # found by identity
class _Staged:
    """A prompt being prefilled in chunks: its row of the staging cache holds the first `done` tokens."""

    row: PrefillRow
    done: int = 0
    staged: bool = False  # holds a row of the staging cache (from its first chunk on)

    @property
    def remaining(self) -> int:
        return len(self.row.prompt_ids) - self.done


class ModelRunner:
    def __init__(self, model: nn.Module, bank: InterventionBank, pad_token_id: int,
                 compile_decode: str | None = None, long_row_tokens: int = 512,
                 long_group_slack: float = LONG_GROUP_SLACK) -> None:
        self.model = model
        # Decode forwards (the bare model, one token per row) may run through torch.compile with this backend
        # ("inductor": generated kernels; "cudagraphs": CUDA graphs replaying the eager kernels); prefill and packed
        # forwards carry the bank's hooks and swap the attention, and stay eager.
        self._decode_model = model if compile_decode is None else torch.compile(
            model, backend=compile_decode, dynamic=True)
        self.bank = bank
        self.pad_token_id = pad_token_id
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        dims = ModelDims.from_model(model)
        self.num_layers = len(decoder_layers(model))
        self._cache = SlotKVCache(self.num_layers, dims.kv_heads, dims.head_dim, self.dtype, self.device)
        self._staging = SlotKVCache(self.num_layers, dims.kv_heads, dims.head_dim, self.dtype, self.device, min_rows=1)
        self._long = SlotKVCache(self.num_layers, dims.kv_heads, dims.head_dim, self.dtype, self.device, min_rows=1)
        self._rows: list[int] = []  # seq ids of the decoding rows, in slot cache order
        self._staged: list[_Staged] = []  # prompts being prefilled in chunks: first those holding a staging row,
        # in staging cache order, then those waiting for their first chunk
        self._long_rows: list[int] = []  # seq ids of the long rows, in long cache order
        self.packs_chunks = packable(model)  # chunks can ride in decode forwards
        self.long_row_tokens = long_row_tokens  # prompts at least this long decode in the long rows' cache
        self.long_group_slack = long_group_slack  # see `_long_rows_as_group`
        self._bool_masks = "sdpa" in str(getattr(model.config, "_attn_implementation", "eager"))
        self._arange = torch.arange(0, device=self.device)
        self._head = model.get_output_embeddings()

    @property
    def row_ids(self) -> list[int]:
        """Seq ids of the rows that decode, in the order `decode` takes their tokens and returns their logits: the
        slot cache's rows, then the long rows."""
        return self._rows + self._long_rows

    @property
    def drafts_allowed(self) -> bool:
        """Whether `decode_drafts` may run now (not while long rows decode: they decode in packed forwards)."""
        return not self._long_rows

    def is_long(self, prompt_len: int) -> bool:
        """Whether a prompt this long makes a long row (prefill it with `begin_chunked_prefill`)."""
        return self.packs_chunks and prompt_len >= self.long_row_tokens  # only packed forwards decode them

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes + self._staging.nbytes + self._long.nbytes

    @property
    def cache_allocated(self) -> tuple[int, int]:
        """(rows, columns) the KV cache's buffers hold."""
        return self._cache.allocated

    @property
    def cache_lengths(self) -> dict[int, int]:
        """Tokens in each row's slot, by seq id: the decoding rows in cache order, the long rows, then the prompts
        being chunked."""
        return {**dict(zip(self._rows, self._cache.host_lengths)), **dict(zip(self._long_rows, self._long.host_lengths)),
                **{s.row.seq_id: s.done for s in self._staged}}

    @torch.inference_mode()
    def prefill(self, rows: Sequence[PrefillRow]) -> Tensor:
        """Prefill new rows, add them to the batch; returns their next-token logits [len(rows), V] (float32)."""
        batch = left_pad([r.prompt_ids for r in rows], self.pad_token_id, self.device)
        placements = [RowPlacement(r.slot, n, o, r.then) for r, n, o in zip(rows, batch.lengths, batch.offsets)]
        plan = self.bank.plan(placements)
        width = batch.input_ids.shape[1]
        first = self._cache.add_rows(len(rows), width)
        self._rows.extend(row.seq_id for row in rows)
        self._cache.plan_prefill(first, batch.lengths, width)
        square = self._range(width)
        # causal, padding keys hidden; a padding query sees itself, so no row of the mask is empty (NaN in sdpa)
        allowed = (square[None, :] <= square[:, None]) & (batch.attention_mask.bool()[:, None, :] | torch.eye(
            width, dtype=torch.bool, device=self.device))
        with editing_layers(self.model, self.bank.edits(plan)):
            logits = self._forward(batch.input_ids, batch.position_ids, allowed[:, None], self._cache)
        return logits[:, -1].float()

    @torch.inference_mode()  # the cache's tensors are inference tensors: change them only in this mode
    def begin_chunked_prefill(self, row: PrefillRow) -> None:
        """Prefill `row` in chunks instead of at once, so running rows keep decoding between. Its staging row is
        taken at its first chunk."""
        self._staged.append(_Staged(row))

    def chunked_remaining(self, seq_id: int) -> int:
        return self._chunked(seq_id).remaining

    @torch.inference_mode()
    def prefill_chunk(self, seq_id: int, max_tokens: int) -> Tensor | None:
        """Prefill up to `max_tokens` more of a chunked row's prompt in a forward of its own. When the prompt is
        complete the row decodes from the next step on and its next-token logits [1, V] (float32) are returned;
        until then None.

        The bank edits only the intervened positions inside this chunk (at their absolute positions); later chunks
        attend to the edited keys/values in the cache, so the result equals a prefill in one forward."""
        staged = self._stage(seq_id)
        start, end = staged.done, min(len(staged.row.prompt_ids), staged.done + max_tokens)
        plan = self.bank.plan([_placement(staged.row)], window=(start, end))
        self._staging.plan_chunk(self._staged.index(staged), start, end)
        positions = self._range(end)
        with editing_layers(self.model, self.bank.edits(plan)):
            logits = self._forward(self._chunk_ids(staged, end), positions[None, start:end],
                                   self._chunk_mask(start, end), self._staging)
        staged.done = end
        return self._join_if_complete(staged, logits[:, -1])

    @torch.inference_mode()
    def decode(self, last_tokens: Sequence[int]) -> Tensor:
        """One bare step for every decoding row (in `row_ids` order); returns logits [B, V] (float32)."""
        if not self.drafts_allowed:  # long rows decode as pieces of a packed forward
            return self.decode_with_chunks(last_tokens, [])[0]
        rows = len(self._rows)
        assert len(last_tokens) == rows > 0
        width = self._cache.plan_decode(self._range(rows))
        lengths = self._cache.lengths[:rows]
        input_ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device)[:, None]
        positions, mask = lengths[:, None], self._decode_mask(width, rows)
        if self._decode_model is self.model:
            logits = self._forward(input_ids, positions, mask, self._cache)[:, -1]
        else:
            _mark_dynamic_decode(input_ids, positions, mask)
            with _no_duck_sizing():
                logits = self._forward(input_ids, positions, mask, self._cache, model=self._decode_model)[:, -1]
        self._cache.advance()
        return logits.float()

    @torch.inference_mode()
    def decode_drafts(self, last_tokens: Sequence[int], drafts: Sequence[Sequence[int]]) -> Tensor:
        """`decode` with each row's draft tokens after its last token: one bare forward over [B, T] (T = 1 + the
        longest draft; shorter rows are padded, and their padding is never kept). Returns logits [B, T, V]
        (float32): position t is the model's next token after the row's t-th input. Call `accept` next."""
        rows = len(self._rows)
        assert self.drafts_allowed and len(last_tokens) == len(drafts) == rows > 0
        width_in = 1 + max(len(d) for d in drafts)
        width = self._cache.plan_decode(self._range(rows), tokens=width_in)
        padded = [[token, *draft, *[self.pad_token_id] * (width_in - 1 - len(draft))]
                  for token, draft in zip(last_tokens, drafts)]
        input_ids = torch.tensor(padded, dtype=torch.long, device=self.device)
        positions = self._cache.lengths[:rows, None] + self._range(width_in)[None, :]  # [B, T]
        # each input attends to its row's tokens and to the inputs up to itself
        mask = (self._range(width)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, width]
        return self._forward(input_ids, positions, mask, self._cache, keep=width_in).float()

    @torch.inference_mode()
    def accept(self, kept: Sequence[int]) -> None:
        """After `decode_drafts`: row b keeps its first `kept[b]` inputs (its last token and the drafts that stood,
        in `row_ids` order); its next input is the token the model chose after them."""
        self._cache.advance(kept)

    @torch.inference_mode()
    def decode_with_chunks(self, last_tokens: Sequence[int], chunks: Sequence[tuple[int, int]],
                           joins: Sequence[PrefillRow] = ()) -> tuple[Tensor, list[Tensor | None], Tensor | None]:
        """`decode` with prompt pieces packed into the same forward (requires `packs_chunks`): for each
        (seq_id, max_tokens) in `chunks`, up to that many more tokens of that chunked row's prompt; and each row of
        `joins` whole, added to the batch (it decodes from the next step on). Returns the decoding rows' logits
        [B, V]; per chunk, the prompt's next-token logits [1, V] if it is now complete (that row decodes from the
        next step on), else None; and the joining rows' next-token logits [len(joins), V] (None without joins). All
        float32. Long rows are pieces of one token each (their last token), before the prompt pieces."""
        assert self.packs_chunks
        rows = len(self._rows)
        long_rows = len(self._long_rows)
        assert len(last_tokens) == rows + long_rows > 0 and (chunks or long_rows or joins)
        width = self._cache.plan_decode(self._range(rows)) if rows else 0
        lengths = self._cache.lengths[:rows]
        decode_mask = self._decode_mask(width, rows) if rows else None
        staged = [self._stage(seq_id) for seq_id, _ in chunks]
        grouped = long_rows if self._long_rows_as_group() else 0
        long_width = self._long.plan_decode(self._range(grouped)) if grouped else 0
        long_lengths = self._long.lengths[:grouped]
        long_mask = self._decode_mask(long_width, grouped, self._long) if grouped else None
        tokens_in = [] if grouped else [self._long.extend(Chunk(i, n, n + 1))
                                        for i, n in enumerate(self._long.host_lengths)]
        prompt_pieces = [self._staging.extend(Chunk(self._staged.index(s), s.done,
                                                    min(len(s.row.prompt_ids), s.done + n)))
                         for s, (_, n) in zip(staged, chunks)]
        # joining rows land after the decoding rows, which alone the decode part of this forward reads and advances;
        # they are rows of the batch from now on, so a failed forward's `release` drops them with the rest
        first = self._cache.add_rows(len(joins), max(len(r.prompt_ids) for r in joins) + 1) if joins else 0
        join_pieces = [self._cache.extend(Chunk(first + i, 0, len(r.prompt_ids))) for i, r in enumerate(joins)]
        self._rows.extend(r.seq_id for r in joins)
        pieces = tokens_in + prompt_pieces + join_pieces
        caches = ((self._long,) * len(tokens_in) + (self._staging,) * len(prompt_pieces)
                  + (self._cache,) * len(join_pieces))
        layout = PackedLayout(rows, decode_mask, tuple(pieces), tuple(self._chunk_mask(p.start, p.end) for p in pieces),
                              grouped, long_mask)
        input_ids = torch.cat([torch.tensor([list(last_tokens)], dtype=torch.long, device=self.device),
                               *(self._chunk_ids(s, p.end) for s, p in zip(staged, prompt_pieces)),
                               *(self._prompt_ids(r.prompt_ids) for r in joins)], 1)
        positions = torch.cat([lengths, long_lengths, *(self._range(p.end)[p.start :] for p in pieces)])[None]
        columns = list(itertools.accumulate((p.end - p.start for p in pieces), initial=rows + grouped))
        # long rows decode bare: the bank edits only the prompt pieces, at their columns
        prompts = [(_placement(s.row), (p.start, p.end)) for s, p in zip(staged, prompt_pieces)]
        prompts += [(_placement(r), (0, p.end)) for r, p in zip(joins, join_pieces)]
        plan = self.bank.plan_packed([(placement, window, column)
                                      for (placement, window), column in zip(prompts, columns[len(tokens_in) :])])
        # the logits of each decoding row's token and of each piece's last token
        keep = torch.tensor([*range(rows + grouped), *(c - 1 for c in columns[1:])], device=self.device)
        with editing_layers(self.model, self.bank.edits(plan)), attention_swapped(self.model):
            # the mask passed is never read (`packed_attention` takes the layout's): a 4D one keeps transformers
            # from building its own
            unread = next(m for m in (*layout.piece_masks, decode_mask, long_mask) if m is not None)
            logits = self._forward(input_ids, positions, unread,
                                   PackedCaches(layout, caches, self._cache, self._long), keep)[0]
        if rows:
            self._cache.advance()
        if grouped:
            self._long.advance()
        for s, p in zip(staged, prompt_pieces):
            s.done = p.end
        decoded = rows + long_rows
        chunk_logits = [self._join_if_complete(s, logits[decoded + i : decoded + i + 1]) for i, s in enumerate(staged)]
        joined = decoded + len(staged)
        return logits[:decoded].float(), chunk_logits, logits[joined:].float() if joins else None

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget every row, chunked prefills included (after a failed step left the cache in an unknown state)."""
        self._rows, self._staged, self._long_rows = [], [], []
        self._cache.clear()
        self._staging.clear()
        self._long.clear()

    @torch.inference_mode()
    def release(self, seq_ids: Sequence[int]) -> None:
        """Drop finished or cancelled rows (chunked prefills included) from the batch immediately; in each cache
        the last row moves into the freed slot."""
        for seq_id in seq_ids:
            if seq_id in self._rows:
                index = self._rows.index(seq_id)
                self._cache.remove_row(index)
                self._rows[index] = self._rows[-1]
                self._rows.pop()
            elif seq_id in self._long_rows:
                index = self._long_rows.index(seq_id)
                self._long.remove_row(index)
                self._long_rows[index] = self._long_rows[-1]
                self._long_rows.pop()
            elif (staged := next((s for s in self._staged if s.row.seq_id == seq_id), None)) is not None:
                self._unstage(staged)

    def _chunked(self, seq_id: int) -> _Staged:
        return next(s for s in self._staged if s.row.seq_id == seq_id)

    def _stage(self, seq_id: int) -> _Staged:
        """The chunked row `seq_id`, given its staging row (room for its whole prompt: one growth, not one per
        doubling) if it has none yet. Rows holding one stay first in `_staged`, in staging cache order."""
        staged = self._chunked(seq_id)
        if not staged.staged:
            index = self._staging.add_rows(1, len(staged.row.prompt_ids))
            self._staged.remove(staged)
            self._staged.insert(index, staged)
            staged.staged = True
        return staged

    def _unstage(self, staged: _Staged) -> None:
        """Forget a chunked row; in the staging cache the last row moves into its slot, so in `_staged` too."""
        if staged.staged:
            index = self._staged.index(staged)
            self._staging.remove_row(index)
            last = self._staging.rows  # the moved row's former index, now the first waiting one's
            if index != last:
                self._staged[index] = self._staged[last]
                self._staged.pop(last)
            else:
                self._staged.pop(index)
        else:
            self._staged.remove(staged)

    def _chunk_ids(self, staged: _Staged, end: int) -> Tensor:
        return self._prompt_ids(staged.row.prompt_ids[staged.done : end])

    def _prompt_ids(self, token_ids: Sequence[int]) -> Tensor:
        return torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)

    def _chunk_mask(self, start: int, end: int) -> Tensor:
        positions = self._range(end)
        return (positions[None, :] <= positions[start:end, None])[None, None]  # [1, 1, chunk, end]: causal, absolute

    def _long_rows_as_group(self) -> bool:
        """Whether the long rows decode as one group this step (one attention call per layer, over the long
        cache's width for every row) rather than each as a piece (a call per row, over its own length): while the
        group reads at most `long_group_slack` times the columns the rows hold."""
        lengths = self._long.host_lengths
        return bool(lengths) and len(lengths) * (max(lengths) + 1) <= self.long_group_slack * sum(
            n + 1 for n in lengths)

    def _decode_mask(self, width: int, rows: int, cache: SlotKVCache | None = None) -> Tensor:
        lengths = (self._cache if cache is None else cache).lengths[:rows]
        return (self._range(width)[None, :] <= lengths[:, None])[:, None, None]  # each row's tokens and its new one

    def _join_if_complete(self, staged: _Staged, logits: Tensor) -> Tensor | None:
        """Once a staged prompt is complete, move its row into the slot cache (a long row: into the long rows'
        cache) and return its logits; else None."""
        if staged.remaining:
            return None
        index = self._staged.index(staged)
        if self.is_long(len(staged.row.prompt_ids)):
            self._long.adopt_row(self._staging, index)
            self._long_rows.append(staged.row.seq_id)
        else:
            self._cache.adopt_row(self._staging, index)
            self._rows.append(staged.row.seq_id)
        self._unstage(staged)
        return logits.float()

    def _forward(self, input_ids: Tensor, position_ids: Tensor, allowed: Tensor, cache: object,
                 keep: int | Tensor = 1, model: nn.Module | None = None) -> Tensor:
        """`model` (default: the model) over `cache` with a ready 4D mask (`allowed`: True = attend); the logits of
        the last `keep` positions, or of the positions listed in `keep`."""
        multi_token = input_ids.shape[1] > 1  # one token per row is contiguous already (and a compiled decode
        # forward would recompile whenever a hook came or went)
        hook = (self._head.register_forward_pre_hook(_contiguous_input)
                if self._head is not None and multi_token else None)
        try:
            out = (self.model if model is None else model)(
                input_ids=input_ids,
                attention_mask=self._mask(allowed),
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=keep,
                **cache_kwargs(self.model, cache),
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


def _placement(row: PrefillRow) -> RowPlacement:
    """Where the bank edits `row`: its whole prompt, from column 0."""
    return RowPlacement(row.slot, len(row.prompt_ids), 0, row.then)


def _mark_dynamic_decode(input_ids: Tensor, positions: Tensor, mask: Tensor) -> None:
    """Rows and the read width change every few steps: compile them as symbols from the start, not one graph per
    batch size."""
    for tensor, dims in ((input_ids, (0,)), (positions, (0,)), (mask, (0, 3))):
        for dim in dims:
            torch._dynamo.mark_dynamic(tensor, dim)


def _no_duck_sizing() -> contextlib.AbstractContextManager[None]:
    """Trace without tying sizes that happen to be equal once (the cache's row capacity and the read width are both
    4 at times), which would recompile when they part."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


def _contiguous_input(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The LM head's input made contiguous. With `logits_to_keep=1` a multi-token forward hands the head a strided
    slice of the hidden states ([B, 1, H] out of [B, T, H]); torch then runs the projection as a broadcast batched
    matmul, measured 8x slower than the plain matmul on a CPU (240 vs 30 ms for 64 rows of SmolLM2's 49k vocabulary),
    about 7% of a 64-prompt prefill. Decode forwards are already contiguous (T = 1), so this costs them nothing."""
    return (args[0].contiguous(), *args[1:])

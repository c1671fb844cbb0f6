"""The batched bank: resident intervention weights, stacked per layer, applied to a mixed batch in one pass.

Every row of a batch carries a slot id; slot 0 is "no intervention" and holds zeros, which is exactly the identity.
Each intervened layer keeps three tables in the folded form of `reft_core.functional` (A, C: [units, r_max, d],
b: [units, r_max]) with two unit entries per slot (the prefix and suffix edits of a non-shared `f+l` config; one-
group configs use entry 0). Memory follows what is resident: a layer has tables only while some resident
intervention edits it, a table's rank is the largest resident rank at that layer (it shrinks when that one
leaves), and its slot capacity grows by doubling up to the highest slot in use (and is cut back once three
quarters of it are unused). A prefill batch is planned once (which absolute position of which row gets which unit
entry, per layer) and then every intervened layer costs one gather, two batched matmuls and one scatter-add, with
no Python loop over rows. Smaller ranks are zero-padded to r_max, which is exact.

A composed row (`a+b`, several slots in order) applies its interventions one after another: where two of them edit
the same layer and position, the later one sees the earlier one's output. The plan puts each such repeated edit
in a later *stage* of that layer (one more gather / matmul / scatter-add, run on the previous stage's output);
edits at distinct positions stay in stage 0, because an edit at one position never reads another. A batch
without overlapping compositions has only stage 0, which is exactly the single-intervention path.

This module owns the tables; which intervention lives in which slot (residency, LRU, pinning) is decided by the
caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from reft_core.config import InterventionConfig
from reft_core.functional import add_at_positions, affine_delta, fold, gather_positions
from reft_core.hooks import LayerEdit
from reft_core.intervention import Intervention

GROUPS_PER_SLOT = 2  # entry 0: "all" or "prefix"; entry 1: "suffix"


@dataclass(frozen=True)
class RowPlacement:
    """Where one row's prompt sits in the padded prefill batch, and which slot (or slots, in order) edit it."""

    slot: int  # 0 = no intervention
    prompt_len: int  # real prompt tokens in this row
    offset: int = 0  # index of the prompt's first token (left padding before it)
    then: tuple[int, ...] = ()  # a composed row: slots applied after `slot`, in this order

    @classmethod
    def for_slots(cls, slots: Sequence[int], prompt_len: int, offset: int = 0) -> RowPlacement:
        """A row edited by `slots` in order (empty: no intervention)."""
        return cls(slots[0] if slots else 0, prompt_len, offset, tuple(slots[1:]))


@dataclass(frozen=True)
class BankPlan:
    """Gather indices for one prefill batch: for each intervened layer, [B, P] positions and unit entries (stage 0),
    and for layers where a composed row edits a position twice, the further stages in order."""

    positions: dict[int, Tensor]
    entries: dict[int, Tensor]
    later: dict[int, tuple[tuple[Tensor, Tensor], ...]] = field(default_factory=dict)  # layer -> (positions, entries)

    @property
    def layers(self) -> list[int]:
        return sorted(self.positions)


class InterventionBank:
    def __init__(
        self,
        *,
        hidden_size: int,
        num_layers: int,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        assert num_slots >= 1
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_slots = num_slots  # including slot 0
        self.device = torch.device(device)
        self.dtype = dtype  # the edit is computed in this dtype (fp32 by default, also for bf16 models)
        self._A: dict[int, Tensor] = {}
        self._C: dict[int, Tensor] = {}
        self._b: dict[int, Tensor] = {}
        self._configs: dict[int, InterventionConfig] = {}
        self._itemsize = torch.empty((), dtype=dtype).element_size()

    @classmethod
    def for_interventions(
        cls, interventions: Sequence[Intervention], *, num_layers: int, device: torch.device | str = "cpu"
    ) -> InterventionBank:
        """A bank holding `interventions` in slots 1..n (for one-off use, e.g. the reference `generate`)."""
        hidden = interventions[0].hidden_size if interventions else 1
        bank = cls(hidden_size=hidden, num_layers=num_layers, num_slots=len(interventions) + 1, device=device)
        for slot, intervention in enumerate(interventions, start=1):
            bank.load(slot, intervention)
        return bank

    def load(self, slot: int, intervention: Intervention) -> None:
        """Write `intervention` into `slot` (replacing whatever was there)."""
        assert 1 <= slot < self.num_slots, f"slot {slot} out of range"
        config = intervention.config
        assert intervention.hidden_size == self.hidden_size, "hidden size checked at artifact load"
        assert max(config.layers) < self.num_layers, "layer range checked at artifact load"
        self.clear(slot)
        self._configs[slot] = config  # recorded first, so `clear` can undo a load that fails half way
        for unit, weights in intervention.units.items():
            A, C, b = fold(config.type, *(t.to(self.device, self.dtype) for t in weights.as_tuple()))
            entry = slot * GROUPS_PER_SLOT + (1 if unit.group == "suffix" else 0)
            self._fit_layer(unit.layer, entries=(slot + 1) * GROUPS_PER_SLOT, rank=config.rank)
            self._A[unit.layer][entry, : config.rank] = A
            self._C[unit.layer][entry, : config.rank] = C
            self._b[unit.layer][entry, : config.rank] = b

    def clear(self, slot: int) -> None:
        """Reset `slot` to the identity."""
        config = self._configs.pop(slot, None)
        if config is None:
            return
        entries = slice(slot * GROUPS_PER_SLOT, (slot + 1) * GROUPS_PER_SLOT)
        for layer in (layer for layer in config.layers if layer in self._A):
            if self._A[layer].shape[0] >= entries.stop:
                self._A[layer][entries] = 0
                self._C[layer][entries] = 0
                self._b[layer][entries] = 0
            self._shrink_layer(layer)

    def plan(self, rows: Sequence[RowPlacement], window: tuple[int, int] | None = None) -> BankPlan:
        """Work out, per layer, which absolute positions of which rows get which unit entry.

        With `window=(start, end)` the forward covers only the prompt tokens in [start, end) (one chunk of a
        chunked prefill): positions outside it are left out and the rest are made relative to `start`."""
        return self._assemble([[(row, window or (0, None), 0)] for row in rows])

    def plan_packed(self, segments: Sequence[tuple[RowPlacement, tuple[int, int], int]]) -> BankPlan:
        """A plan for a packed forward: one batch row holding several prompts' windows side by side. Each segment
        is (placement, window of the prompt it covers, column of the window's first token in the packed row)."""
        return self._assemble([list(segments)])

    def _assemble(self, rows: list[list[tuple[RowPlacement, tuple[int, int | None], int]]]) -> BankPlan:
        """The plan for batch rows that each hold one or more (placement, window, column) segments."""
        per_layer: dict[int, list[list[list[tuple[int, int]]]]] = {}  # layer -> stage -> row -> (position, entry)
        for row_index, segments in enumerate(rows):
            for placement, window, column in segments:
                for layer, stage, position, entry in self._targets(placement, window):
                    stages = per_layer.setdefault(layer, [])
                    while len(stages) <= stage:
                        stages.append([[] for _ in rows])
                    stages[stage][row_index].append((column + position, entry))
        positions: dict[int, Tensor] = {}
        entries: dict[int, Tensor] = {}
        later: dict[int, tuple[tuple[Tensor, Tensor], ...]] = {}
        for layer, stages in per_layer.items():
            first, *rest = (self._indices(targets_by_row) for targets_by_row in stages)
            positions[layer], entries[layer] = first
            if rest:
                later[layer] = tuple(rest)
        return BankPlan(positions=positions, entries=entries, later=later)

    def _targets(self, row: RowPlacement, window: tuple[int, int | None]) -> Iterator[tuple[int, int, int, int]]:
        """(layer, stage, position relative to the window, unit entry) for every edit of `row` in the window."""
        start, end = window
        edited: dict[tuple[int, int], int] = {}  # composed rows: (layer, position) -> earlier parts that edited it
        for slot in (row.slot, *row.then) if row.slot else ():
            config = self._configs.get(slot)
            if config is None:
                raise KeyError(f"slot {slot} is empty")
            part = []
            for unit in config.units():
                entry = slot * GROUPS_PER_SLOT + (1 if unit.group == "suffix" else 0)
                absolute = (row.offset + p for p in config.positions_for(unit.group, row.prompt_len))
                part.extend((unit.layer, p, entry) for p in absolute if start <= p and (end is None or p < end))
            for layer, p, entry in part:
                yield layer, edited.get((layer, p), 0) if edited else 0, p - start, entry
            if row.then:  # a single intervention never edits one position twice: nothing to count
                for layer, p in {(layer, p) for layer, p, _ in part}:
                    edited[(layer, p)] = edited.get((layer, p), 0) + 1

    def _indices(self, targets_by_row: list[list[tuple[int, int]]]) -> tuple[Tensor, Tensor]:
        """[B, P] positions and entries; rows with fewer targets are padded with position 0, entry 0 (zeros: they
        add exactly nothing)."""
        width = max(len(t) for t in targets_by_row)
        padded = [t + [(0, 0)] * (width - len(t)) for t in targets_by_row]
        table = torch.tensor(padded, dtype=torch.long).reshape(len(targets_by_row), width, 2)
        return table[..., 0].to(self.device), table[..., 1].to(self.device)

    def apply(self, layer: int, h: Tensor, plan: BankPlan) -> Tensor:
        # h: [B, T, d]
        h = self._apply_stage(layer, h, plan.positions[layer], plan.entries[layer])
        for positions, entries in plan.later.get(layer, ()):  # composed rows only: each stage sees the last's output
            h = self._apply_stage(layer, h, positions, entries)
        return h

    def _apply_stage(self, layer: int, h: Tensor, positions: Tensor, entries: Tensor) -> Tensor:
        # h: [B, T, d]  positions, entries: [B, P]
        gathered = gather_positions(h, positions).to(self.dtype)  # [B, P, d]
        delta = affine_delta(gathered, self._A[layer][entries], self._C[layer][entries], self._b[layer][entries])
        return add_at_positions(h, positions, delta)

    def edits(self, plan: BankPlan) -> dict[int, LayerEdit]:
        """Layer -> edit function for `hooks.editing_layers`."""
        return {layer: (lambda h, layer=layer: self.apply(layer, h, plan)) for layer in plan.layers}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for table in (self._A, self._C, self._b) for t in table.values())

    def nbytes_with(self, slot: int, intervention: Intervention) -> int:
        """What `nbytes` would be after `load(slot, intervention)` into the empty `slot` (residency checks its byte
        bound with this before loading, so the bound holds at every moment, not only after an eviction)."""
        assert slot not in self._configs, "only an empty slot's load can be projected"
        shapes = {layer: self._shape(layer) for layer in self._A}
        entries = (slot + 1) * GROUPS_PER_SLOT
        rank = intervention.config.rank
        shapes |= {layer: self._fitted(layer, entries, rank) for layer in intervention.config.layers}
        return sum(e * r * (2 * self.hidden_size + 1) for e, r in shapes.values()) * self._itemsize

    def layer_rank(self, layer: int) -> int:
        """The rank of `layer`'s tables (0: no table, nothing resident edits it)."""
        return self._shape(layer)[1]

    def _shape(self, layer: int) -> tuple[int, int]:
        """(unit entries, rank) of `layer`'s tables; (0, 0) when it has none."""
        table = self._A.get(layer)
        return (table.shape[0], table.shape[1]) if table is not None else (0, 0)

    def _fitted(self, layer: int, entries: int, rank: int) -> tuple[int, int]:
        """The shape `layer`'s tables take to hold at least `entries` entries at rank >= `rank` (zero-padding is
        exact): capacity doubles, so a run of loads into rising slots resizes only log(slots) times."""
        have_entries, have_rank = self._shape(layer)
        limit = self.num_slots * GROUPS_PER_SLOT
        new_entries = have_entries if entries <= have_entries else min(limit, max(entries, 2 * have_entries))
        return new_entries, max(rank, have_rank)

    def _fit_layer(self, layer: int, *, entries: int, rank: int) -> None:
        fitted = self._fitted(layer, entries, rank)
        if fitted != self._shape(layer):
            self._resize_layer(layer, *fitted)

    def _shrink_layer(self, layer: int) -> None:
        """After a slot left: drop the layer's tables if nothing resident edits it, else cut them to the largest
        rank still resident there (the rows beyond it are zeros for every remaining entry), and once three quarters
        of its entries lie above the highest slot still using the layer, cut them to twice what that slot needs
        (the headroom keeps a slot that comes and goes at the boundary from resizing every time)."""
        users = [slot for slot, config in self._configs.items() if layer in config.layers]
        if not users:
            del self._A[layer], self._C[layer], self._b[layer]
            return
        entries, _ = self._shape(layer)
        needed = (max(users) + 1) * GROUPS_PER_SLOT
        if needed <= entries // 4:
            entries = 2 * needed
        shape = (entries, max(self._configs[slot].rank for slot in users))
        if shape != self._shape(layer):
            self._resize_layer(layer, *shape)

    def _resize_layer(self, layer: int, entries: int, rank: int) -> None:
        shape = (entries, rank, self.hidden_size)
        tables = (torch.zeros(shape, device=self.device, dtype=self.dtype),
                  torch.zeros(shape, device=self.device, dtype=self.dtype),
                  torch.zeros(shape[:2], device=self.device, dtype=self.dtype))
        if layer in self._A:
            keep_entries, keep_rank = min(entries, self._A[layer].shape[0]), min(rank, self._A[layer].shape[1])
            tables[0][:keep_entries, :keep_rank] = self._A[layer][:keep_entries, :keep_rank]
            tables[1][:keep_entries, :keep_rank] = self._C[layer][:keep_entries, :keep_rank]
            tables[2][:keep_entries, :keep_rank] = self._b[layer][:keep_entries, :keep_rank]
        self._A[layer], self._C[layer], self._b[layer] = tables

"""The batched bank: resident intervention weights, stacked per layer, applied to a mixed batch in one pass.

Every row of a batch carries a slot id; slot 0 is "no intervention" and holds zeros, which is exactly the identity.
Each intervened layer keeps three tables in the folded form of `reft_core.functional` (A, C: [units, r_max, d],
b: [units, r_max]) with two unit entries per slot (the prefix and suffix edits of a non-shared `f+l` config; one-
group configs use entry 0). Memory follows what is resident: a layer has tables only while some resident
intervention edits it, a table's rank is the largest resident rank at that layer (it shrinks when that one
leaves), and its slot capacity grows by doubling up to the highest slot in use. A prefill batch is planned once (which absolute position of which row gets which unit
entry, per layer) and then every intervened layer costs one gather, two batched matmuls and one scatter-add, with
no Python loop over rows. Smaller ranks are zero-padded to r_max, which is exact.

This module owns the tables; which intervention lives in which slot (residency, LRU, pinning) is decided by the
caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reft_core.config import InterventionConfig
from reft_core.functional import add_at_positions, affine_delta, fold, gather_positions
from reft_core.hooks import LayerEdit
from reft_core.intervention import Intervention

GROUPS_PER_SLOT = 2  # entry 0: "all" or "prefix"; entry 1: "suffix"


@dataclass(frozen=True)
class RowPlacement:
    """Where one row's prompt sits in the padded prefill batch, and which slot edits it."""

    slot: int  # 0 = no intervention
    prompt_len: int  # real prompt tokens in this row
    offset: int = 0  # index of the prompt's first token (left padding before it)


@dataclass(frozen=True)
class BankPlan:
    """Gather indices for one prefill batch: for each intervened layer, [B, P] positions and unit entries."""

    positions: dict[int, Tensor]
    entries: dict[int, Tensor]

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
        start, end = window if window is not None else (0, None)
        per_layer: dict[int, list[list[tuple[int, int]]]] = {}
        for row_index, row in enumerate(rows):
            config = self._configs.get(row.slot) if row.slot else None
            if row.slot and config is None:
                raise KeyError(f"slot {row.slot} is empty")
            if config is None:
                continue
            for unit in config.units():
                entry = row.slot * GROUPS_PER_SLOT + (1 if unit.group == "suffix" else 0)
                targets = per_layer.setdefault(unit.layer, [[] for _ in rows])[row_index]
                absolute = (row.offset + p for p in config.positions_for(unit.group, row.prompt_len))
                targets.extend((p - start, entry) for p in absolute if start <= p and (end is None or p < end))
        positions: dict[int, Tensor] = {}
        entries: dict[int, Tensor] = {}
        for layer, targets_by_row in per_layer.items():
            width = max(len(t) for t in targets_by_row)
            if width == 0:
                continue  # every prompt too short for this config: nothing to edit
            # Missing entries point at position 0 with entry 0 (zeros): they add exactly nothing.
            padded = [t + [(0, 0)] * (width - len(t)) for t in targets_by_row]
            table = torch.tensor(padded, dtype=torch.long).reshape(len(rows), width, 2)
            positions[layer] = table[..., 0].to(self.device)
            entries[layer] = table[..., 1].to(self.device)
        return BankPlan(positions=positions, entries=entries)

    def apply(self, layer: int, h: Tensor, plan: BankPlan) -> Tensor:
        # h: [B, T, d]
        positions, entries = plan.positions[layer], plan.entries[layer]  # [B, P]
        gathered = gather_positions(h, positions).to(self.dtype)  # [B, P, d]
        delta = affine_delta(gathered, self._A[layer][entries], self._C[layer][entries], self._b[layer][entries])
        return add_at_positions(h, positions, delta)

    def edits(self, plan: BankPlan) -> dict[int, LayerEdit]:
        """Layer -> edit function for `hooks.editing_layers`."""
        return {layer: (lambda h, layer=layer: self.apply(layer, h, plan)) for layer in plan.layers}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for table in (self._A, self._C, self._b) for t in table.values())

    def layer_rank(self, layer: int) -> int:
        """The rank of `layer`'s tables (0: no table, nothing resident edits it)."""
        return self._A[layer].shape[1] if layer in self._A else 0

    def _fit_layer(self, layer: int, *, entries: int, rank: int) -> None:
        """Make `layer`'s tables hold at least `entries` unit entries at rank >= `rank` (zero-padding is exact)."""
        current = self._A.get(layer)
        have_entries, have_rank = (current.shape[0], current.shape[1]) if current is not None else (0, 0)
        if entries <= have_entries and rank <= have_rank:
            return
        limit = self.num_slots * GROUPS_PER_SLOT
        new_entries = have_entries if entries <= have_entries else min(limit, max(entries, 2 * have_entries))
        self._resize_layer(layer, new_entries, max(rank, have_rank))

    def _shrink_layer(self, layer: int) -> None:
        """After a slot left: drop the layer's tables if nothing resident edits it, or cut them to the largest
        rank still resident there (the rows beyond it are zeros for every remaining entry)."""
        ranks = [c.rank for c in self._configs.values() if layer in c.layers]
        if not ranks:
            del self._A[layer], self._C[layer], self._b[layer]
        elif max(ranks) < self._A[layer].shape[1]:
            self._resize_layer(layer, self._A[layer].shape[0], max(ranks))

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

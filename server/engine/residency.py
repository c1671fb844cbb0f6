"""Which interventions are resident in the bank, in which slot; LRU eviction of unpinned slots.

Keys are artifact digests, so two versions of one name are two different residents and a hot swap never disturbs
a request that is still running on the old version. A slot is pinned while any running sequence uses it; only
unpinned slots are evicted, least recently used first. Residency is bounded twice: by the bank's slots and by
`max_bytes`, the bank tables' size (checked before a load with the bank's projection, so it holds at every
moment). When neither can be met by evicting idle slots, `acquire` returns None and the scheduler keeps the
request waiting, with one exception: a request whose interventions are the only ones pinned is let in over the
byte bound (as the KV budget admits a request alone), since waiting would not make room for it.

A composed request (`a+b`) pins one slot per part with `acquire_all`, all or nothing: a part that is already
resident for another request is shared, not loaded twice.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from reft_core.bank import InterventionBank
from reft_core.intervention import Intervention


class SlotTable:
    def __init__(self, bank: InterventionBank, max_bytes: int | None = None) -> None:
        self.bank = bank
        self.max_bytes = max_bytes  # None: bounded by slots only
        self._slot_of: dict[str, int] = {}
        self._pins: dict[int, int] = {}
        self._idle: OrderedDict[int, str] = OrderedDict()  # unpinned resident slots, LRU first
        # Lowest free slot first: the bank's tables are sized by the highest slot in use, so packing low keeps them
        # small. Slot 0 is the identity.
        self._free = list(range(1, bank.num_slots))
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> int:
        return len(self._slot_of)

    @property
    def pinned(self) -> int:
        """Slots in use by running rows (never evicted)."""
        return len(self._pins)

    @property
    def nbytes(self) -> int:
        return self.bank.nbytes

    def acquire(self, key: str, intervention: Intervention) -> int | None:
        """Pin (loading if needed) the slot holding `key`; None if no slot can be freed right now."""
        slots = self.acquire_all([(key, intervention)])
        return None if slots is None else slots[0]

    def acquire_all(self, parts: Sequence[tuple[str, Intervention]]) -> tuple[int, ...] | None:
        """Pin a slot for each (key, intervention), in order; None (nothing pinned) if they cannot all be resident
        right now. A failing load unpins the parts pinned so far and raises."""
        pinned: list[int] = []
        try:
            for key, intervention in parts:
                slot = self._pin(key, intervention, pinned)
                if slot is None:
                    self.release_all(pinned)
                    return None
                pinned.append(slot)
        except Exception:
            self.release_all(pinned)
            raise
        return tuple(pinned)

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            del self._pins[slot]
            key = next(k for k, s in self._slot_of.items() if s == slot)
            self._idle[slot] = key

    def release_all(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self.release(slot)

    def _pin(self, key: str, intervention: Intervention, pinned: list[int]) -> int | None:
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._make_room(intervention, pinned)
            if slot is None:
                return None
            try:
                self.bank.load(slot, intervention)
            except Exception:
                self.bank.clear(slot)  # a half-written slot must not serve anyone
                heapq.heappush(self._free, slot)
                raise
            self._slot_of[key] = slot
            self.loads += 1
        self._idle.pop(slot, None)
        self._pins[slot] = self._pins.get(slot, 0) + 1
        return slot

    def _make_room(self, intervention: Intervention, pinned: list[int]) -> int | None:
        """A free slot where `intervention` fits the byte bound, evicting idle slots (LRU first) until there is
        one; None when only rows in use could make room."""
        while True:
            slot = self._free[0] if self._free else None
            if slot is not None and self._fits(slot, intervention):
                return heapq.heappop(self._free)
            if self._idle:
                self._evict_lru()
            elif slot is not None and not self._others_pinned(pinned):
                return heapq.heappop(self._free)  # alone over the bound: nothing running will ever make room
            else:
                return None

    def _fits(self, slot: int, intervention: Intervention) -> bool:
        return self.max_bytes is None or self.bank.nbytes_with(slot, intervention) <= self.max_bytes

    def _others_pinned(self, pinned: list[int]) -> bool:
        """Whether any slot is pinned by something other than the parts this request pinned so far."""
        return any(count > pinned.count(slot) for slot, count in self._pins.items())

    def _evict_lru(self) -> None:
        slot, key = self._idle.popitem(last=False)
        del self._slot_of[key]
        self.bank.clear(slot)
        heapq.heappush(self._free, slot)
        self.evictions += 1

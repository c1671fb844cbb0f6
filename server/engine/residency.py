"""Which interventions are resident in the bank, in which slot; LRU eviction of unpinned slots.

Keys are artifact digests, so two versions of one name are two different residents and a hot swap never disturbs
a request that is still running on the old version. A slot is pinned while any running sequence uses it; only
unpinned slots are evicted, least recently used first. When every slot is pinned, `acquire` returns None and
the scheduler keeps the request waiting.
"""

from __future__ import annotations

from collections import OrderedDict

from reft_core.bank import InterventionBank
from reft_core.intervention import Intervention


class SlotTable:
    def __init__(self, bank: InterventionBank) -> None:
        self.bank = bank
        self._slot_of: dict[str, int] = {}
        self._pins: dict[int, int] = {}
        self._idle: OrderedDict[int, str] = OrderedDict()  # unpinned resident slots, LRU first
        self._free = list(range(bank.num_slots - 1, 0, -1))  # slot 0 is the identity
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> int:
        return len(self._slot_of)

    def acquire(self, key: str, intervention: Intervention) -> int | None:
        """Pin (loading if needed) the slot holding `key`; None if no slot can be freed right now."""
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            try:
                self.bank.load(slot, intervention)
            except Exception:
                self.bank.clear(slot)  # a half-written slot must not serve anyone
                self._free.append(slot)
                raise
            self._slot_of[key] = slot
            self.loads += 1
        self._idle.pop(slot, None)
        self._pins[slot] = self._pins.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            del self._pins[slot]
            key = next(k for k, s in self._slot_of.items() if s == slot)
            self._idle[slot] = key

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        slot, key = self._idle.popitem(last=False)
        del self._slot_of[key]
        self.bank.clear(slot)
        self.evictions += 1
        return slot

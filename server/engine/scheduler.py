"""The scheduler decides which sequences run: a FIFO of waiting sequences and the set of running ones.

Admission happens between decode steps (iteration-level batching): waiting sequences join while there is a free
row, the prefill token budget allows, and their intervention can be pinned in a bank slot. Finished sequences
leave at once and unpin their slot.
"""

from __future__ import annotations

from collections import deque

from server.engine.residency import SlotTable
from server.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, slots: SlotTable, *, max_running: int, max_prefill_tokens: int) -> None:
        self.slots = slots
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """Move as many waiting sequences to running as fit this iteration, in arrival order.

        Returns the admitted sequences and those whose intervention could not be loaded (removed from the queue,
        with the reason; the caller fails them)."""
        admitted: list[Sequence] = []
        refused: list[tuple[Sequence, Exception]] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            seq = self.waiting[0]
            if admitted and tokens + seq.prompt_len > self.max_prefill_tokens:
                break
            ref = seq.request.intervention
            try:
                slot = self.slots.acquire(ref.key, ref.intervention) if ref is not None else 0
            except Exception as exc:  # noqa: BLE001 - one bad intervention must not stop admission for the rest
                self.waiting.popleft()
                seq.status = SequenceStatus.FINISHED
                refused.append((seq, exc))
                continue
            if slot is None:
                break  # every slot is pinned by running rows: wait for one to finish
            self.waiting.popleft()
            seq.slot, seq.status = slot, SequenceStatus.RUNNING
            admitted.append(seq)
            tokens += seq.prompt_len
        for seq in admitted:
            self.running[seq.seq_id] = seq
        return admitted, refused

    def remove_waiting(self, seq: Sequence) -> bool:
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        seq.status = SequenceStatus.FINISHED
        return True

    def finish(self, seq: Sequence) -> None:
        if self.running.pop(seq.seq_id, None) is not None:
            self.slots.release(seq.slot)
        seq.status = SequenceStatus.FINISHED

"""The scheduler decides which sequences run: a FIFO of waiting sequences and the set of running ones.

Admission happens between decode steps (iteration-level batching): waiting sequences join while there is a free
row, the prefill token budget allows, the KV cache budget allows, and their interventions (several for a composed
request) can be pinned in bank slots. The KV cost counted is the slot cache's real allocation (`capacity_bytes`):
row capacity x column capacity x bytes per token, each capacity the next power of two of what the batch needs (rows,
and the longest row's prompt + max_tokens), and never less than what the cache already holds (it keeps its size
until the batch empties). Long rows (`is_long`: they decode in a cache of their own, see `ModelRunner`) are counted
apart, in that cache: their rows x their longest, so a long prompt does not widen every short row's count. The
staging cache is not counted: it holds only the prompt being prefilled in chunks (one at a time, bounded by the
prompt limit) until it moves to the cache it decodes in. A request alone is always admitted (its own size is bounded by the prompt and max_tokens limits). Finished sequences leave at once and unpin their slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.kv_cache import MIN_COLUMNS, capacity, capacity_bytes
from server.engine.residency import SlotTable
from server.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class KVBudget:
    bytes_per_token: int  # keys + values of one position at every layer
    max_bytes: int | None = None  # None: unbounded

    def cost(self, rows: int, columns: int, allocated: tuple[int, int] = (0, 0), long: tuple[int, int] = (0, 0)) -> int:
        """Bytes the slot cache holds once it fits `rows` rows of up to `columns` tokens, given the (rows, columns)
        it has `allocated` already (it grows, it does not shrink while rows remain); plus, for `long` = (rows,
        columns) of long rows, their own cache (grown a row at a time)."""
        slots = capacity_bytes(max(rows, allocated[0]), max(columns, allocated[1]), self.bytes_per_token)
        long_rows, long_columns = long
        return slots + (capacity(long_rows, 1) * capacity(long_columns, MIN_COLUMNS) * self.bytes_per_token
                        if long_rows else 0)

    def allows(self, rows: int, columns: int, allocated: tuple[int, int] = (0, 0),
               long: tuple[int, int] = (0, 0)) -> bool:
        return (self.max_bytes is None or rows + long[0] <= 1
                or self.cost(rows, columns, allocated, long) <= self.max_bytes)


def final_length(seq: Sequence) -> int:
    return seq.prompt_len + seq.request.params.max_tokens


class Scheduler:
    def __init__(
        self, slots: SlotTable, *, max_running: int, max_prefill_tokens: int, kv_budget: KVBudget | None = None,
        kv_allocated: Callable[[], tuple[int, int]] = lambda: (0, 0),
        is_long: Callable[[int], bool] = lambda prompt_len: False,
    ) -> None:
        self.slots = slots
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_budget = kv_budget or KVBudget(bytes_per_token=0)
        self.kv_allocated = kv_allocated  # (rows, columns) the slot cache holds now
        self.is_long = is_long  # whether a prompt this long makes a long row
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
        # (rows, widest final length) of the short rows and of the long rows
        short, long = [0, 0], [0, 0]
        for running in self.running.values():
            group = long if self.is_long(running.prompt_len) else short
            group[0], group[1] = group[0] + 1, max(group[1], final_length(running))
        allocated = self.kv_allocated()
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            seq = self.waiting[0]
            if admitted and tokens + seq.prompt_len > self.max_prefill_tokens:
                break
            grown_short, grown_long = list(short), list(long)
            group = grown_long if self.is_long(seq.prompt_len) else grown_short
            group[0], group[1] = group[0] + 1, max(group[1], final_length(seq))
            if not self.kv_budget.allows(grown_short[0], grown_short[1], allocated, (grown_long[0], grown_long[1])):
                break  # the batch's KV cache would outgrow its budget: wait for rows to finish
            parts = seq.request.parts
            try:
                slots = self.slots.acquire_all([(p.key, p.intervention) for p in parts]) if parts else ()
            except Exception as exc:  # noqa: BLE001 - one bad intervention must not stop admission for the rest
                self.waiting.popleft()
                seq.status = SequenceStatus.FINISHED
                refused.append((seq, exc))
                continue
            if slots is None:
                break  # no room in the bank that rows in use could not take back: wait for one to finish
            self.waiting.popleft()
            seq.slots, seq.status = slots, SequenceStatus.RUNNING
            admitted.append(seq)
            short, long = grown_short, grown_long
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
            self.slots.release_all(seq.slots)
        seq.status = SequenceStatus.FINISHED

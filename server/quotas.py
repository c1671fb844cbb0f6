"""Per-tenant rate limits: requests and tokens per minute, as token buckets (in memory, per process).

A bucket holds up to one minute's allowance and refills continuously, so a tenant may burst up to its per-minute
limit and then proceeds at the steady rate. A refusal says how long until the request would fit (`Retry-After`).
Token charges are reservations (prompt + max_tokens); what a request did not use is refunded when it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Limiter(Protocol):
    """What requests are charged through: `RateLimiter` (one process) or `shared_limits.RedisRateLimiter`."""

    def take(self, tenant: str, kind: str, amount: float, capacity_per_minute: int) -> float: ...
    def refund(self, tenant: str, kind: str, amount: float, capacity_per_minute: int) -> None: ...


@dataclass
class _Bucket:
    level: float
    updated: float


class RateLimiter:
    """Buckets keyed by (tenant, kind); `capacity_per_minute` is looked up on every call (limits can change)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str, kind: str, amount: float, capacity_per_minute: int) -> float:
        """Take `amount` now; returns 0.0 on success, else the seconds to wait before it would fit (nothing taken).

        An amount above the whole per-minute capacity can never fit; it is refused with a wait of 60 s.
        """
        now = self._clock()
        rate = capacity_per_minute / 60.0
        with self._lock:
            bucket = self._buckets.get((tenant, kind))
            if bucket is None:
                bucket = self._buckets[(tenant, kind)] = _Bucket(float(capacity_per_minute), now)
            bucket.level = min(float(capacity_per_minute), bucket.level + (now - bucket.updated) * rate)
            bucket.updated = now
            if amount <= bucket.level:
                bucket.level -= amount
                return 0.0
            if amount > capacity_per_minute:
                return 60.0
            return (amount - bucket.level) / rate

    def refund(self, tenant: str, kind: str, amount: float, capacity_per_minute: int) -> None:
        with self._lock:
            bucket = self._buckets.get((tenant, kind))
            if bucket is not None:
                bucket.level = min(float(capacity_per_minute), bucket.level + amount)

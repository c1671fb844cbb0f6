"""Per-tenant rate limits shared by every replica: the token buckets of `server.quotas`, kept in Redis.

One Lua script per check does the whole read-refill-take-write on the server side, so a check is atomic and one
round trip, and N replicas together enforce the tenant's limit (not N times it). The script reads Redis's own
clock (`TIME`), so replicas' clocks need not agree. Buckets expire two minutes after their last use.

Redis unreachable: by default the server keeps serving with per-process buckets (fail-open for availability: each
replica then enforces the full limit on its own, so a tenant may get up to N times its limit meanwhile), logs the
switch once, and reports `reft_limits_store_up 0` on /metrics; it tries Redis again after `RETRY_S`. With
`limits_fail_closed` it refuses instead (503 `limits_unavailable`).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from prometheus_client import Gauge

from server.errors import APIError
from server.quotas import RateLimiter

log = logging.getLogger("reft_serve.limits")
RETRY_S = 1.0  # while Redis is away, try it again this often (not on every request: each try may wait a timeout)
TIMEOUT_S = 0.25  # a check's budget: a slow Redis must not hold requests up longer than this
_BUCKET = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local amount, capacity, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local rate = capacity / 60.0
local state = redis.call('HMGET', KEYS[1], 'level', 'updated')
local level, updated = tonumber(state[1]), tonumber(state[2])
if level == nil or updated == nil then level, updated = capacity, now end
level = math.min(capacity, level + math.max(0, now - updated) * rate)
local wait = 0
if mode == 'refund' then
  level = math.min(capacity, level + amount)
elseif amount <= level then
  level = level - amount
elseif amount > capacity then
  wait = 60
else
  wait = (amount - level) / rate
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return tostring(wait)
"""


class LimitsUnavailableError(APIError):
    def __init__(self) -> None:
        super().__init__(503, "the rate-limit store is unreachable and this server is set to fail closed; retry "
                         "shortly", type="server_error", code="limits_unavailable", headers={"Retry-After": "1"})


class RedisRateLimiter:
    """`RateLimiter`'s interface (take, refund) on Redis, with a per-process fallback while Redis is away."""

    def __init__(self, url: str, up: Gauge, *, prefix: str = "reft:limits:", fail_closed: bool = False) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._bucket = self._redis.register_script(_BUCKET)
        self.prefix, self.fail_closed, self._up = prefix, fail_closed, up
        self.fallback = RateLimiter()
        self._down_since: float | None = None
        self._lock = threading.Lock()
        up.set(1)

    def take(self, tenant: str, kind: str, amount: float, capacity_per_minute: int) -> float:
        """0.0 when taken, else the seconds until it would fit (as `RateLimiter.take`)."""
        wait = self._run(tenant, kind, amount, capacity_per_minute, "take")
        if wait is None:
            return self.fallback.take(tenant, kind, amount, capacity_per_minute)
        return wait

    def refund(self, tenant: str, kind: str, amount: float, capacity_per_minute: int) -> None:
        if self._run(tenant, kind, amount, capacity_per_minute, "refund") is None:
            self.fallback.refund(tenant, kind, amount, capacity_per_minute)

    def _run(self, tenant: str, kind: str, amount: float, capacity: int, mode: str) -> float | None:
        """The script's answer, or None when Redis is away (then the caller uses the fallback)."""
        with self._lock:
            down_since = self._down_since
        if down_since is not None and time.monotonic() - down_since < RETRY_S:
            return self._unavailable(None)
        try:
            answer = self._bucket(keys=[f"{self.prefix}{tenant}:{kind}"], args=[amount, capacity, mode])
        except redis.RedisError as exc:
            return self._unavailable(exc)
        with self._lock:
            if self._down_since is not None:
                log.warning("the rate-limit store is reachable again: limits are shared again")
            self._down_since = None
        self._up.set(1)
        return float(answer)

    def _unavailable(self, exc: Exception | None) -> None:
        with self._lock:
            if exc is not None:
                if self._down_since is None:
                    log.warning("the rate-limit store is unreachable: %s", "refusing requests" if self.fail_closed
                                else "using per-process limits until it is back", extra={"reason": str(exc)})
                self._down_since = time.monotonic()
        self._up.set(0)
        if self.fail_closed:
            raise LimitsUnavailableError()
        return None

    def close(self) -> None:
        self._redis.close()

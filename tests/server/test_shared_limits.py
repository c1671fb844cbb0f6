"""Rate limits in Redis: the same buckets as the in-process limiter, shared by every limiter on one prefix, and
what happens when Redis is unreachable (per-process buckets and a 0 gauge; or 503 when set to fail closed)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import Gauge

from server.quotas import RateLimiter
from server.shared_limits import LimitsUnavailableError, RedisRateLimiter
from tests.shared_services import REDIS_URL

UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def limiter(prefix: str, url: str = REDIS_URL, **options: bool) -> tuple[RedisRateLimiter, Gauge]:
    from prometheus_client import CollectorRegistry

    gauge = Gauge("reft_limits_store_up", "test", registry=CollectorRegistry())
    return RedisRateLimiter(url, gauge, prefix=prefix, **options), gauge


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "refund"]), st.integers(1, 40)), min_size=1, max_size=20),
       st.integers(10, 100))
def test_redis_buckets_decide_like_the_in_process_ones(redis_keys: str, steps, capacity: int) -> None:
    """Within one quick burst (refill negligible) both limiters grant and refuse the same requests."""
    shared, _ = limiter(f"{redis_keys}{uuid.uuid4().hex[:8]}:")
    local = RateLimiter()
    for action, amount in steps:
        if action == "refund":
            shared.refund("t", "tokens", amount, capacity)
            local.refund("t", "tokens", amount, capacity)
        else:
            assert (shared.take("t", "tokens", amount, capacity) == 0) == (local.take("t", "tokens", amount, capacity) == 0)
    shared.close()


def test_limiters_on_one_prefix_share_the_bucket(redis_keys: str) -> None:
    prefix = f"{redis_keys}{uuid.uuid4().hex[:8]}:"
    replicas = [limiter(prefix)[0] for _ in range(3)]
    granted = sum(replicas[i % 3].take("acme", "requests", 1, 10) == 0 for i in range(60))
    assert granted == 10  # not 3 x 10
    assert replicas[0].take("globex", "requests", 1, 10) == 0  # per tenant
    waits = replicas[1].take("acme", "requests", 1, 10)
    assert 0 < waits <= 6.0  # one request's worth at 10/min


def test_unreachable_redis_fails_open_with_per_process_limits(redis_keys: str) -> None:
    shared, gauge = limiter(redis_keys, url=UNREACHABLE)
    granted = sum(shared.take("acme", "requests", 1, 5) == 0 for _ in range(8))
    assert granted == 5 and gauge._value.get() == 0  # the fallback still limits, per process


def test_unreachable_redis_can_fail_closed(redis_keys: str) -> None:
    shared, gauge = limiter(redis_keys, url=UNREACHABLE, fail_closed=True)
    with pytest.raises(LimitsUnavailableError) as refused:
        shared.take("acme", "requests", 1, 5)
    assert refused.value.status == 503 and gauge._value.get() == 0

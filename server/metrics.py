"""Prometheus metrics for one server instance, on its own registry (so tests can build many apps).

Names follow `reft_<noun>_<unit>[_total]`. Labels have bounded values only: no request ids, no intervention names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("reft_queue_depth_requests", "Requests waiting for a batch row", registry=r)
        self.running_rows = Gauge("reft_running_rows", "Rows in the running batch", registry=r)
        self.tokens_generated = Counter("reft_generated_tokens_total", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("reft_prompt_tokens_total", "Prompt tokens prefilled", registry=r)
        self.requests = Counter(
            "reft_requests_total", "Finished generation requests by finish reason", ["finish_reason"], registry=r
        )
        self.prefill_step = Histogram(
            "reft_prefill_step_seconds", "Wall time of one prefill forward", buckets=_STEP_BUCKETS, registry=r
        )
        self.decode_step = Histogram(
            "reft_decode_step_seconds", "Wall time of one decode forward", buckets=_STEP_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "reft_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            "reft_inter_token_latency_seconds", "Time between tokens of one request", buckets=_STEP_BUCKETS, registry=r
        )
        self.resident_interventions = Gauge(
            "reft_resident_interventions", "Interventions resident in the bank", registry=r
        )
        self.bank_bytes = Gauge(
            "reft_bank_bytes", "Bytes of the bank's tables (resident intervention weights)", registry=r
        )
        self.intervention_loads = Counter("reft_intervention_loads_total", "Loads into the bank", registry=r)
        self.store_interventions = Gauge("reft_store_interventions", "Interventions in the store", registry=r)
        self.store_bytes = Gauge("reft_store_bytes", "Bytes of artifacts in the store", registry=r)
        self.limits_store_up = Gauge(
            "reft_limits_store_up", "1 while the shared rate-limit store (Redis) answers, 0 while per-process limits "
            "stand in (absent without --limits-store)", registry=None,
        )
        self.errors = Counter("reft_errors_total", "Errors returned to clients by type", ["type"], registry=r)

"""Prometheus metrics for one server instance, on its own registry (so tests can build many apps).

Names follow `reft_<noun>_<unit>[_total]`. Labels have bounded values only: no request ids, no intervention names
(per-intervention activity is a count of distinct interventions, not a series per name: names are tenants' data
and unbounded). HTTP series are labelled by route template (`/v1/interventions/{name}`), never the raw path.

Where each is recorded: engine series (steps, queue depth, rows, bank) in the engine, relayed from the engine
process (server/engine/metrics_relay.py); per-request series in the API process from the timings the engine sends
back with each request's final event (server/generation.py); HTTP series by `RequestContext`
(server/request_context.py); training series by the training manager; store latency by `TimedStore`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # -- engine (relayed from the engine process) --
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
            "reft_decode_step_seconds", "Wall time of one decode forward (prompt pieces packed in included)",
            buckets=_STEP_BUCKETS, registry=r
        )
        self.draft_tokens = Counter(
            "reft_speculative_draft_tokens_total", "Draft tokens fed to decode forwards (speculative decoding)",
            registry=r,
        )
        self.accepted_draft_tokens = Counter(
            "reft_speculative_accepted_tokens_total", "Draft tokens that stood: tokens generated without a step of "
            "their own", registry=r,
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
        self.intervention_loads = Counter(
            "reft_intervention_loads_total", "Interventions loaded into a bank slot (a miss of the resident set)",
            registry=r,
        )
        self.active_interventions = Gauge(
            "reft_active_interventions", "Distinct interventions among running or waiting rows (the bare model not "
            "counted)", ["state"], registry=r,
        )
        # -- per request, from the engine's timings (API process) --
        self.request_latency = Histogram(
            "reft_request_duration_seconds", "End-to-end generation time: submitted to the engine until its final "
            "event", buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.request_queue = Histogram(
            "reft_request_queue_seconds", "Time a request waited for a batch row", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.request_prefill = Histogram(
            "reft_request_prefill_seconds", "Time from admission to a request's first token", buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.request_decode = Histogram(
            "reft_request_decode_seconds", "Time from a request's first token to its last", buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "reft_request_prompt_tokens", "Prompt tokens per finished request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "reft_request_generation_tokens", "Generated tokens per finished request", buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        # -- HTTP (API process) --
        self.http_requests = Counter(
            "reft_http_requests_total", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=r,
        )
        self.http_latency = Histogram(
            "reft_http_request_duration_seconds", "HTTP request time until the response is complete (streams "
            "included), by route template", ["route"], buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.errors = Counter("reft_errors_total", "Errors returned to clients by type", ["type"], registry=r)
        # -- training --
        self.training_jobs = Counter(
            "reft_training_jobs_total", "Training jobs reaching each status (queued, running, succeeded, failed, "
            "cancelled)", ["status"], registry=r,
        )
        self.training_steps = Counter("reft_training_steps_total", "Optimizer steps taken by training jobs", registry=r)
        self.training_step_rate = Gauge(
            "reft_training_steps_per_second", "Optimizer steps per second of the running training job (0: none runs)",
            registry=r,
        )
        # -- store --
        self.store_interventions = Gauge("reft_store_interventions", "Interventions in the store", registry=r)
        self.store_bytes = Gauge("reft_store_bytes", "Bytes of artifacts in the store", registry=r)
        self.limits_store_up = Gauge(
            "reft_limits_store_up", "1 while the shared rate-limit store (Redis) answers, 0 while per-process limits "
            "stand in (absent without --limits-store)", registry=None,
        )
        self.store_latency = Histogram(
            "reft_store_operation_seconds", "Latency of artifact store operations by operation", ["operation"],
            buckets=_STORE_BUCKETS, registry=r,
        )

"""Optional OpenTelemetry traces: one span per HTTP request, with children for the engine's queue, prefill and
decode phases and one per artifact store operation.

The engine runs in another process, so its phases are not traced across the pipe: the engine measures them and
sends the durations back with the request's final event (`GenerationEvent.timings`), and `engine_spans` lays them
out backwards from the moment that event arrived. Tracing needs the `otel` extra (`pip install 'reft-serve[otel]'`)
and an endpoint (`--otlp-endpoint`); without them every method here is a cheap no-op. A `traceparent` header on a
request makes its span a child of the caller's trace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class Tracing:
    """One app's tracer (not the process-global one, so tests can build many apps with their own exporters)."""

    def __init__(self, provider: Any | None = None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("reft-serve") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextmanager
    def request_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any | None]:
        """The span of one HTTP request, current while the request is handled (its children attach to it)."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(dict(headers))
        with self._tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER) as span:
            yield span

    @contextmanager
    def span(self, name: str, **attributes: str | int | float) -> Iterator[None]:
        if self._tracer is None:
            yield
            return
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield

    def engine_spans(self, timings: Mapping[str, float], **attributes: str | int) -> None:
        """Child spans of the current span for the engine's phases of one request, ending now."""
        if self._tracer is None or "queue_s" not in timings:
            return
        end = time.time_ns()
        phases = [("queue", timings["queue_s"]), ("prefill", timings.get("prefill_s")),
                  ("decode", timings.get("decode_s"))]
        present = [(name, int(seconds * 1e9)) for name, seconds in phases if seconds is not None]
        start = end - sum(ns for _, ns in present)
        for name, ns in present:
            span = self._tracer.start_span(name, start_time=start, attributes=attributes)
            span.end(end_time=start + ns)
            start += ns

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes spans still batched


def build_tracing(endpoint: str | None, exporter: Any | None = None, service_name: str = "reft-serve") -> Tracing:
    """Tracing to an OTLP/HTTP endpoint (e.g. http://collector:4318/v1/traces), or to `exporter` (tests: the SDK's
    in-memory exporter); a no-op when given neither."""
    if endpoint is None and exporter is None:
        return Tracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise RuntimeError("tracing (--otlp-endpoint) needs the otel extra: pip install 'reft-serve[otel]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider)

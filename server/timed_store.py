"""`TimedStore`: the artifact store as the server sees it, with every operation measured.

Each public method call is observed in `reft_store_operation_seconds{operation=<method>}` (a bounded label: the
store's method names, and `training_files.<method>` for uploaded training files) and, with tracing on, becomes a
`store.<method>` span under the current request's span.
Wrapping here keeps `adapters_store` free of Prometheus and OpenTelemetry (imports flow server -> store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from server.metrics import Metrics
from server.tracing import Tracing


class TimedStore:
    def __init__(self, store: Any, metrics: Metrics, tracing: Tracing, prefix: str = "") -> None:
        self._store, self._metrics, self._tracing, self._prefix = store, metrics, tracing, prefix

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name == "training_files":  # the store's part for uploaded files: its calls are store operations too
            return TimedStore(attribute, self._metrics, self._tracing, prefix=f"{self._prefix}{name}.")
        if name.startswith("_") or not callable(attribute):
            return attribute
        return self._timed(self._prefix + name, attribute)

    def _timed(self, operation: str, method: Callable[..., Any]) -> Callable[..., Any]:
        histogram = self._metrics.store_latency.labels(operation=operation)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                with self._tracing.span(f"store.{operation}"):
                    return method(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - started)

        return timed

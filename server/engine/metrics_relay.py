"""Metrics across the process boundary: the engine process records what it would have done to the Prometheus
metrics, the API process replays it into the real ones (which `/metrics` serves).

`MetricsRecorder` has the attributes of `server.metrics.Metrics` the engine touches; each `inc`/`set`/`observe`
(after an optional `labels(...)`) becomes a small tuple, shipped with the iteration's events and replayed in order.
"""

from __future__ import annotations

from typing import Any

from server.metrics import Metrics

MetricOp = tuple[str, tuple[tuple[str, str], ...], str, float]  # (metric, labels, method, value)


class _Recorded:
    def __init__(self, ops: list[MetricOp], name: str, labels: tuple[tuple[str, str], ...] = ()) -> None:
        self._ops, self._name, self._labels = ops, name, labels

    def labels(self, **labels: str) -> _Recorded:
        return _Recorded(self._ops, self._name, tuple(sorted(labels.items())))

    def inc(self, amount: float = 1.0) -> None:
        self._ops.append((self._name, self._labels, "inc", amount))

    def set(self, value: float) -> None:
        self._ops.append((self._name, self._labels, "set", value))

    def observe(self, value: float) -> None:
        self._ops.append((self._name, self._labels, "observe", value))


class MetricsRecorder:
    """Stands in for `Metrics` inside the engine process."""

    def __init__(self) -> None:
        self._ops: list[MetricOp] = []

    def __getattr__(self, name: str) -> _Recorded:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Recorded(self._ops, name)

    def take(self) -> list[MetricOp]:
        """The operations recorded since the last call (called on the engine thread, like the recording)."""
        ops, self._ops[:] = list(self._ops), []
        return ops


def replay(metrics: Metrics, ops: list[MetricOp]) -> None:
    for name, labels, method, value in ops:
        metric: Any = getattr(metrics, name)
        if labels:
            metric = metric.labels(**dict(labels))
        getattr(metric, method)(value)

"""Request ids and traces: `X-Request-Id` is kept or generated and returned on every kind of answer, every log line
written for a request names it (the engine's too), and one request's trace is the tree HTTP span -> queue,
prefill, decode (in that order, inside it), with store spans beside them (SDK in-memory exporter)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.concurrency import run_in_threadpool

from server.app import create_app
from server.logging_setup import JsonFormatter, configure_logging
from server.request_context import RequestIdFilter

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona, upload

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_base) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    app = create_app(make_settings(tmp_path_factory.mktemp("traced")), base_model=tiny_base, span_exporter=exporter)

    @app.get("/test-only/log")  # a handler that logs on the event loop and in the threadpool
    async def log_twice() -> dict:
        logging.getLogger("reft_serve.test").warning("on the loop")
        await run_in_threadpool(logging.getLogger("reft_serve.test").warning, "in the threadpool")
        return {}

    with TestClient(app) as client:
        yield client, exporter


@pytest.mark.parametrize("kind", ["ok", "stream", "validation", "not-found", "unknown-route", "metrics"])
def test_every_answer_carries_the_request_id(traced, kind) -> None:
    client, _ = traced
    call = {
        "ok": ("POST", "/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2}),
        "stream": ("POST", "/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2,
                                                    "stream": True}),
        "validation": ("POST", "/v1/chat/completions", {"model": MODEL_ID}),
        "not-found": ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
        "unknown-route": ("GET", "/v1/nowhere", None),
        "metrics": ("GET", "/metrics", None),
    }[kind]
    given = client.request(call[0], call[1], json=call[2], headers={"X-Request-Id": f"client-{kind}"})
    assert given.headers["x-request-id"] == f"client-{kind}"
    generated = client.request(call[0], call[1], json=call[2])
    assert len(generated.headers["x-request-id"]) == 32 and generated.headers["x-request-id"] != f"client-{kind}"


@pytest.mark.parametrize("hostile", ["a" * 129, "line\rbreak", "spa ce", ""])
def test_an_unusable_client_id_is_replaced(traced, hostile) -> None:
    client, _ = traced
    response = client.get("/health", headers={"X-Request-Id": hostile})
    assert response.headers["x-request-id"] != hostile and len(response.headers["x-request-id"]) == 32


def test_log_lines_of_a_request_name_it(traced) -> None:
    client, _ = traced
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(RequestIdFilter())
    logging.getLogger().addHandler(handler)
    try:
        client.get("/test-only/log", headers={"X-Request-Id": "trace-me"})
    finally:
        logging.getLogger().removeHandler(handler)
    mine = [r for r in records if r.name == "reft_serve.test"]
    assert [r.getMessage() for r in mine] == ["on the loop", "in the threadpool"]
    assert all(r.request_id == "trace-me" for r in mine)  # type: ignore[attr-defined]
    assert '"request_id": "trace-me"' in JsonFormatter().format(mine[0])


def test_the_engine_gets_the_request_id(traced, monkeypatch) -> None:
    client, _ = traced
    engine = client.app.state.services.engine
    seen = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda request, sink: (seen.append(request), submit(request, sink)))
    client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2},
                headers={"X-Request-Id": "to-the-engine"})
    assert [r.client_request_id for r in seen] == ["to-the-engine"]


def test_one_request_is_one_span_tree(traced, tiny_base) -> None:
    client, exporter = traced
    upload(client, "pirate", artifact_bytes(tiny_base, persona(2)))
    exporter.clear()
    response = client.post("/v1/chat/completions", json={"model": "pirate", "messages": CHAT, "max_tokens": 3},
                           headers={"X-Request-Id": "one-tree"})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    [root] = [s for s in spans if s.parent is None and s.name == "POST /v1/chat/completions"]
    assert root.attributes["reft.request_id"] == "one-tree" and root.attributes["http.response.status_code"] == 200
    children = sorted((s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
                      key=lambda s: s.start_time)
    engine = [s for s in children if not s.name.startswith("store.")]
    assert [s.name for s in engine] == ["queue", "prefill", "decode"]
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    for earlier, later in zip(engine, engine[1:]):
        assert earlier.end_time <= later.start_time  # phases follow each other
    assert root.start_time <= engine[0].start_time and engine[-1].end_time <= root.end_time
    assert engine[-1].attributes["reft.completion_tokens"] == 3
    assert "store.get" in {s.name for s in children}  # the name was resolved from the store inside this request


def test_a_traceparent_header_joins_the_callers_trace(traced) -> None:
    client, exporter = traced
    exporter.clear()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    client.get("/v1/models", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    [root] = [s for s in exporter.get_finished_spans() if s.name == "GET /v1/models"]
    assert f"{root.context.trace_id:032x}" == trace_id and f"{root.parent.span_id:016x}" == "b7ad6b7169203331"


def test_logs_follow_stderr_when_a_host_swaps_and_closes_it(monkeypatch) -> None:
    """Background threads (engine relay, lease renewal) may log after a host program, or pytest's capture, replaced
    and closed the stderr that was current at configuration: the record goes to the current one, no 'Logging error'."""
    import io
    import sys

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("info", "text")
        logging.getLogger("reft_serve.test").warning("before the swap")
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("reft_serve.test").warning("after the swap")
        assert "after the swap" in second.getvalue() and "Logging error" not in second.getvalue()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])

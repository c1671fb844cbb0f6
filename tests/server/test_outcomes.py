"""Typed outcomes end to end: the same condition (shutdown, timeout, an internal failure) gives the same error type
and code whether the request streams (an SSE error event) or not (the HTTP status from the one table)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.types import ErrorKind
from server.generation import _ERROR_RESPONSES

from .conftest import MODEL_ID, make_settings

CHAT = [{"role": "user", "content": "hi"}]


def _shutdown(client: TestClient, monkeypatch) -> None:  # noqa: ANN001
    client.app.state.services.engine.drain()  # the engine refuses what arrives next, as during SIGTERM


def _timeout(client: TestClient, monkeypatch) -> None:  # noqa: ANN001
    settings = client.app.state.services.generation.settings
    monkeypatch.setattr(client.app.state.services.generation, "settings",
                        settings.model_copy(update={"request_timeout_s": 0.001}))


def _internal(client: TestClient, monkeypatch) -> None:  # noqa: ANN001
    runner = client.app.state.services.engine.runner
    monkeypatch.setattr(runner, "prefill", lambda rows: (_ for _ in ()).throw(RuntimeError("boom")))


CONDITIONS = {"shutdown": (_shutdown, ErrorKind.SHUTDOWN), "timeout": (_timeout, ErrorKind.TIMEOUT),
              "internal": (_internal, ErrorKind.INTERNAL)}


def _stream_error(client: TestClient, path: str, body: dict) -> tuple[int, dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1, events
    return response.status_code, errors[0]


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 64, "ignore_eos": True}),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hello", "max_tokens": 64, "ignore_eos": True}),
], ids=["chat", "completion"])
def test_same_condition_same_code_streamed_or_not(tmp_path, tiny_base, monkeypatch, condition, path, body) -> None:
    set_up, kind = CONDITIONS[condition]
    status, error_type, code = _ERROR_RESPONSES[kind]
    with TestClient(create_app(make_settings(tmp_path), base_model=tiny_base)) as client:
        set_up(client, monkeypatch)
        plain = client.post(path, json=body)
        assert plain.status_code == status, plain.text
        assert (plain.json()["error"]["type"], plain.json()["error"]["code"]) == (error_type, code)
        stream_status, streamed = _stream_error(client, path, body)
        assert stream_status == 200  # the headers went out before the failure
        assert (streamed["type"], streamed["code"]) == (error_type, code)
        assert streamed["message"].split(" (")[0] == plain.json()["error"]["message"].split(" (")[0]


def test_every_error_kind_has_one_row_in_the_table() -> None:
    assert set(_ERROR_RESPONSES) == set(ErrorKind)
    assert len({code for _, _, code in _ERROR_RESPONSES.values()}) == len(ErrorKind)

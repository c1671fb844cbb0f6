"""A client that goes away mid-stream frees its batch row at once (real uvicorn server on loopback, tiny model)."""

from __future__ import annotations

import time

import httpx

from server.app import create_app

from .conftest import MODEL_ID, make_settings
from .live import live_server


def test_stream_disconnect_cancels_the_request(tmp_path, tiny_base) -> None:
    app = create_app(make_settings(tmp_path, max_tokens_limit=200), base_model=tiny_base)
    with live_server(app) as url:
        engine = app.state.services.engine
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
                "ignore_eos": True, "min_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # got the first chunk: now hang up
        deadline = time.time() + 10
        while time.time() < deadline and engine.scheduler.running:
            time.sleep(0.05)
        assert not engine.scheduler.running and engine.runner.row_ids == []
        assert engine.metrics.requests.labels(finish_reason="cancelled")._value.get() == 1
        assert engine.metrics.tokens_generated._value.get() < 200  # it did not run to max_tokens

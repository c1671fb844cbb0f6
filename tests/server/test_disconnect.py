"""A client that goes away mid-stream frees its batch row at once (real uvicorn server on loopback, tiny model)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from server.app import create_app

from .conftest import MODEL_ID, make_settings


def test_stream_disconnect_cancels_the_request(tmp_path, tiny_base) -> None:
    app = create_app(make_settings(tmp_path, max_tokens_limit=200), base_model=tiny_base)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
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
    finally:
        server.should_exit = True
        thread.join(10)

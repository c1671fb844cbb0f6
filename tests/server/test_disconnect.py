"""A client that goes away frees its batch row at once: mid-stream (real uvicorn server on loopback, tiny model),
and while waiting for a non-streamed answer (a real `reft-serve` process on a tiny model with a long context)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from tests import tiny

from .conftest import MODEL_ID, make_settings
from .live import live_server
from .process import server_process
from .raw_http import connect


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


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory) -> Path:
    """The tiny model with room for thousands of tokens, so a generation outlasts the client by seconds."""
    directory = tmp_path_factory.mktemp("tiny-long")
    model = tiny.tiny_llama()
    model.config.max_position_embeddings = 8192
    model.save_pretrained(directory)
    tiny.tiny_tokenizer().save_pretrained(directory)
    return directory


def test_non_streamed_disconnect_cancels_the_request(long_context_model_dir, tmp_path) -> None:
    with server_process(long_context_model_dir, tmp_path / "data", "--model-id", MODEL_ID) as (_, url):
        body = json.dumps({"model": MODEL_ID, "prompt": "go on", "max_tokens": 4000, "ignore_eos": True}).encode()
        sock = connect(url)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(1)
        assert _finished(url, "cancelled") == 0 and _running_rows(url) == 1  # still generating
        sock.close()
        closed = time.monotonic()
        while time.monotonic() < closed + 2 and _finished(url, "cancelled") == 0:
            time.sleep(0.05)
        assert _finished(url, "cancelled") == 1 and _finished(url, "length") == 0


def _metric(url: str, pattern: str) -> float:
    found = re.search(pattern + r" ([0-9.e+]+)$", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _finished(url: str, reason: str) -> float:
    return _metric(url, re.escape(f'reft_requests_total{{finish_reason="{reason}"}}'))


def _running_rows(url: str) -> float:
    return _metric(url, "reft_running_rows")

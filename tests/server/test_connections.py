"""Callers that never finish a request cannot tie the server up: a real `reft-serve` process (tiny model) with
small connection limits and only 256 file descriptors, so holding descriptors is what an attack would exhaust."""

from __future__ import annotations

import resource
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from .process import server_process
from .raw_http import connect, error_code, read_response

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
LIMITS = ("--set", "max_connections=150", "--set", f"header_timeout_s={HEADER_TIMEOUT_S}",
          "--set", f"body_timeout_s={BODY_TIMEOUT_S}", "--set", "max_header_bytes=65536")


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # 300 idle sockets used to exhaust these


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("connections")
    with server_process(tiny_model_dir, data_dir, *LIMITS, preexec_fn=_few_descriptors) as (_, server_url):
        yield server_url


def test_idle_sockets_do_not_stop_a_request_and_are_closed(url) -> None:
    idle: list[socket.socket] = []
    for _ in range(300):
        sock = connect(url)
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never finished
        except OSError:
            pass  # already answered 503 and closed: over max_connections
        idle.append(sock)
    started = time.monotonic()
    served = None
    while served is None and time.monotonic() < started + HEADER_TIMEOUT_S + 5:
        try:
            response = httpx.get(f"{url}/v1/models", timeout=2)
            served = response if response.status_code == 200 else None
        except httpx.HTTPError:
            pass
        if served is None:
            time.sleep(0.1)
    assert served is not None, "a legitimate request was not served while idle sockets were held"
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 3  # at worst it waited for the idle ones to time out
    statuses = {read_response(sock, timeout=HEADER_TIMEOUT_S + 3)[0] for sock in idle}  # each one is closed
    assert statuses <= {408, 503, None}, statuses
    for sock in idle:
        sock.close()


@pytest.mark.parametrize("header", [
    b"X-Filler: " + b"a" * (1 << 20) + b"\r\n",  # one huge value: buffered by the parser across reads
    b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100)),  # ~100 KiB, likely in one read
])
def test_oversized_headers_get_431_at_once(url, header: bytes) -> None:
    assert httpx.get(f"{url}/health", headers={"X-Filler": "a" * 16_000}).status_code == 200  # big but allowed
    sock = connect(url)
    started = time.monotonic()
    sender = threading.Thread(target=_send_quietly, args=(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"))
    sender.start()
    status, body = read_response(sock, timeout=5)
    sender.join(5)
    assert status in (431, None), status  # None: closed while the client was still sending (a reset)
    if status == 431:
        assert error_code(body) == "request_header_fields_too_large"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("start, trickle, timeout", [
    (b"GET /health HTTP/1.1\r\n", b"X-A: b\r\n", HEADER_TIMEOUT_S),  # headers that never end
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
     b" ", BODY_TIMEOUT_S),  # a body that never ends
])
def test_a_trickling_request_is_answered_408_and_closed(url, start: bytes, trickle: bytes, timeout: float) -> None:
    sock = connect(url)
    sock.sendall(start)
    started = time.monotonic()
    # A few bytes every 0.2 s (never idle, never done) until the server answers; stopping then avoids sending into
    # a closed socket, whose reset could discard the answer.
    while time.monotonic() < started + timeout + 4 and not select.select([sock], [], [], 0.2)[0]:
        sock.sendall(trickle)
    status, body = read_response(sock, timeout=1)
    assert status == 408 and error_code(body) == "request_timeout"
    assert time.monotonic() - started < timeout + 2


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server stopped reading and closed: what the test is about

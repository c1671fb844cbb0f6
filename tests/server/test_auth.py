"""Authentication happens on the headers, before anything reads the body: a caller without a valid key cannot make
the server buffer, spool or decode an upload or a JSON body. In-process on the ASGI app, then through a real
`reft-serve` process (tiny model, auth on) with bodies sent only in part."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import make_settings
from .process import server_process
from .raw_http import connect, error_code, read_response

ADMIN_KEY = "admin-key-for-tests"


def _call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[list[dict[str, Any]], bool]:
    """One POST straight through the ASGI app; returns what it sent and whether it asked for the body."""
    sent: list[dict[str, Any]] = []
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "client": ("t", 1),
             "server": ("t", 80), "headers": [(b"content-type", b"application/json"), *headers]}
    asyncio.run(app(scope, receive, send))
    return sent, read


def test_the_key_is_checked_once_and_before_the_body_is_read(tmp_path, tiny_base, monkeypatch) -> None:
    app = create_app(make_settings(tmp_path, auth="on", admin_key=ADMIN_KEY), base_model=tiny_base)
    for path, headers in [("/v1/chat/completions", []), ("/v1/interventions", [(b"authorization", b"Bearer wrong")])]:
        sent, read = _call(app, path, headers)
        assert sent[0]["status"] == 401 and not read
    lookups: list[str] = []
    tenant_store = type(app.state.tenants)  # TenantStore, or its PostgreSQL counterpart
    authenticate = tenant_store.authenticate
    monkeypatch.setattr(tenant_store, "authenticate", lambda self, key: lookups.append(key) or authenticate(self, key))
    with TestClient(app) as client:
        app.state.tenants.create_tenant("acme")
        _, key = app.state.tenants.create_key("acme")
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200 and lookups == [key]  # the route reuses the middleware's Principal


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[psutil.Process, str]]:
    data_dir = tmp_path_factory.mktemp("auth")
    key_file = data_dir / "admin.key"
    key_file.write_text(ADMIN_KEY)
    with server_process(tiny_model_dir, data_dir, "--auth", "on", "--admin-key-file", str(key_file)) as (process, url):
        yield psutil.Process(process.pid), url


@pytest.mark.parametrize("head, key, code", [
    (b"POST /v1/interventions HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
     b"Content-Length: %d\r\n" % (40 << 20), None, "missing_api_key"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (16 << 20),
     b"not-a-key", "invalid_api_key"),
])
def test_a_large_body_without_a_valid_key_gets_401_before_it_is_sent(server, head, key, code) -> None:
    process, url = server
    rss = process.memory_info().rss
    sock = connect(url)
    authorization = b"Authorization: Bearer %s\r\n" % key if key else b""
    sock.sendall(head + b"Host: x\r\n" + authorization + b"\r\n" + b"\0" * (1 << 20))  # 1 MiB of it, then wait
    started = time.monotonic()
    status, body = read_response(sock, timeout=5)  # the old server waited for the rest of the body here
    sock.close()
    assert status == 401 and error_code(body) == code
    assert time.monotonic() - started < 2
    assert process.memory_info().rss - rss < 8 << 20  # nothing was buffered, spooled or decoded

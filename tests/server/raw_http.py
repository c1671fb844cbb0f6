"""Raw HTTP/1.1 over a socket, for tests about what the server does before (or instead of) reading a request:
clients such as httpx would finish the request line, the headers and the body first."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit


def connect(url: str, timeout: float = 5) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, bytes]:
    """Read until the server closes: the status and body it sent (None and b"": closed or reset without an
    answer). Raises `TimeoutError` when the server neither answers nor closes within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]

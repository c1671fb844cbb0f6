"""What a caller may hold before its request reaches the app: connections, header bytes, and time to send.

uvicorn's httptools protocol (the fast one `uvicorn[standard]` picks) has no limit on header size and no timeout
while a request is still arriving: `timeout_keep_alive` only covers idle time between requests. So a caller
without any key could hold sockets open forever with half a request line, or make the parser buffer tens of MiB
of headers. `guarded_protocol(settings)` builds the httptools protocol with four bounds, each answered with an
OpenAI error body and a closed connection:

- more than `max_connections` open at once: the new one gets 503 `too_many_connections` (+ `Retry-After`) as soon
  as it is accepted, before anything is read, so descriptors stay bounded;
- a request line + headers over `max_header_bytes`: 431 `request_header_fields_too_large`;
- headers not complete `header_timeout_s` after the connection opened (or the request's first byte, on a
  kept-alive connection): 408 `request_timeout`;
- a body not complete `body_timeout_s` after the headers: 408 `request_timeout`.

The bound on connections is all connections, `/health` and `/metrics` included: beyond it nothing can tell them
apart without reading, and reading is what the bound protects. (h11's `h11_max_incomplete_event_size` would bound
headers too, with a 400, but h11 costs more event-loop CPU per streamed token and has no read timeouts either.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.errors import APIError, error_body
from server.settings import Settings


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal itself is kept on the protocol."""


class GuardedHttpProtocol(HttpToolsProtocol):
    settings: ClassVar[Settings]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None  # for the headers or the body, whichever is arriving
        self._in_headers = False
        self._raw_header_bytes = 0  # bytes read since the request's first byte, while its headers are unfinished
        self._parsed_header_bytes = 0  # request line and headers as the parser hands them over
        self._refusal: APIError | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            self._refuse(_too_many_connections(self.settings.max_connections))
            return
        self._arm(self.settings.header_timeout_s, "headers")  # a connection that never sends a byte is held too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, except that nothing more is parsed once refused, and unfinished headers are counted here:
        httptools buffers a partial header value without any callback, so the callbacks alone cannot bound it."""
        if self._refusal is not None:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refusal is None:  # not ours: a malformed request, answered as uvicorn does
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
                return
        if self._refusal is not None:
            self._refuse(self._refusal)
        elif self._in_headers:
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self.settings.max_header_bytes:
                self._refuse(_headers_too_large(self.settings.max_header_bytes))

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._raw_header_bytes, self._parsed_header_bytes = True, 0, 0
        if self._deadline is None:  # on a kept-alive connection the header deadline starts at the first byte
            self._arm(self.settings.header_timeout_s, "headers")

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.settings.body_timeout_s, "body")  # disarmed at once by on_message_complete when bodiless
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # Limits
    def _count_header_bytes(self, size: int) -> None:
        """Catches headers that start and finish within one read, which `data_received` cannot tell from the body
        that follows them."""
        self._parsed_header_bytes += size
        if self._parsed_header_bytes > self.settings.max_header_bytes:
            self._refusal = _headers_too_large(self.settings.max_header_bytes)
            raise _Refused  # stops the parser; data_received sends the refusal

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out, seconds, part)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self, seconds: float, part: str) -> None:
        self._deadline = None
        self._refuse(APIError(408, f"the request {part} did not arrive within {seconds:g} s", code="request_timeout"))

    def _refuse(self, error: APIError) -> None:
        """Answer `error` (unless a response is already under way) and close: what is unread stays unread."""
        self._refusal = error
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_raw_response(error))
        if cycle is not None and not cycle.response_complete:  # the app sees a disconnect, and its reply goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpProtocol]:
    """The protocol class to pass to uvicorn as `http=`, bound to these settings' limits."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"settings": settings})


def _too_many_connections(limit: int) -> APIError:
    return APIError(503, f"the server has {limit} connections open; retry shortly", type="server_error",
                    code="too_many_connections", headers={"Retry-After": "1"})


def _headers_too_large(limit: int) -> APIError:
    return APIError(431, f"the request line and headers are larger than the {limit} byte limit",
                    code="request_header_fields_too_large")


def _raw_response(error: APIError) -> bytes:
    """The whole HTTP/1.1 response, written straight to the socket: no ASGI app is running for this request."""
    body = json.dumps(error_body(error.message, error.type, error.code, error.param)).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close"}
    headers |= error.headers or {}
    lines = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())
    return STATUS_LINE[error.status] + lines + b"\r\n" + body

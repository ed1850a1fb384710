"""What keeps slow or abusive clients from locking others out of the server, and the token in front of the docs.

- **Slow headers**: a connection has `serve.header_timeout_s` to send each request's line and headers, then gets 408
  and is closed (uvicorn itself waits for ever; its keep-alive timeout ends as soon as a byte arrives).
- **Slow bodies**: a request has `serve.body_timeout_s` to send its whole body, then gets 408.
- **Connections**: an HTTP process holds at most `serve.max_connections`; more are answered 503 and closed at once,
  and the open-files limit is raised so that the bound, not the limit, is what is reached first.
- **Body size**: a body over `serve.max_body_bytes` gets 413 once the client has finished sending it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import secrets

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from florence_ops.serving.openai_api import UNAUTHORIZED, BadRequest

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as DefaultProtocol
except ImportError:  # httptools is optional in uvicorn; h11 is always there
    DefaultProtocol = H11Protocol

log = logging.getLogger(__name__)
FILES_RESERVED = 256  # open files the server needs besides its connections (libraries, pages, the queue)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with OpenAI's error body, for answers given before any request is parsed."""
    body = json.dumps(BadRequest(message, code, status=status).body().model_dump())
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")  # fmt: skip
    return (head + body).encode()


class _GuardedConnections:
    """uvicorn's HTTP protocol with a time limit on each request's headers and a bound on open connections."""

    header_timeout_s: float
    max_connections: int

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        if len(self.connections) > self.max_connections:
            transport.write(_raw_response(503, "Service Unavailable", "too_many_connections",
                                          f"over serve.max_connections={self.max_connections}; retry"))  # fmt: skip
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next request's headers are timed too
            self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_raw_response(408, "Request Timeout", "request_timeout",
                                               f"request headers not received within "
                                               f"serve.header_timeout_s={self.header_timeout_s:g} s"))  # fmt: skip
            self.transport.close()


def http_protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol class (httptools where installed) guarded as `_GuardedConnections` says."""
    attributes = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type(f"Guarded{DefaultProtocol.__name__}", (_GuardedConnections, DefaultProtocol), attributes)


def raise_open_files_limit(connections: int) -> None:
    """Raise the soft open-files limit to the hard one, and warn when `connections` still would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, connections + FILES_RESERVED)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if connections + FILES_RESERVED > soft:
        log.warning("serve.max_connections x serve.api_servers = %d connections need about %d open files, over "
                    "this machine's limit of %d (ulimit -n): lower them or raise the limit", connections,
                    connections + FILES_RESERVED, soft)  # fmt: skip


class BodyLimits:
    """ASGI middleware: a body over `max_bytes` gets 413 once the client has finished sending it; a body not
    received whole within `timeout_s` gets 408.

    LitServe's MaxSizeMiddleware answers as soon as the limit is passed; a client still sending (urllib, requests)
    then sees the connection reset instead of the answer. Here the rest is read and dropped first (memory stays
    bounded), up to `DRAIN_FACTOR` times the limit, beyond which the connection is simply closed.
    """

    DRAIN_FACTOR = 8

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        total, deadline, complete = 0, None, False

        async def next_message():
            nonlocal deadline, complete
            if complete:  # after the body: waiting for a disconnect is not timed
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                raise StarletteHTTPException(408, f"request body not received within serve.body_timeout_s="
                                             f"{self.timeout_s:g} s") from None  # fmt: skip
            complete = not message.get("more_body")
            return message

        async def limited():
            nonlocal total
            message = await next_message()
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                while message.get("more_body") and total <= self.max_bytes * self.DRAIN_FACTOR:
                    message = await next_message()
                    total += len(message.get("body", b""))
                raise StarletteHTTPException(413, f"request body over serve.max_body_bytes={self.max_bytes}")
            return message

        await self.app(scope, limited, send)


class DocsNeedToken:
    """ASGI middleware: with a token set, the API docs (`/docs`, `/openapi.json`, ...) need it as the API does."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in DOCS_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not secrets.compare_digest(given, self.token):
                error = BadRequest(UNAUTHORIZED, "invalid_api_key", status=401)
                return await JSONResponse(error.body().model_dump(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)
